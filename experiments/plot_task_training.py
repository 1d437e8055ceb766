"""Loss curves of the task codecs: one figure per shipped task codec.

    python -m experiments.plot_task_training --out docs/img

Reads the training history stored in each ``flowcodec/zoo/codecs/*.json`` whose codec is
``"task"`` (or a ``runs/*.progress.json`` of a run still training, with ``--progress``) and
draws, per epoch: the task and distillation losses, the estimated bytes per image of every
rate point, and the accuracy of every rate point on the 1,000 held-out test images the
training script monitors (forward pass, rounded latents).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(history: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    rates = sorted({int(k[7:]) for h in history for k in h if k.startswith("kbits_r")})
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["task"] for h in history], label="task (cross-entropy)")
    ax[0].plot(ep, [h["kd"] for h in history], label="logit distillation")
    ax[0].plot(ep, [h["distill"] for h in history], label="feature term")
    ax[0].set_xlabel("epoch")
    ax[0].set_title("training losses")
    ax[0].legend()
    for r in rates:
        ax[1].plot(ep, [125 * h.get(f"kbits_r{r}", float("nan")) for h in history],
                   label=f"rate point {r}")  # fmt: skip
        ev = [(h["epoch"], e) for h in history for e in h.get("eval", []) if e["rate"] == r]
        ax[2].plot([e for e, _ in ev], [100 * x["accuracy"] for _, x in ev], label=f"r{r}")
    ax[1].set_title("estimated payload (training, noisy latents), B/image")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    ax[2].set_title("held-out accuracy (1,000 test images), %")
    ax[2].set_xlabel("epoch")
    ax[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from flowcodec.codecs.zoo import CODEC_ZOO

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--progress", nargs="*", default=[], help="runs/*.progress.json files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for p in sorted(CODEC_ZOO.glob("*.json")):
        d = json.loads(p.read_text())
        extra = d.get("extra", {})
        if d.get("config", {}).get("name") == "task" and "train" in extra \
                and "derived_from" not in extra:  # variants share their parent's training
            sources.append((p.stem, d["extra"]["train"]["history"]))
    for p in args.progress:
        sources.append((Path(p).name.split(".")[0] + " (in progress)",
                        json.loads(Path(p).read_text())["history"]))  # fmt: skip
    for name, hist in sources:
        path = out / f"train_{name.split(' ')[0]}.png"
        plot(hist, name, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
