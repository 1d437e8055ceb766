"""The command line: help, the demo's quick run, and clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

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
