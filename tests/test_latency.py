"""The latency experiment end to end on a small digits configuration; the member that
receives each option."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import latency_digits, random_images, tiny_cloud_family, untrained_digits_family

from flowcodec.errors import ConfigError
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


# --- the member that receives each option --------------------------------------------------------
def _cloud_config(**more) -> dict:
    """A small latency config for ``cifar10-cloud``: 4-bit features at split points 1 and 2."""
    quant = {"codec": "quant", "kwargs": {"bits": 4, "packets": 2}, "fit": True, "fit_samples": 32}
    return {"dataset": "cifar10", "family": "cifar10-cloud", "samples": 40, "seed": 0,
            "symbol_rates": [1e6], "snrs_db": [20.0], "cell_seeds": True,
            "input_codec": {"codec": "jpeg", "kwargs": {"quality": 90}},
            "options": [{"point": 1, "rate": "q4", **quant}, {"point": 2, "rate": "q4", **quant}],
            "fixed_split": {"point": 1, "rate": "q4"}, **more}  # fmt: skip


@pytest.fixture
def cloud(monkeypatch):
    """The tiny ``cifar10-cloud`` family, with random CIFAR-10-shaped images for its data."""
    fam = tiny_cloud_family()
    monkeypatch.setattr("flowcodec.data.load_dataset", lambda name, **kw: (
        random_images(fam.input_shape, 64, seed=1), random_images(fam.input_shape, 40)))
    return fam


@pytest.mark.parametrize("point, receiver", [(1, 4), (2, 3)])
def test_a_branching_family_receives_each_option_at_the_largest_member_through_its_point(
        tmp_path, cloud, point, receiver):  # fmt: skip
    cfg = LatencyConfig(**_cloud_config(fixed_split={"point": point, "rate": "q4"}))
    rows = {r["scheme"]: r for r in run_latency(cfg, tmp_path, progress=False, family=cloud)}
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert [(o["point"], o["receiver"]) for o in prof["options"]] == [(1, 4), (2, 3)]
    assert rows["fixed-split"]["receiver"] == receiver  # member 4 cannot receive point 2
    chosen = int(rows["adaptive"]["config"].split(",")[0].removeprefix("point "))
    assert rows["adaptive"]["receiver"] == {1: 4, 2: 3}[chosen]
    assert rows["cloud-only"]["receiver"] == rows["edge-only"]["receiver"] == 4
    with open(tmp_path / "latency.csv") as f:
        assert next(csv.reader(f))[-1] == "receiver"


def test_an_explicit_member_off_an_options_point_is_refused_before_any_work(tmp_path, cloud):
    cfg = LatencyConfig(**_cloud_config(member=4))
    with pytest.raises(ConfigError, match=r"member 4 passes through split points \[0, 1, 4\] "
                                          r"only: option \(point 2, rate 'q4'\).*"
                                          r"family.receiver\(2\) = member 3"):  # fmt: skip
        run_latency(cfg, tmp_path, progress=False, family=cloud)
    assert not (tmp_path / "profile.json").exists()


def test_a_chain_family_gives_the_rows_of_its_last_member_given_explicitly(tmp_path):
    fam = untrained_digits_family()
    cfg = latency_digits()
    cfg.update(samples=60, symbol_rates=[1e6], snrs_db=[20.0])
    cfg["options"] = [o for o in cfg["options"] if o["rate"] != "quant-2bit"]  # points 0, 1, 2
    got = {}
    for member in (None, fam.num_members):
        rows = run_latency(LatencyConfig(**cfg, member=member), tmp_path / str(member),
                           progress=False, family=fam)  # fmt: skip
        got[member] = [{k: v for k, v in r.items() if k != "decide_ms"} for r in rows]
    assert got[None] == got[fam.num_members]
    assert {r["receiver"] for r in got[None] if r["scheme"] != "device-only"} == {3}
