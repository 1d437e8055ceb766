"""The views picture: a few scenes with each device's window outlined, and what it sees.

Each row is one test image (with the id the benchmark gives it: its position in the test
set; by default evenly spaced over the set, which the ImageFolder copy sorts by class): the
whole scene with every device's window drawn in that device's colour, then each
device's view (its window resized to the model's input size, sensor noise included) framed
in the same colour. It shows what the seeded view generator hands the devices, so a reader
can judge the protocol without running anything (docs/cooperative.md).

``python -m flowcodec.coop.picture --family cifar10 --n 4 --out docs/coop_views.png``
(``--coop PATH`` takes the view config from a cooperative checkpoint).

Example
-------
>>> import torch
>>> from flowcodec.coop.views import ViewConfig, ViewGenerator
>>> x = torch.rand(2, 3, 32, 32)
>>> path = render_views(x, ViewGenerator(ViewConfig()), "/tmp/views.png")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from flowcodec.coop.views import ViewConfig, ViewGenerator
from flowcodec.errors import ConfigError

__all__ = ["COLOURS", "render_views", "add_arguments", "run", "main"]

#: One colour per device position (matplotlib's tab10 order).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _to_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """A normalised image ``(C, H, W)`` as an array ``(H, W, C)`` or ``(H, W)`` in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def render_views(x: torch.Tensor, views: ViewGenerator, path: str | Path,
                 index: torch.Tensor | None = None, mean: Sequence[float] = (0.0,) * 3,
                 std: Sequence[float] = (1.0,) * 3, titles: Sequence[str] | None = None,
                 note: str | None = None) -> Path:
    """Draw scenes ``x`` ``(B, C, H, W)`` (normalised with ``mean`` / ``std``; ids
    ``index``, default ``0..B-1``) with each device's window and view to ``path`` (PNG).
    ``titles``: one caption per scene; ``note``: a line under the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not 1 <= len(x) <= 16:
        raise ConfigError(f"picture: scenes must be (B, C, H, W) with 1 <= B <= 16, got "
                          f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    c = x.shape[1]
    if len(mean) < c or len(std) < c:
        raise ConfigError(f"picture: mean and std need {c} values")
    mean, std = tuple(mean)[:c], tuple(std)[:c]
    index = torch.arange(len(x)) if index is None else index
    v = views(x, index)  # checks x and index
    win = views.windows(index, tuple(x.shape[-2:]))
    b, k_n = v.shape[:2]
    cmap = "gray" if c == 1 else None
    fig, axes = plt.subplots(b, k_n + 1, figsize=(1.55 * (k_n + 1), 1.65 * b + 0.3),
                             squeeze=False)
    for i in range(b):
        ax = axes[i, 0]
        ax.imshow(_to_image(x[i], mean, std), cmap=cmap, vmin=0, vmax=1,
                  interpolation="nearest")
        for k in range(k_n):
            top, left, h, w = win[i, k].tolist()
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, lw=1.6,
                                   ec=COLOURS[k % len(COLOURS)], ls=("-", "--", "-.", ":")[k % 4]))
        ax.set_title(titles[i] if titles else f"scene {int(index[i])}", fontsize=8)
        for k in range(k_n):
            ax = axes[i, k + 1]
            ax.imshow(_to_image(v[i, k], mean, std), cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_edgecolor(COLOURS[k % len(COLOURS)])
                spine.set_linewidth(2.5)
            if i == 0:
                ax.set_title(f"device {k}", fontsize=8, color=COLOURS[k % len(COLOURS)])
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to ``p``."""
    p.add_argument("--family", default="cifar10", help="data set whose test images are shown")
    p.add_argument("--n", type=int, default=4,
                   help="test images, evenly spaced over the test set (1..16)")
    p.add_argument("--coop", default=None,
                   help="take the view config from this cooperative checkpoint")
    p.add_argument("--devices", type=int, default=4, help="device positions K (without --coop)")
    p.add_argument("--area", type=float, default=ViewConfig.area, help="window area share")
    p.add_argument("--jitter", type=float, default=ViewConfig.jitter, help="window jitter")
    p.add_argument("--noise", type=float, default=ViewConfig.noise, help="sensor noise")
    p.add_argument("--view-seed", type=int, default=0, help="view seed")
    p.add_argument("--out", default="docs/coop_views.png", help="the PNG to write")


def main(argv=None) -> int:
    """``python -m`` entry point."""
    p = argparse.ArgumentParser(prog="python -m flowcodec.coop.picture",
                                description="Draw test scenes with each device's window and "
                                            "view (docs/cooperative.md).")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Render the picture for parsed options ``a``."""
    from flowcodec.data import load_dataset

    if a.coop:
        from flowcodec.coop.finetune import read_coop_record

        vcfg, _ = read_coop_record(a.coop)
    else:
        vcfg = ViewConfig(devices=a.devices, area=a.area, jitter=a.jitter, noise=a.noise,
                          seed=a.view_seed)
    if not 1 <= a.n <= 16:
        raise ConfigError(f"picture: between 1 and 16 images, got {a.n}")
    _, test = load_dataset(a.family)
    ids = torch.arange(a.n) * len(test) // a.n
    x = test.normalize(test.images[ids])
    y = test.labels[ids]
    names = test.classes or [str(i) for i in range(int(y.max()) + 1)]
    titles = [f"test image {int(i)}: {names[int(c)]}" for i, c in zip(ids, y)]
    rec = vcfg.record()
    note = (f"{rec['devices']} devices, area {rec['area']}, jitter {rec['jitter']}, "
            f"noise {rec['noise']}, seed {rec['seed']}; views shown at the model's input size")
    path = render_views(x, ViewGenerator(vcfg), a.out, index=ids, mean=test.mean,
                        std=test.std, titles=titles, note=note)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
