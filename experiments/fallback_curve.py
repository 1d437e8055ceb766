"""Accuracy against packet loss, with and without the concealment fallback (digits).

The device runs the trained digits family up to split point 1 and sends every sample's
features (no early exit) to the edge, which finishes with member 3. Each sample's link
units (its header and packets) are dropped i.i.d. at the loss rate. Without the fallback
(``Flow(max_concealed=None)``) the edge answers from whatever arrived, lost packets
concealed; with it (``max_concealed``, default 0.5) a sample more than that fraction of
whose packets were concealed is answered by the device's own exit instead. Both runs draw
the same losses (the same seeded generator), so each row is a paired comparison.

Two codecs: ``raw`` float16 in one packet (what ``flowcodec device`` sends by default) and
in 8 packets (where partial losses exist and the threshold matters).

    nice -n 19 .venv/bin/python experiments/fallback_curve.py --out docs/fallback_curve_digits.csv

Prints a table and writes a CSV with one row per (codec, loss rate).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

LOSSES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 0.9, 0.99, 1.0)
CODECS = {"raw-f16-1pkt": {"dtype": "float16"},
          "raw-f16-8pkt": {"dtype": "float16", "packets": 8}}  # fmt: skip
FIELDS = ["codec", "packets", "loss", "acc_no_fallback", "acc_fallback", "fallback_fraction",
          "device_exit_acc", "edge_lossless_acc", "device_mflops_no_fallback",
          "device_mflops_fallback", "samples"]  # fmt: skip


def run(losses, max_concealed: float, seed: int, samples: int | None) -> list[dict]:
    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.pipeline import DEFAULT_TIERS, Flow, Hop, Tier

    fam = load_pretrained("digits", progress=False).eval()
    _, test = load_dataset("digits")
    if samples:
        test = test.subset(min(samples, len(test)), seed=seed)
    x, y = test.normalize(test.images), test.labels
    tiers = [Tier("device", DEFAULT_TIERS["device"], 1), Tier("edge", DEFAULT_TIERS["edge"], 3)]
    with torch.no_grad():
        exit_acc = float((fam.member(1)(x).argmax(1) == y).float().mean())
        edge_acc = float((fam.member(3)(x).argmax(1) == y).float().mean())
    rows = []
    for name, kw in CODECS.items():
        codec = build_codec("raw", fam.feature_shape(1), **kw).eval()
        n_packets = len(codec.compress(fam.features(x[:1], 1))[0].packets)
        for loss in losses:
            out = {}
            for key, limit in (("no", None), ("fb", max_concealed)):
                hop = Hop(codec, IIDPacketErasure(loss), symbol_rate=1e6)
                flow = Flow(fam, tiers, [hop], max_concealed=limit)
                res = flow.run(x, generator=torch.Generator().manual_seed(seed))
                out[key] = res
            fb = out["fb"]
            fell = sum(t.fallback == "concealed" for t in fb.traces) / len(fb.traces)

            def mflops(res):
                return sum(t.compute_flops["device"] for t in res.traces) / len(res.traces) / 1e6

            rows.append({"codec": name, "packets": n_packets, "loss": loss,
                         "acc_no_fallback": round(out["no"].accuracy(y), 4),
                         "acc_fallback": round(fb.accuracy(y), 4),
                         "fallback_fraction": round(fell, 4),
                         "device_exit_acc": round(exit_acc, 4),
                         "edge_lossless_acc": round(edge_acc, 4),
                         "device_mflops_no_fallback": round(mflops(out["no"]), 4),
                         "device_mflops_fallback": round(mflops(fb), 4),
                         "samples": len(y)})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'codec':<14} {'loss':>5} {'no fallback':>11} {'fallback':>9} {'fell back':>9} "
            f"{'device exit':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['codec']:<14} {r['loss']:>5.2f} {100 * r['acc_no_fallback']:>10.2f}% "
                     f"{100 * r['acc_fallback']:>8.2f}% {100 * r['fallback_fraction']:>8.1f}% "
                     f"{100 * r['device_exit_acc']:>10.2f}%")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/fallback_curve_digits.csv", help="CSV to write")
    ap.add_argument("--losses", default=",".join(f"{v:g}" for v in LOSSES),
                    help="comma-separated packet loss rates")
    ap.add_argument("--max-concealed", type=float, default=0.5,
                    help="the fallback threshold (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=None, help="test samples (default: all)")
    args = ap.parse_args(argv)
    try:
        losses = [float(v) for v in args.losses.split(",")]
    except ValueError:
        ap.error(f"--losses must be comma-separated numbers, got {args.losses!r}")
    if not all(0.0 <= v <= 1.0 for v in losses) or not 0.0 <= args.max_concealed <= 1.0:
        ap.error("loss rates and --max-concealed must lie in [0, 1]")
    if args.samples is not None and args.samples < 1:
        ap.error("--samples must be at least 1")
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    rows = run(losses, args.max_concealed, args.seed, args.samples)
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} ({len(rows)} rows, {rows[0]['samples']} samples, "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
