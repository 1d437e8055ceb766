"""The sweep runner (flowcodec.sweeps): units, worker contexts, configs checked once, writers,
common options, codec specs, and the fourth sweep of docs/sweeps.md run from that page."""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowcodec.errors import ConfigError
from flowcodec.sweeps import (
    SWEEPS,
    Sweep,
    codec_from_spec,
    get_sweep,
    map_units,
    raise_failures,
    worker_context,
    write_csv,
)
from flowcodec.sweeps.runner import SweepFailed, UnitFailure

ROOT = Path(__file__).resolve().parents[1]


# --- units ---------------------------------------------------------------------------------------
def test_serial_units_run_in_order_and_report_each_result():
    seen = []
    results, failures = map_units(pow, [(2, 3), (3, 2), (5, 0)], ["a", "b", "c"],
                                  order=[2, 1, 0], on_result=lambda i, r: seen.append((i, r)),
                                  progress=False)  # fmt: skip
    assert results == [8, 9, 1] and failures == []
    assert seen == [(0, 8), (1, 9), (2, 1)]  # serial: index order, whatever the Ray order


def test_a_serial_unit_that_raises_stops_the_run():
    with pytest.raises(ZeroDivisionError):
        map_units(lambda x: 1 / x, [(1,), (0,), (2,)], progress=False)


def test_failures_write_the_rows_and_failures_json(tmp_path):
    raise_failures([], [1], tmp_path)  # nothing failed: nothing happens
    written = []
    fail = UnitFailure(1, "cell 1", "ValueError: no")
    with pytest.raises(SweepFailed) as e:
        raise_failures([fail], [{"x": 1}], tmp_path / "o", written.append)
    assert e.value.rows == [{"x": 1}] and written == [[{"x": 1}]]
    saved = json.loads((tmp_path / "o" / "failures.json").read_text())
    assert saved[0]["label"] == "cell 1"


def test_a_worker_keeps_one_context_per_sweep_and_key():
    built = []

    def build(tag):
        built.append(tag)
        return tag

    assert worker_context("t1", {"a": 1}, lambda: build("a")) == "a"
    assert worker_context("t1", {"a": 1}, lambda: build("again")) == "a"  # kept
    assert worker_context("t2", {"a": 1}, lambda: build("other sweep")) == "other sweep"
    assert worker_context("t1", {"a": 2}, lambda: build("b")) == "b"  # a new key replaces it
    assert built == ["a", "other sweep", "b"]


# --- files ---------------------------------------------------------------------------------------
@dataclass
class _Row:
    name: str
    value: float
    n: int


def test_csv_of_dataclasses_rounds_floats_and_of_dicts_leaves_missing_columns_empty(tmp_path):
    write_csv(tmp_path / "a.csv", [_Row("x", 1 / 3, 2)], digits=4)
    assert list(csv.DictReader(open(tmp_path / "a.csv"))) == [
        {"name": "x", "value": "0.3333", "n": "2"}]
    write_csv(tmp_path / "b.csv", [{"a": 1}, {"a": 2, "b": 0.123456789}], fields=["a", "b"])
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert rows == [{"a": "1", "b": ""}, {"a": "2", "b": "0.123456789"}]


# --- configs and options -------------------------------------------------------------------------
class _Counting(Sweep):
    name = "counting"

    def __init__(self):
        self.calls = 0

    def validate(self, cfg, where):
        self.calls += 1
        if cfg.get("bad"):
            raise ConfigError(f"{where}: bad")
        return cfg


def test_a_config_is_checked_once_per_content():
    s = _Counting()
    cfg = {"x": [1, 2]}
    s.check(cfg)
    s.check({"x": [1, 2]})  # the same content: not checked again
    assert s.calls == 1
    cfg["x"].append(3)  # changed: checked again
    s.check(cfg)
    assert s.calls == 2
    with pytest.raises(ConfigError, match="counting config: bad"):
        s.check({"bad": True})
    with pytest.raises(ConfigError):
        s.check({"bad": True})  # a config that failed is never recorded as checked


def test_every_sweep_takes_the_common_options_and_the_old_sample_flags():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for name in SWEEPS:
        get_sweep(name).add_parser(sub)
    for name in SWEEPS:
        for flag in ("--samples", "--n"):
            args = parser.parse_args([name, "--config", "digits", flag, "7"])
            assert args.samples == 7 and args.threads == 2 and not args.no_progress
            assert args.engine == "serial" and args.func == get_sweep(name).command
    assert parser.parse_args(["latency"]).config is None  # latency has a default config
    with pytest.raises(SystemExit):
        parser.parse_args(["rd"])  # rd names its config
    with pytest.raises(ConfigError, match="unknown sweep"):
        get_sweep("nope")


def test_snr_configs_list_every_bad_key_at_once():
    from flowcodec.snr import validate_config

    cfg = json.loads((ROOT / "experiments" / "snr_digits.json").read_text())
    cfg.update(member=9, colour="red", budgets=[0])
    cfg["jscc"][1]["codec"] = "@nobody"
    cfg["digital"]["exact_budgets"] = [5]
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "5 problems" in msg
    for words in ("member: 9", "colour: unknown key", "budgets[0]", "@nobody",
                  "digital.exact_budgets[0]"):
        assert words in msg, words


# --- codec specs ---------------------------------------------------------------------------------
def test_codec_specs_build_load_and_refuse_clearly():
    from flowcodec.codecs.zoo import list_pretrained
    from flowcodec.family import build_family

    fam = build_family("digits")
    q = codec_from_spec({"codec": "quant", "kwargs": {"bits": 4}}, fam, 1)
    assert q.name == "quant" and not q.training
    assert tuple(q.feature_shape) == tuple(fam.feature_shape(1))
    ex = codec_from_spec({"codec": "exit-top1"}, fam, 2)
    assert ex.answers  # built with the family's exit at point 2
    name = next(n for n in list_pretrained() if n.startswith("cifar10-"))
    assert codec_from_spec(name).name == codec_from_spec({"pretrained": name}).name
    with pytest.raises(ConfigError, match="exactly one of"):
        codec_from_spec({"codec": "quant", "pretrained": name}, fam, 1)
    with pytest.raises(ConfigError, match="needs a family"):
        codec_from_spec({"codec": "quant"})
    with pytest.raises(ConfigError, match="point 2 has"):
        codec_from_spec({"pretrained": name}, fam, 2)  # a CIFAR-10 codec on digits features


# --- a fourth sweep, as docs/sweeps.md writes it -------------------------------------------------
def _example_source() -> str:
    doc = (ROOT / "docs" / "sweeps.md").read_text()
    return re.search(r"```python\n(.*?)```", doc, re.S).group(1)


def _example_config() -> dict:
    doc = (ROOT / "docs" / "sweeps.md").read_text()
    return json.loads(re.search(r"```json\n(.*?)```", doc, re.S).group(1))


def test_the_documented_fourth_sweep_is_one_file_and_a_registry_line(tmp_path, monkeypatch,
                                                                      capsys, digits_family):
    from flowcodec.cli import main

    (tmp_path / "loss_example.py").write_text(_example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SWEEPS, "loss", "loss_example:SWEEP")  # the registry line
    cfg = _example_config()
    (tmp_path / "loss.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["loss", "--config", str(tmp_path / "loss.json"), "--out", str(out),
                 "--n", "120", "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [float(r["loss_rate"]) for r in rows] == cfg["loss_rates"]
    acc = [float(r["accuracy"]) for r in rows]
    assert acc[0] > 0.5 and acc[-1] < acc[0]  # packets lost, accuracy lost
    assert "loss 0.50" in capsys.readouterr().out
    # a bad config is refused whole, every bad key named, before any work
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "loss_rates": [2], "member": 0,
                                                   "colour": 1}))  # fmt: skip
    assert main(["loss", "--config", str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "3 problems" in err and "loss_rates[0]" in err and "colour" in err
    assert not (tmp_path / "x").exists()
