"""The latency experiment end to end on a small digits configuration."""

from __future__ import annotations

import csv
import json

from flowcodec.latency import LatencyConfig, run_latency


def test_latency_experiment_writes_rows_for_every_scheme(tmp_path, digits_family):
    cfg = json.loads(open("experiments/latency_digits.json").read())
    cfg.update(samples=120, symbol_rates=[1e6], snrs_db=[-5.0, 20.0])
    cfg["options"] = cfg["options"][:2]
    rows = run_latency(LatencyConfig(**cfg), tmp_path, progress=False)
    schemes = {"adaptive", "fixed-split", "edge-only", "cloud-only", "device-only"}
    if any(int(o["point"]) == 0 for o in cfg["options"]):
        schemes.add("edge-only-matched")  # edge only with the input codec matched in accuracy
    assert {r["scheme"] for r in rows} == schemes
    assert len(rows) == 2 * len(schemes)
    for r in rows:
        if r["scheme"] == "adaptive" and "edge-only-matched" in schemes:
            assert r["speedup_vs_edge_matched"] > 0
    with open(tmp_path / "latency.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "latency_vs_snr.png").stat().st_size > 0
    assert (tmp_path / "profile.json").is_file()
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0
    by = {(r["scheme"], r["snr_db"]): r for r in rows}
    # Edge and cloud differ only by the backhaul delay (28 ms) and compute speed.
    assert by[("cloud-only", 20.0)]["latency_ms"] > by[("edge-only", 20.0)]["latency_ms"] + 27
    # With a clean link the adaptive flow keeps its accuracy floor (1 point under cloud).
    floor = by[("cloud-only", 20.0)]["cloud_only_clean_accuracy"] - 0.01
    assert by[("adaptive", 20.0)]["expected_accuracy"] >= floor


def test_session_framing_sends_fewer_bytes_for_the_same_images(tmp_path, digits_family):
    cfg = json.loads(open("experiments/latency_digits.json").read())
    cfg.update(samples=60, symbol_rates=[1e6], snrs_db=[20.0])
    cfg["options"] = cfg["options"][:2]
    got = {}
    for framing in ("sample", "session"):
        rows = run_latency(LatencyConfig(**cfg, framing=framing), tmp_path / framing,
                           progress=False)  # fmt: skip
        got[framing] = {r["scheme"]: r for r in rows}
        prof = json.loads((tmp_path / framing / "profile.json").read_text())
        assert prof["meta"]["framing"] == framing
    # Same input codec and images: the per-sample header (and 10-byte packet frames) go.
    saved = got["sample"]["cloud-only"]["bytes"] - got["session"]["cloud-only"]["bytes"]
    assert 40 < saved < 80
    assert got["session"]["cloud-only"]["accuracy"] == got["sample"]["cloud-only"]["accuracy"]
