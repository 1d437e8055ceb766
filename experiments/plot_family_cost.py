"""Accuracy against FLOPs of every member of one or more trained families, with the training
curve of each (read from the checkpoints' JSON records; nothing is recomputed).

    python -m experiments.plot_family_cost flowcodec/zoo/cifar10-family \\
        runs/air/cifar10-air-family --out docs/img/family_cost.png

The left panel puts each member at its test accuracy (one view, the full test set, as
recorded) and its MFLOPs per image; a dashed line joins a family's members. The right panel
is each member's test accuracy after every epoch, where the record holds a history.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _record(stem: str) -> dict:
    p = Path(stem)
    p = p if p.suffix == ".json" else p.parent / f"{p.name}.json"
    return json.loads(p.read_text())


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="+", help="checkpoint stems (PATH.json is read)")
    ap.add_argument("--out", default="docs/img/family_cost.png")
    args = ap.parse_args(argv)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stem in args.families:
        rec = _record(stem)
        name = rec["config"].get("name", Path(stem).name)
        extra = rec.get("extra", {})
        accs = extra.get("test_accuracy") or []
        mf = [m["flops"] / 1e6 for m in extra.get("members", [])][: len(accs)]
        acc = [100 * a for a in accs]
        line = a0.plot(mf, acc, "o--", label=name)[0]
        for i, (x, y) in enumerate(zip(mf, acc), start=1):
            a0.annotate(f"{name} m{i}: {y:.2f} %", (x, y), textcoords="offset points",
                        xytext=(5, -10 if i % 2 else 4), fontsize=7, color=line.get_color())
        hist = [h for h in extra.get("history", []) if "test_acc" in h]
        for i in range(len(acc)):
            if hist:
                a1.plot([h["epoch"] for h in hist], [100 * h["test_acc"][i] for h in hist],
                        ("-", "--", ":")[i % 3], marker=".", color=line.get_color(),
                        label=f"{name} member {i + 1}")  # fmt: skip
    a0.set_xlabel("MFLOPs per image (2 per multiply-accumulate)")
    a0.set_ylabel("test accuracy, one view (%)")
    a0.set_title("members: accuracy against cost")
    a0.grid(alpha=0.3)
    a0.legend(fontsize=8, loc="lower right")
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (%)")
    a1.set_title("training curves (where recorded)")
    a1.grid(alpha=0.3)
    if a1.lines:
        a1.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
