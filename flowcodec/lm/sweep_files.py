"""The files of ``flowcodec lm sweep``: its CSV columns, JSON, generated samples and plots."""

from __future__ import annotations

import math
from pathlib import Path

from flowcodec.sweeps.runner import write_csv, write_json

__all__ = ["FIELDS", "write_sweep", "plot_sweep"]

#: The CSV's columns, in order.
FIELDS = ["label", "scheme", "gamma", "threshold", "rtt_ms", "up_kbps", "down_kbps", "loss",
          "mcs", "snr_db", "tokens_per_s", "predicted_tokens_per_s", "ms_per_token",
          "bytes_up_per_token", "bytes_down_per_token", "bytes_per_token",
          "bytes_sent_per_token", "codec_bytes_per_token", "retransmissions_per_token",
          "round_trips_per_token",
          "edge_passes_per_token", "device_passes_per_token", "edge_token_fraction",
          "acceptance", "tokens_per_round", "agreement", "identical_prefix",
          "identical_outputs", "val_loss_nats", "val_edge_fraction", "device_ms_per_token",
          "edge_ms_per_token", "min_margin", "prompts", "tokens"]  # fmt: skip


def write_sweep(result: dict, out: Path) -> None:
    """Write a sweep's result to the folder ``out``: ``sweep.csv`` (columns :data:`FIELDS`),
    ``sweep.json``, ``samples.txt`` (the text each scheme generated from one prompt) and the
    plots (``tokens_per_s.png``, ``bytes_per_token.png``, ``quality.png``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", result["records"], fields=FIELDS, digits=6)
    write_json(out / "sweep.json", result)
    s = result["samples"]
    text = [f"prompt (validation offset {s['prompt_offset']}):", s["prompt"], ""]
    for label, gen in s["outputs"].items():
        text += [f"--- {label} ---", gen, ""]
    (out / "samples.txt").write_text("\n".join(text))
    plot_sweep(result, out)


def plot_sweep(result: dict, out: Path) -> None:
    """The sweep's plots, as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    recs = result["records"]
    labels = list(dict.fromkeys(r["label"] for r in recs))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    marks = {lab: "os^Dv<>ph*"[i % 10] for i, lab in enumerate(labels)}

    def key(r):
        return r["up_kbps"], r["down_kbps"], r["loss"], r["mcs"]

    families = list(dict.fromkeys(key(r) for r in recs))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    cols = min(2, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(families) :]:
        ax.set_visible(False)
    for ax, fam in zip(axes.flat, families):
        rows = [r for r in recs if key(r) == fam]
        modelled = False
        for lab in labels:
            pts = sorted((r["rtt_ms"], r["tokens_per_s"], r["predicted_tokens_per_s"])
                         for r in rows if r["label"] == lab)  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marks[lab], ms=3,
                    color=colors[lab], label=lab)  # fmt: skip
            if all(p[2] != "" for p in pts):
                modelled = True
                ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", lw=0.9,
                        color=colors[lab])  # fmt: skip
        up, down, loss, mcs = fam
        rate = f"{up:g}" + (f"/{down:g}" if down != up else "")
        what = f", MCS {mcs}" if mcs != "" else f", loss {loss:g}" if loss else ""
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(yscale="log", xlabel="round-trip delay (ms)", ylabel="tokens per second",
               title=f"{rate} kbit/s{what}" + (" (dashed: cost model)" if modelled else ""))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=100)
    plt.close(fig)
    # bytes, round trips and edge passes per token at the first link (they do not depend
    # on the delay); what a lossy link carried with retransmissions, if there is one
    t0 = recs[0]["rtt_ms"]
    first = [r for r in recs if key(r) == families[0] and r["rtt_ms"] == t0]
    lossy = next((f for f in families if f[2] or f[3] != ""), None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    x = list(range(len(first)))
    up = [r["bytes_up_per_token"] for r in first]
    down = [r["bytes_down_per_token"] for r in first]
    a1.bar(x, up, label="up")
    a1.bar(x, down, bottom=up, label="down")
    if lossy is not None:
        sent = {r["label"]: r["bytes_sent_per_token"] for r in recs
                if key(r) == lossy and r["rtt_ms"] == t0}  # fmt: skip
        what = f"MCS {lossy[3]}" if lossy[3] != "" else f"loss {lossy[2]:g}"
        a1.scatter(x, [sent[r["label"]] for r in first], marker="_", s=250, color="k",
                   label=f"sent at {what}, with retransmissions", zorder=3)  # fmt: skip
    a1.set(ylabel="bytes per token", title="link bytes per generated token",
           ylim=(0, 1.3 * max(max(u + d for u, d in zip(up, down)), 1e-9)))  # fmt: skip
    a2.bar([i - 0.2 for i in x], [r["round_trips_per_token"] for r in first], 0.4,
           label="round trips")  # fmt: skip
    a2.bar([i + 0.2 for i in x], [r["edge_passes_per_token"] for r in first], 0.4,
           label="edge passes")  # fmt: skip
    a2.set(ylabel="per token", title="round trips and edge passes per token")
    for a in (a1, a2):
        a.set_xticks(x, [r["label"] for r in first], rotation=35, ha="right", fontsize=8)
        a.legend(fontsize=8, loc="upper center", ncol=3)
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "bytes_per_token.png", dpi=120)
    plt.close(fig)
    # quality against bytes
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for r in first:
        for ax, y in ((a1, 100 * r["agreement"]), (a2, r["val_loss_nats"])):
            if y != "":  # a scheme without a teacher-forced loss has no point on the right
                ax.scatter(r["bytes_per_token"], y, color=colors[r["label"]],
                           marker=marks[r["label"]], s=40, label=r["label"], alpha=0.85)
    a1.set(xlabel="bytes per token (up + down)", ylabel="tokens equal to edge-only's (%)",
           title="agreement with edge-only greedy output")  # fmt: skip
    a2.set(xlabel="bytes per token (up + down)", ylabel="nats per character",
           title="teacher-forced validation loss")  # fmt: skip
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
