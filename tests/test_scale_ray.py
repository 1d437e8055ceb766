"""Sweeps on Ray: same rows as the serial run, failures reported per unit, lost workers
retried. Every test here shares one local Ray instance with 2 CPUs, stopped at the end."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: the Ray engine tests need the extra flowcodec[ray] "
    "(pip install 'flowcodec[ray]', or make setup)")  # fmt: skip

from ray import cloudpickle  # noqa: E402

from flowcodec.scale.ray_engine import RayEngine, SweepFailed  # noqa: E402

# The unit functions below live in this test module, which Ray's workers cannot import by
# name: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def engine():
    eng = RayEngine(workers=2, progress=False, max_retries=2).start()
    yield eng
    eng.close()
    assert not ray.is_initialized()


def _square(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x


def _die_once(marker, x):
    """Kills its own worker process the first time it runs (a lost worker)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return x + 1


def _always_die(x):
    os._exit(1)


def test_units_come_back_in_order_and_a_raising_unit_is_reported_by_its_label(engine):
    results, failures = engine.map(_square, [(i,) for i in range(6)],
                                   [f"x={i}" for i in range(6)], order=[5, 4, 3, 2, 1, 0])
    assert results == [0, 1, 4, None, 16, 25]
    assert [(f.index, f.label) for f in failures] == [(3, "x=3")]
    assert "ValueError" in failures[0].error and "three is not allowed" in failures[0].error


def test_a_unit_whose_worker_dies_is_retried(engine, tmp_path):
    marker = str(tmp_path / "died")
    results, failures = engine.map(_die_once, [(marker, 41)], ["retry me"])
    assert failures == [] and results == [42]
    assert os.path.exists(marker)  # the first try did run and die


def test_a_unit_whose_worker_dies_on_every_try_is_reported_and_the_rest_completes(engine):
    eng = RayEngine(workers=2, progress=False, max_retries=1)
    eng._ray = ray  # the running instance
    results, failures = eng.map(_always_die, [(0,)], ["doomed"])
    ok, _ = eng.map(_square, [(2,)], ["after"])
    assert results == [None] and failures[0].label == "doomed" and ok == [4]


def _sleep_then_pid(seconds):
    import time

    time.sleep(seconds)
    return os.getpid()


def test_warm_up_runs_on_each_worker_before_the_units_and_its_error_is_not_raised(engine):
    eng = RayEngine(workers=2, progress=False).start(background=True)  # the running instance
    eng.warm(_sleep_then_pid, 0.3)
    eng.warm(_square, 3)  # raises in the worker: the units still run
    results, failures = eng.map(_square, [(i,) for i in range(4) if i != 3])
    assert failures == [] and results == [0, 1, 4]
    eng._collect_warm(wait=True)
    assert eng.stats.warm_s >= 0.3
    assert "warm-up" in eng.stats.summary()
    eng.close()
    assert ray.is_initialized()  # a caller's instance is left running


def _rd_cfg():
    cfg = json.loads(open("experiments/rd_digits.json").read())
    keep = {"quant+zstd", "pca+quant+zstd", "jpeg (input)", "robust 4 packets (learned)"}
    cfg["codecs"] = [e for e in cfg["codecs"] if e["group"] in keep]
    for e in cfg["codecs"]:
        if "train" in e:
            e["train"]["epochs"] = 1
        if e["codec"] == "quant":
            e["sweep"]["bits"] = [2, 4]
    cfg["channels"] = [{"loss_rate": 0.2, "seed": 3, "codecs": ["robust-l1.0", "quant-4b"]}]
    return cfg


def _same(rows_a, rows_b):
    strip = [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in rows_a]
    return strip == [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in rows_b]


def test_rd_on_ray_gives_the_serial_rows(engine, tmp_path, digits_family):
    import torch

    from flowcodec.rd import run_rd

    cfg = _rd_cfg()
    torch.set_num_threads(1)  # the units run with one thread each
    try:
        serial = run_rd(cfg, tmp_path / "serial", progress=False, n=200)
    finally:
        torch.set_num_threads(2)
    on_ray = run_rd(cfg, tmp_path / "ray", progress=False, n=200, engine=engine)
    assert [r.label for r in on_ray] == [r.label for r in serial]
    assert any(r.condition != "clean" for r in serial) and any(r.source == "trained"
                                                               for r in serial)
    assert _same(serial, on_ray)
    for name in ("rd.csv", "rd.json", "rd.png", "channel.png"):
        assert (tmp_path / "ray" / name).stat().st_size > 0
    hist = json.loads((tmp_path / "ray" / "rd.json").read_text())["train_histories"]
    assert list(hist) == ["robust-l1.0"] and len(hist["robust-l1.0"]) == 1


def test_an_rd_unit_that_raises_is_reported_and_the_other_rows_are_written(engine, tmp_path,
                                                                          digits_family):
    from flowcodec.rd import run_rd

    cfg = _rd_cfg()
    cfg["codecs"] = [e for e in cfg["codecs"] if e["codec"] in ("quant", "jpeg")]
    cfg["codecs"][0]["sweep"]["bits"] = [4, 99]  # 99 bits: the codec refuses when built
    cfg["channels"] = []
    with pytest.raises(SweepFailed) as err:
        run_rd(cfg, tmp_path, progress=False, n=100, engine=engine)
    fails = err.value.failures
    assert [f.label for f in fails] == ["quant-99b (point 1)"]
    assert "bits must be an int in 1..8" in fails[0].error
    saved = json.loads((tmp_path / "failures.json").read_text())
    assert saved[0]["label"] == "quant-99b (point 1)"
    labels = [r["label"] for r in json.loads((tmp_path / "rd.json").read_text())["rows"]]
    assert labels == ["uncompressed", "quant-4b", "jpeg-q30", "jpeg-q70", "jpeg-q95"]


def _latency_cfg():
    from flowcodec.latency import LatencyConfig

    cfg = json.loads(open("experiments/latency_digits.json").read())
    cfg.update(samples=80, symbol_rates=[1e5, 1e6], snrs_db=[0.0, 20.0], cell_seeds=True)
    cfg["options"] = cfg["options"][:2]
    return LatencyConfig(**cfg)


def test_latency_on_ray_gives_the_serial_rows(engine, tmp_path, digits_family):
    from flowcodec.latency import run_latency

    serial = run_latency(_latency_cfg(), tmp_path / "serial", progress=False)
    on_ray = run_latency(_latency_cfg(), tmp_path / "ray", progress=False, engine=engine)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "decide_ms"} for r in rows]

    assert strip(on_ray) == strip(serial)
    assert len({(r["symbol_rate"], r["snr_db"]) for r in on_ray}) == 4
    assert (tmp_path / "ray" / "latency.csv").read_text().count("\n") == len(serial) + 1


def test_latency_on_ray_needs_cell_seeds(engine, tmp_path):
    from flowcodec.errors import ConfigError
    from flowcodec.latency import run_latency

    cfg = _latency_cfg()
    cfg.cell_seeds = False
    with pytest.raises(ConfigError, match="cell_seeds"):
        run_latency(cfg, tmp_path, progress=False, engine=engine)


def test_the_cli_runs_rd_on_ray_and_reports_start_up(tmp_path, digits_family, capsys, engine):
    from flowcodec.cli import main

    cfg = _rd_cfg()
    cfg["codecs"] = [e for e in cfg["codecs"] if e["codec"] == "quant"]
    cfg["channels"] = []
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    # the module's instance is running: the command uses it and leaves it running
    assert main(["rd", "--config", str(path), "--out", str(tmp_path / "o"), "--n", "100",
                 "--engine", "ray", "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "ray: start-up" in err and "3 units" in err
    assert ray.is_initialized()


_FRESH_START = """
import time
from flowcodec.scale.ray_engine import RayEngine
eng = RayEngine(workers=1, progress=False).start(background=True)
eng.wait_started()
time.sleep(3)  # the start thread would have ended by now
results, failures = eng.map(abs, [(-2,), (5,)])
eng.close()
print("results", results, len(failures))
"""


def test_a_background_start_keeps_its_own_instance_alive_until_close(engine):
    # Ray's helper processes get a parent-death signal bound to the thread that started
    # them: a start thread that ended at once took the fresh instance down with it. The
    # module's instance is running here, so the fresh one is started in a new process.
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FRESH_START], capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "results [2, 5] 0" in out.stdout
