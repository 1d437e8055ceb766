"""``flowcodec snr`` on Ray: the same rows as the serial run, failures reported per unit.

Every Ray test here shares one local Ray instance with 2 CPUs, stopped at the end. The
config is a small digits sweep (40 test images, codecs trained for 2 steps) with
``"entry_seeds": true``, so its trained codecs do not depend on the order of training.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch

from flowcodec.errors import ConfigError
from flowcodec.snr import run_snr, validate_config

_JSCC_KW = {"symbols": 4, "stem": [[32, True]], "hidden": 16, "film": 8, "levels": [2, 4]}
SMALL = {
    "dataset": "digits", "family": "digits", "member": 3, "point": 2, "samples": 40,
    "seed": 3, "snrs": [-5, 10], "channels": ["awgn", "rayleigh"], "budgets": [8, 64],
    "uses_plot_snrs": [10], "entry_seeds": True,
    "jscc": [
        {"label": "j", "uses": [2, 4],
         "train": {"kwargs": _JSCC_KW, "epochs": 1, "batch_size": 64, "max_steps": 2}},
        {"label": "j told", "codec": "@j", "uses": [4], "told_snr": 10, "channels": ["awgn"]},
    ],
    "digital": {"train": {"kwargs": {"latent": 4, "stem": [[32, True]], "hidden": 16,
                                     "rates": 2},
                          "lams": [1.0, 0.3], "epochs": 1, "batch_size": 64},
                "mcs": [0, 9, 20], "exact_budgets": [64], "exact_samples": 10},
}  # fmt: skip


def _fields(rows) -> list[str]:
    """Every field of every row, as text (NaN equals NaN here)."""
    return [json.dumps(asdict(r)) for r in rows]


def _serial(cfg, out, threads: int = 1):
    """The serial run with ``threads`` torch threads (a Ray unit runs with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_snr(copy.deepcopy(cfg), out, progress=False)
    finally:
        torch.set_num_threads(before)


def test_entry_seeds_must_be_a_bool():
    with pytest.raises(ConfigError, match="entry_seeds"):
        validate_config({**copy.deepcopy(SMALL), "entry_seeds": 1})


def test_with_entry_seeds_a_trained_codec_does_not_depend_on_the_entries_before_it(
        tmp_path, digits_family):  # fmt: skip
    alone = {**copy.deepcopy(SMALL), "jscc": []}
    rows_all = _serial(SMALL, tmp_path / "all")
    rows_alone = _serial(alone, tmp_path / "alone")
    sep_all = [r for r in rows_all if r.scheme == "separation"]
    sep_alone = [r for r in rows_alone if r.scheme == "separation"]
    assert sep_all and _fields(sep_all) == _fields(sep_alone)


# --- on Ray -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed: the Ray engine tests need the extra "
        "flowcodec[ray] (pip install 'flowcodec[ray]', or make setup)")  # fmt: skip
    from flowcodec.scale.ray_engine import RayEngine

    eng = RayEngine(workers=2, progress=False).start()
    yield eng
    eng.close()
    assert not ray.is_initialized()


def test_ray_rows_equal_the_serial_rows_field_for_field(engine, tmp_path, digits_family):
    serial = _serial(SMALL, tmp_path / "serial")
    units = engine.stats.units
    on_ray = run_snr(copy.deepcopy(SMALL), tmp_path / "ray", progress=False, engine=engine)
    # reference, j: 2 channels x 2 SNRs x 2 uses, j told: 2 SNRs, 2 rate points without a
    # channel, separation: 2 channels x 2 SNRs x (2 budgets + 1 exact)
    assert len(serial) == 1 + 8 + 2 + 2 + 12
    assert _fields(on_ray) == _fields(serial)
    written = json.loads((tmp_path / "ray" / "snr.json").read_text())["rows"]
    assert [json.dumps(r) for r in written] == _fields(serial)
    assert (tmp_path / "ray" / "snr.png").is_file() and (tmp_path / "ray" / "choice.csv").is_file()
    # the reference and 2 trainings, then every cell a unit of its own: 8 + 2 JSCC cells,
    # the rows without a channel, 2 x 2 digital cells
    assert engine.stats.units - units == 3 + 10 + 1 + 4
    # the two rounds keep their own timings: every unit's time is there
    assert set(range(units, engine.stats.units)) <= set(engine.stats.unit_seconds)
    assert [m[1] for m in engine.stats.maps[-2:]] == [3, 15]


def test_a_failing_unit_is_reported_with_its_sweep_point_and_the_rest_completes(
        engine, tmp_path, digits_family):  # fmt: skip
    from flowcodec.scale.ray_engine import SweepFailed

    cfg = copy.deepcopy(SMALL)
    # a shipped codec that is not a JSCC codec: each of its cells raises
    cfg["jscc"].append({"label": "not jscc", "codec": "cifar10-fact_l1", "uses": [4],
                        "channels": ["awgn"]})  # fmt: skip
    # a training that raises (a batch larger than the training set): its cells never run
    cfg["jscc"].append({"label": "big batch", "uses": [4], "channels": ["awgn"],
                        "train": {"kwargs": _JSCC_KW, "batch_size": 100000}})  # fmt: skip
    good = run_snr(copy.deepcopy(SMALL), tmp_path / "good", progress=False, engine=engine)
    with pytest.raises(SweepFailed) as info:
        run_snr(cfg, tmp_path / "bad", progress=False, engine=engine)
    fails = info.value.failures
    labels = [f.label for f in fails]
    assert labels == ["train big batch", "not jscc: awgn, -5 dB, 4 uses",
                      "not jscc: awgn, 10 dB, 4 uses", "big batch (its codec, entry "
                      "'big batch', was not trained)"]  # fmt: skip
    assert "fewer than one batch" in fails[0].error
    assert all("is not a jscc codec" in f.error for f in fails[1:3])
    # every other unit completed: the rows are the good config's rows
    assert _fields(info.value.rows) == _fields(good)
    saved = json.loads((tmp_path / "bad" / "failures.json").read_text())
    assert [f["label"] for f in saved] == labels
    assert len(json.loads((tmp_path / "bad" / "snr.json").read_text())["rows"]) == len(good)


def test_cli_takes_the_engine_and_refuses_a_training_config_without_entry_seeds(
        engine, tmp_path, capsys):  # fmt: skip
    from flowcodec.cli import main

    cfg = copy.deepcopy(SMALL)
    cfg["jscc"] = [{"label": "not jscc", "codec": "cifar10-fact_l1", "uses": [4],
                    "channels": ["awgn"]}]  # fmt: skip
    del cfg["digital"]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    # the running instance is used, and left running
    assert main(["snr", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"),
                 "--engine", "ray", "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "failed: not jscc: awgn, -5 dB, 4 uses: ConfigError" in err and "ray: " in err
    assert (tmp_path / "o" / "failures.json").is_file()
    noseed = {**copy.deepcopy(SMALL), "entry_seeds": False}
    (tmp_path / "n.json").write_text(json.dumps(noseed))
    assert main(["snr", "--config", str(tmp_path / "n.json"), "--out", str(tmp_path / "x"),
                 "--engine", "ray"]) == 2  # fmt: skip
    assert "entry_seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
