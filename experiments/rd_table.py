"""Markdown tables of an ``flowcodec rd`` run (what docs/codecs.md shows).

    python -m experiments.rd_table runs/rd_cifar10

Prints the rows of ``rd.json`` (accuracy, bytes in both framings, payload, likelihood
estimate, coder overhead, device FLOPs) and the target comparison of
``flowcodec.rd.compare``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def main(argv=None) -> int:
    from flowcodec.rd import RDRow, compare

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", help="output folder of flowcodec rd")
    args = ap.parse_args(argv)
    rows = [RDRow(**r) for r in json.loads((Path(args.run) / "rd.json").read_text())["rows"]]
    print("| codec | condition | accuracy % | bytes/image (self-contained) | bytes/image "
          "(session) | payload B | estimate B | payload vs estimate | device FLOPs % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        over = "" if r.coder_overhead_pct is None else f"{r.coder_overhead_pct:+.1f}%"
        print(f"| {r.label} | {r.condition} | {100 * r.accuracy:.2f} | {r.bytes_per_image:.1f} "
              f"| {r.session_bytes:.1f} | {r.payload_bytes:.1f} | {_f(r.est_bytes, '.1f')} "
              f"| {over} | {r.device_flops_pct:.1f} |")
    print()
    print("| learned codec | framing | accuracy % | points below uncompressed | bytes | "
          "cheapest input row at least as accurate | its bytes | ratio | ratio to float32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in compare(rows):
        print(f"| {c.label} | {c.framing} | {100 * c.accuracy:.2f} | {c.gap_points:.2f} "
              f"| {c.bytes:.1f} | {c.input_label or 'none'} | {_f(c.input_bytes, '.1f')} "
              f"| {_f(c.input_ratio, '.3f')} | {_f(c.float32_ratio, '.4f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
