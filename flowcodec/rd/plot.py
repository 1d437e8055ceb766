"""The plots of an ``rd`` run: ``rd.png`` and ``channel.png``."""

from __future__ import annotations

import math
from pathlib import Path

from flowcodec.rd.rows import FRAMINGS, RDRow, is_answer_codec

__all__ = ["plot_rd", "plot_channel"]


def plot_rd(rows: list[RDRow], path: Path, title: str = "") -> None:
    """Accuracy vs. bytes per image (log x), one line per codec group.

    Rows of codecs that send the device's answer (``exit-top1``/``exit-topk``) are drawn
    as stars with a dotted horizontal line at their accuracy (the floor a codec at that
    split point has to beat); rows merged from ``--baselines`` are drawn like the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    groups: dict[str, list[RDRow]] = {}
    for r in clean:
        if r.group != "reference":
            groups.setdefault(r.group, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    lo = min((100 * r.accuracy for r in clean), default=0)
    for ax, (key, framing) in zip(axes, FRAMINGS.items()):
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: getattr(r, key))
            dev = f"device {max(r.device_flops_pct for r in rs):.0f}% FLOPs"
            if all(is_answer_codec(r.codec) for r in rs):
                (line,) = ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs],
                                  "*", ms=10, label=f"{g} ({dev})")  # fmt: skip
                for acc in sorted({r.accuracy for r in rs}):
                    ax.axhline(100 * acc, color=line.get_color(), ls=":", lw=1)
                continue
            ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs], "o-",
                    label=f"{g} ({dev})", ms=4)  # fmt: skip
        if ref is not None:
            ax.axhline(100 * ref.accuracy, color="k", ls="--", lw=1,
                       label=f"uncompressed member ({100 * ref.accuracy:.2f}%)")
            ax.axhline(100 * ref.accuracy - 1, color="gray", ls=":", lw=1,
                       label="1 point below")  # fmt: skip
        ax.set_xscale("log")
        what = "header in every sample" if key == "bytes_per_image" else "header once per session"
        ax.set_xlabel(f"bytes per image (measured, {framing} framing: {what})")
        ax.set_ylim(max(0, lo - 2), 100)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_channel(rows: list[RDRow], path: Path) -> None:
    """Accuracy per codec under each channel condition (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r.label for r in rows if r.condition != "clean"})
    conds = ["clean"] + sorted({r.condition for r in rows if r.condition != "clean"})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(conds))
    for j, c in enumerate(conds):
        vals = []
        for lab in labels:
            r = next((r for r in rows if r.label == lab and r.condition == c), None)
            vals.append(100 * r.accuracy if r else math.nan)
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=c)
    ax.set_xticks([i + width * (len(conds) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
