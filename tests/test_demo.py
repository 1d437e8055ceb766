"""The demo (flowcodec.demo): link adaptation to a BLER target, accuracy against SNR, the cache,
the plot, and the recorded run the docs quote."""

from __future__ import annotations

import json

from helpers import ROOT


# --- link adaptation that targets a BLER on the channel the flow runs on --------------------
def test_link_adaptation_adapts_to_fading():
    from channels import AWGN, RayleighBlockFading
    from flowcodec.demo import adapt_mcs

    packets = [[bytes(48), bytes(40), bytes(40)]] * 4
    for snr in (5.0, 15.0):
        awgn = adapt_mcs(packets, snr, lambda: AWGN(seed=0), target=0.01, harq_max_tx=1)
        ray = adapt_mcs(packets, snr, lambda: RayleighBlockFading(coherence_length=64, seed=0),
                        target=0.01, harq_max_tx=1)  # fmt: skip
        assert ray.mcs < awgn.mcs  # fading needs a more robust MCS for the same target
        for c in (awgn, ray):
            assert c.expected_loss <= 0.01 or not c.feasible
    lo = adapt_mcs(packets, 5.0, lambda: AWGN(seed=0), target=0.01)
    hi = adapt_mcs(packets, 15.0, lambda: AWGN(seed=0), target=0.01)
    assert hi.mcs >= lo.mcs and hi.expected_uses <= lo.expected_uses


def test_demo_accuracy_rises_or_holds_with_snr_and_a_warm_rerun_is_fast(tmp_path, digits_family):
    import time

    from flowcodec.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick("digits")
    t0 = time.perf_counter()
    rows, meta = run_demo(cfg, tmp_path, progress=False, use_cache=False)
    cold = time.perf_counter() - t0
    assert not meta["cached"]
    n = meta["samples"]
    for ch in cfg.channels:
        for rp in {r["rate_point"] for r in rows}:
            pts = sorted((r["snr_db"], r) for r in rows
                         if r["channel"] == ch and r["rate_point"] == rp)  # fmt: skip
            accs = [p[1]["accuracy"] for p in pts]
            mcs = [p[1]["mcs"] for p in pts]
            assert all(b >= a - 1.0 / n for a, b in zip(accs, accs[1:])), (ch, rp, accs)
            assert mcs == sorted(mcs), (ch, mcs)
            hi = pts[-1][1]  # at the highest SNR the target is met
            assert hi["uplink_packet_loss"] <= 0.05, hi
    t0 = time.perf_counter()
    again, meta2 = run_demo(cfg, tmp_path, progress=False)
    warm = time.perf_counter() - t0
    assert meta2["cached"] and again == rows
    assert warm < cold / 2
    import csv

    with open(tmp_path / "demo.csv") as f:
        assert {"mcs", "target_bler", "expected_loss"} <= set(next(csv.DictReader(f)))


# --- the digits figures in the docs come from one recorded run ------------------------------
def test_docs_quote_the_digits_figures_of_one_recorded_run():
    """docs/demo_run.json records the run (command, date, machine) behind docs/demo.csv and the
    digits family's accuracies; README, family.md and results.md quote exactly those."""
    from flowcodec.demo import markdown_table, read_csv

    run = json.loads((ROOT / "docs" / "demo_run.json").read_text())
    accs = [f"{100 * a:.2f}" for a in run["family_test_accuracy"]]
    assert run["command"].startswith("flowcodec demo") and run["date_utc"]
    readme = (ROOT / "README.md").read_text()
    family = (ROOT / "docs" / "family.md").read_text()
    results = (ROOT / "docs" / "results.md").read_text()
    for doc, text in (("README.md", readme), ("family.md", family), ("results.md", results)):
        assert " / ".join(f"{a} %" for a in accs) in text or all(
            f"| {a} %" in text for a in accs), f"{doc} does not quote {accs}"
        assert "demo_run.json" in text, f"{doc} does not say which run"
    assert "99.2 % or above" not in readme
    table = markdown_table(read_csv(ROOT / "docs" / "demo.csv"))
    assert table in results, "results.md's demo table is not the one made from docs/demo.csv"


# --- the plot -------------------------------------------------------------------------------
def test_demo_plot_shows_the_mcs_and_explains_rate_points(tmp_path, monkeypatch):
    import matplotlib.figure

    from flowcodec.demo import DemoConfig, _write

    seen = {}

    def savefig(fig, path, **kw):
        seen["ylabels"] = [a.get_ylabel() for a in fig.axes]
        seen["title"] = fig._suptitle.get_text()
        seen["notes"] = [t.get_text() for a in fig.axes for t in a.texts]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rows = [{"channel": ch, "snr_db": s, "rate_point": "lam1", "mcs": m, "accuracy": 0.9,
             "bytes_per_sample": 100.0, "latency_ms": 1.0, "exit_device": 0.9, "exit_edge": 0.05,
             "exit_cloud": 0.05, "uplink_packet_loss": 0.0}
            for ch in ("awgn", "rayleigh") for s, m in ((0.0, 3), (10.0, 12))]  # fmt: skip
    _write(rows, tmp_path, DemoConfig())
    assert any("MCS" in y for y in seen["ylabels"])
    assert "12" in seen["notes"] and "3" in seen["notes"]  # each point names its MCS
    assert "rate weight" in seen["title"]  # what "lam1" means
