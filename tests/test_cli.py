"""The command line: help, the demo's quick run, and clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from helpers import latency_digits, rd_digits

from flowcodec.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "flowcodec.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for cmd in ("demo", "train-family", "info", "align"):
        assert cmd in out


def test_info_reports_members_and_split_points(capsys):
    assert main(["info", "--family", "digits"]) == 0
    out = capsys.readouterr().out
    assert "MFLOPs" in out and "split point 1: features (16, 8, 8)" in out


def test_demo_quick_writes_results(tmp_path, digits_family, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "family.json").read_text())
    assert [r["member"] for r in rows] == [1, 2, 3]
    assert all(float(r["test acc %"]) >= 95 for r in rows)
    with open(tmp_path / "demo.csv") as f:
        flows = list(csv.DictReader(f))
    assert {(r["channel"], float(r["snr_db"])) for r in flows} == {
        ("awgn", 3.0), ("awgn", 15.0), ("rayleigh", 3.0), ("rayleigh", 15.0)}
    for r in flows:
        mix = float(r["exit_device"]) + float(r["exit_edge"]) + float(r["exit_cloud"])
        assert abs(mix - 1) < 1e-6 and 0 <= float(r["accuracy"]) <= 1
    awgn_hi = next(r for r in flows if r["channel"] == "awgn" and float(r["snr_db"]) == 15.0)
    assert float(awgn_hi["accuracy"]) >= 0.9
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "exits device/edge/cloud" in capsys.readouterr().out


def test_missing_cifar_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLOWCODEC_DATA", raising=False)
    monkeypatch.setenv("FLOWCODEC_CACHE", str(tmp_path))
    code = main(["train-family", "--family", "cifar10", "--data", str(tmp_path / "none"),
                 "--epochs", "1", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


# --- configs checked before any work; help written for a person -----------------------------
def test_cli_checks_configs_before_any_work(tmp_path, monkeypatch, capsys):
    from flowcodec.cli import main

    def no_work(*a, **k):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr("flowcodec.family.load_pretrained", no_work)
    monkeypatch.setattr("flowcodec.data.load_dataset", no_work)
    lat = latency_digits()
    lat["snrs_db"] = ["ten"]
    (tmp_path / "lat.json").write_text(json.dumps(lat))
    assert main(["latency", "--config", str(tmp_path / "lat.json"), "--out", str(tmp_path)]) == 2
    assert "snrs_db[0]" in capsys.readouterr().err
    rd = rd_digits()
    rd["codecs"][0]["kwargs"] = {"bitz": 4}
    (tmp_path / "rd.json").write_text(json.dumps(rd))
    assert main(["rd", "--config", str(tmp_path / "rd.json"), "--out", str(tmp_path)]) == 2
    assert "bitz" in capsys.readouterr().err


def test_negative_counts_are_refused(capsys):
    from flowcodec.cli import main

    for argv in (["rd", "--config", "x.json", "--n", "-5"], ["latency", "--samples", "-3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert ">= 1" in capsys.readouterr().err


def _help(*argv) -> str:
    return subprocess.run([sys.executable, "-m", "flowcodec.cli", *argv, "--help"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_top_level_help_lists_every_command_in_plain_words():
    out = _help()
    for cmd in ("demo", "rd", "latency", "train-family", "align", "info"):
        assert f"    {cmd}" in out, cmd
    assert "``" not in out and ":func:" not in out


@pytest.mark.parametrize("cmd", ["demo", "rd", "latency", "train-family", "align", "info"])
def test_every_subcommand_has_a_description_and_option_help(cmd):
    import argparse

    from flowcodec.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[cmd]
    assert p.description and len(p.description) > 40
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help, f"{cmd} {a.option_strings} has no help"


def test_version_and_info_choices(capsys):
    from flowcodec import __version__
    from flowcodec.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    from flowcodec.family import FAMILIES

    # every registered family, the language family included, and nothing else
    assert "{" + ",".join(sorted(FAMILIES)) + "}" in _help("info")
    assert {"cifar10", "cifar10-vit", "digits", "shakespeare-char"} <= set(FAMILIES)
