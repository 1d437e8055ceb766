"""The plots of an ``snr`` run: ``snr.png`` and ``uses.png``."""

from __future__ import annotations

import json
from pathlib import Path

from flowcodec.snr.rows import SNRRow

__all__ = ["plot", "replot"]


def plot(rows: list[SNRRow], cfg: dict, out: Path) -> None:
    """``snr.png`` (accuracy vs SNR per channel) and ``uses.png`` (accuracy vs uses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in rows if r.scheme == "reference"), None)
    chans = cfg["channels"]
    fig, axes = plt.subplots(1, len(chans), figsize=(5.5 * len(chans), 4.2), squeeze=False)
    big = max(cfg["budgets"])
    # fast-link budgets drawn: those also run on the exact link, and the largest
    shown = set((cfg.get("digital") or {}).get("exact_budgets", [])) | {big}
    for ax, ch in zip(axes[0], chans):
        series: dict[str, list] = {}
        for r in rows:
            if r.channel != ch:
                continue
            if r.scheme == "jscc":
                key = f"{r.label} ({r.detail}{', ' + r.link if r.link != 'analog' else ''})"
            elif r.budget in shown or r.link == "exact":
                key = f"{r.label} {r.link} link, <= {r.budget} uses"
            else:
                continue
            series.setdefault(key, []).append((r.snr_db, 100 * r.accuracy))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    "--" if "link" in key else "-", marker="o", ms=3, label=key)  # fmt: skip
        if ref:
            ax.axhline(100 * ref.accuracy, color="k", lw=0.8, ls=":", label=ref.label)
        ax.set(title=ch, xlabel="SNR (Es/N0, dB)", ylabel="accuracy %", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(cfg.get("title", "accuracy against SNR"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "snr.png", dpi=130)
    plt.close(fig)
    snrs = cfg.get("uses_plot_snrs") or cfg["snrs"][:1]
    fig, axes = plt.subplots(1, len(snrs), figsize=(5 * len(snrs), 4), squeeze=False)
    ch = chans[0]
    for ax, s in zip(axes[0], snrs):
        series = {}
        for r in rows:
            if r.channel != ch or r.snr_db != s or (r.scheme == "jscc" and r.budget is None):
                continue
            if r.scheme == "jscc" and r.told_snr_db is None:
                series.setdefault(f"{r.label} ({r.link})", []).append((r.uses, 100 * r.accuracy))
            elif r.scheme == "separation" and r.link == "fast":
                series.setdefault(f"{r.label} (fast link)", []).append((r.budget,
                                                                       100 * r.accuracy))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        if ref:
            ax.axhline(100 * ref.accuracy, color="k", lw=0.8, ls=":", label=ref.label)
        ax.set(title=f"{ch}, {s:g} dB", xlabel="complex channel uses per image",
               ylabel="accuracy %", xscale="log", ylim=(0, 100))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "uses.png", dpi=130)
    plt.close(fig)


def replot(run: str | Path) -> None:
    """Redraw ``snr.png`` and ``uses.png`` of a finished run from its ``snr.json``."""
    rec = json.loads((Path(run) / "snr.json").read_text())
    plot([SNRRow(**r) for r in rec["rows"]], rec["config"], Path(run))
