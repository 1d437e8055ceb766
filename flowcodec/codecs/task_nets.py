"""The task codec's networks: the device-side encoder and the receiver-side decoders.

- :class:`TaskEncoder` (device): conv-BN-ReLU stem, pooling, a linear map (or 1x1 convolution)
  to the latent;
- :class:`TaskDecoder` (receiver): a latent vector back to a feature map;
- :class:`GridDecoder` (receiver): a ``(latent, g, g)`` latent map back to a feature map;
- :class:`Lift` (receiver): a later split point's features to an earlier one's shape.

Used by :class:`~flowcodec.codecs.task.TaskCodec` and :class:`~flowcodec.codecs.jscc.JSCCCodec`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flowcodec.family.zoo import Residual

__all__ = ["TaskEncoder", "TaskDecoder", "GridDecoder", "Lift", "stem_entry"]


class TaskEncoder(nn.Module):
    """Device side: ``(B, C, H, W) -> (B, latent)``.

    ``stem`` lists ``(channels, pool)`` for each conv3x3-BN-ReLU block (``pool``: a 2x2
    max-pool after it); the blocks are followed by global max pooling and a linear map.
    """

    def __init__(self, cin: int, stem: Sequence[Sequence], latent: int, grid: int = 1) -> None:
        super().__init__()
        self.grid = grid
        layers: list[nn.Module] = []
        c = cin
        for cout, pool in stem:
            if cout == "res":  # a residual block at constant width (the family's stages)
                layers.append(Residual(c))
                continue
            layers += [nn.Conv2d(c, int(cout), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(cout)), nn.ReLU(inplace=True)]  # fmt: skip
            if pool:
                layers.append(nn.MaxPool2d(2))
            c = int(cout)
        self.stem = nn.Sequential(*layers)
        if grid == 1:  # a vector: global max pool, linear map
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
            self.proj = nn.Linear(c, latent)
        else:  # a small map: max pool to grid x grid, 1x1 convolution
            self.pool = nn.AdaptiveMaxPool2d(grid)
            self.proj = nn.Conv2d(c, latent, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stem(h))).flatten(1)

    @torch.no_grad()
    def load_stem_from(self, module: nn.Module) -> int:
        """Copy the leading conv/BN layers of ``module`` (e.g. a family's exit branch) into
        the stem, in order, where shapes match; returns how many layers were copied."""
        src = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        dst = [m for m in self.stem.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        copied = 0
        for a, b in zip(src, dst):
            if type(a) is not type(b) or a.weight.shape != b.weight.shape:
                break
            b.load_state_dict(a.state_dict())
            copied += 1
        return copied


def stem_entry(entry: Sequence) -> tuple:
    """A stem entry as stored: ``(channels, pool)`` or ``("res", 0)``."""
    a, b = entry
    return ("res", 0) if a == "res" else (int(a), bool(b))


class Lift(nn.Module):
    """Receiver side, after a decoder that rebuilds features of shape ``via`` (a later split
    point's): ``(B, *via) -> (B, *shape)``, a 3x3 convolution, nearest upsampling by the
    ratio of the sides and two 3x3 convolutions, so that the tail from the earlier split
    point can run on them."""

    def __init__(self, via: Sequence[int], shape: Sequence[int], nonneg: bool) -> None:
        super().__init__()
        cv, hv, wv = via
        c, h, w = shape
        self.conv = nn.Sequential(nn.Conv2d(cv, cv, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Upsample(scale_factor=(h // hv, w // wv), mode="nearest"),
                                  nn.Conv2d(cv, c, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1),
                                  *([nn.ReLU()] if nonneg else []))  # fmt: skip

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv(f)


class TaskDecoder(nn.Module):
    """Receiver side: ``(B, latent) -> (B, C, H, W)`` for the larger member's tail."""

    def __init__(self, latent: int, hidden: int, shape: Sequence[int], nonneg: bool) -> None:
        super().__init__()
        c, h, w = shape
        self.base = (c, (h + 1) // 2, (w + 1) // 2)  # odd sides: upsampled to (h, w) exactly
        self.mlp = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, math.prod(self.base)), nn.ReLU(inplace=True),
        )  # fmt: skip
        up = (nn.Upsample(scale_factor=2, mode="nearest") if h % 2 == 0 and w % 2 == 0
              else nn.Upsample(size=(h, w), mode="nearest"))  # fmt: skip
        self.conv = nn.Sequential(*_refine(c, up, nonneg))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv(self.mlp(y).view(len(y), *self.base))


def _refine(c: int, upsample: nn.Module, nonneg: bool) -> list[nn.Module]:
    """Both decoders' last layers: upsampling, two 3x3 convolutions (ReLU if ``nonneg``)."""
    layers: list[nn.Module] = [
        upsample,
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1),
    ]  # fmt: skip
    return layers + [nn.ReLU()] if nonneg else layers



class GridDecoder(nn.Module):
    """Receiver side for a ``(latent, g, g)`` latent map: ``(B, latent * g * g) -> (B, C, H, W)``
    (a 3x3 convolution, nearest upsampling to ``H x W``, two 3x3 convolutions)."""

    def __init__(self, latent: int, grid: int, shape: Sequence[int], nonneg: bool) -> None:
        super().__init__()
        c, h, w = shape
        self.latent, self.grid = latent, grid
        self.conv = nn.Sequential(nn.Conv2d(latent, c, 3, padding=1), nn.ReLU(inplace=True),
                                  *_refine(c, nn.Upsample(size=(h, w), mode="nearest"), nonneg))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv(y.view(len(y), self.latent, self.grid, self.grid))

