"""Loss curves of the shipped CIFAR-10 codecs (from the histories saved in their JSON).

    python -m experiments.plot_codec_training --out docs/img/codecs_loss.png

A codec continued from another (``extra.finetune.from``) is drawn as its ancestors'
curves followed by its own epochs, so each line is one codec's whole training.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowcodec.codecs.zoo import CODEC_ZOO, list_pretrained

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/img/codecs_loss.png")
    args = ap.parse_args(argv)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    def lineage(name: str) -> list[dict]:
        extra = json.loads((CODEC_ZOO / f"{name}.json").read_text())["extra"]
        ft = extra.get("finetune")
        if not ft:
            return list(extra.get("history", []))
        return lineage(ft["from"]) + list(ft["history"])

    for name in list_pretrained():
        hist = lineage(name)
        if not hist:
            continue
        ep = list(range(1, len(hist) + 1))
        label = name.removeprefix("cifar10-")
        for ax, key in zip(axes, ("task", "distill", "kbits")):
            ax.plot(ep, [h[key] for h in hist], "o-", ms=3, label=label)
    titles = ("task loss (CE of member 3)", "distillation (MSE / mean square)",
              "estimated rate (kbit / image)")  # fmt: skip
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("epoch (GPU run, then CPU continuations; train set)")
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
