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
from torch.nn import functional as F

from flowcodec.family.zoo import Residual

__all__ = ["TaskEncoder", "TaskDecoder", "GridDecoder", "Lift", "stem_entry", "run_fast"]


# --- the receiver's inference path ------------------------------------------------------------
# ``decompress`` runs the decoders through :func:`run_fast`: the same layers, in channels-last
# memory (what the CPU's convolution kernels work in, so no layout conversion per layer), with
# every "nearest 2x upsampling, then a 3x3 convolution" pair computed as one stride-2
# transposed convolution on the small map. That is the same linear map: output pixel
# ``(2i + a, 2j + b)`` of the convolution sees input pixels ``i - 1, i`` (``a = 0``) or
# ``i, i + 1`` (``a = 1``) of the small map along each side, with the 3x3 kernel's taps that
# land on the same small pixel summed; so the outputs differ only by float rounding, and
# the work is 16 instead of 36 multiply-adds per small pixel and channel pair.


def _upsample2(m: nn.Module) -> bool:
    if not isinstance(m, nn.Upsample) or m.mode != "nearest" or m.size is not None:
        return False
    f = m.scale_factor
    return all(float(v) == 2.0 for v in (f if isinstance(f, tuple) else (f, f)))


def _conv3(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros"
            and m.weight.dtype in (torch.float32, torch.float64))  # fmt: skip


def upsample_conv_kernel(w: torch.Tensor) -> torch.Tensor:
    """The 4x4 kernel ``(in, out, 4, 4)`` of the stride-2, padding-1 transposed convolution
    equal to nearest 2x upsampling followed by a 3x3 convolution (padding 1) with weights
    ``w`` ``(out, in, 3, 3)``: along each side, taps ``[w2, w1 + w2, w0 + w1, w0]``."""

    def side(t: torch.Tensor, d: int) -> torch.Tensor:
        tap = [t.narrow(d, i, 1) for i in range(3)]
        return torch.cat([tap[2], tap[1] + tap[2], tap[0] + tap[1], tap[0]], d)

    return side(side(w, 2), 3).transpose(0, 1).contiguous()


def _fused_kernel(conv: nn.Conv2d) -> torch.Tensor:
    if torch.is_grad_enabled() and conv.weight.requires_grad:  # differentiable, not cached
        return upsample_conv_kernel(conv.weight)
    key = (conv.weight.data_ptr(), conv.weight._version, conv.weight.device, conv.weight.dtype)
    cached = conv.__dict__.get("_flowcodec_up2")
    if cached is None or cached[0] != key:
        kernel = upsample_conv_kernel(conv.weight.detach())
        cached = conv.__dict__["_flowcodec_up2"] = (key, kernel)
    return cached[1]


def run_fast(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` for inference (eval mode): channels-last memory, and each nearest 2x
    upsampling followed by a 3x3 convolution as one transposed convolution (the same map up
    to float rounding; see above). Returns a channels-last tensor."""
    mods = list(seq)
    x = x.contiguous(memory_format=torch.channels_last)
    i = 0
    while i < len(mods):
        if i + 1 < len(mods) and _upsample2(mods[i]) and _conv3(mods[i + 1]) \
                and x.dtype == mods[i + 1].weight.dtype:  # fmt: skip
            conv = mods[i + 1]
            x = F.conv_transpose2d(x, _fused_kernel(conv), conv.bias, stride=2, padding=1)
            i += 2
            continue
        x = mods[i](x)
        i += 1
    return x


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

    def fast(self, f: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for inference, through :func:`run_fast` (channels-last out)."""
        return run_fast(self.conv, f)


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

    def fast(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for inference, through :func:`run_fast` (channels-last out)."""
        return run_fast(self.conv, self.mlp(y).view(len(y), *self.base))


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

    def fast(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for inference, through :func:`run_fast` (channels-last out)."""
        return run_fast(self.conv, y.view(len(y), self.latent, self.grid, self.grid))

