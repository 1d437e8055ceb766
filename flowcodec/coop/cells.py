"""Spatial edge fusion: devices send a small grid of cells, the edge places them by anchor.

With ``CoopConfig(cells=c)``, ``c > 1``, a device max-pools its exit-stem feature map to a
``c x c`` grid instead of one vector and codes ``latent`` numbers per cell (the TaskCodec's
``grid``: a 1x1 convolution per cell, one factorized entropy model per latent channel
shared by its cells). The edge (:class:`CellFusion`) knows where each device looks: its
*anchor* (:data:`~flowcodec.coop.views.N_ANCHORS` positions of the view generator's window
corners; a camera's anchor is fixed, so it is sent once per session, not per sample), and

- maps each arrived cell's ``latent`` numbers to a ``dim``-vector token (a decoder per
  device kind), with a learned embedding of (anchor, cell) added before its second layer;
- scatters the tokens onto a global ``G x G`` grid (``G = 4``): global cell ``g`` is the
  weighted mean of the present tokens, with learned weights ``w[(anchor, cell), g]``
  normalised over the tokens that arrived (a softmax over them; nothing arrived: zero),
  initialised from the geometry of the default windows (a token weighs most where its
  window cell lies);
- adds a learned embedding per global cell and the count embedding (how many devices
  arrived), and a small convolutional decoder maps ``(dim, G, G)`` to the common split
  point's features (``(128, 8, 8)`` for CIFAR-10), which the largest member's tail finishes.

Every step is a sum over tokens whose weights depend only on (anchor, cell): permuting the
devices together with their anchors gives the same answer, and any subset may be missing.

Example
-------
>>> import torch
>>> from flowcodec.coop.fusion import CoopConfig, CoopModel
>>> from flowcodec.family import build_family
>>> fam = build_family("digits").eval()
>>> model = CoopModel(fam, CoopConfig(kinds=("m2",), latent=2, dim=8, hidden=8, cells=2)).eval()
>>> z = model.pooled("m2", torch.rand(3, 1, 8, 8))
>>> lat, bits = model.latent("m2", z)
>>> tuple(z.shape[2:]), tuple(lat.shape)
((2, 2), (3, 8))
>>> out = model.edge([lat, None], ["m2", "m2"], anchors=[8, 0])
>>> tuple(out.logits.shape), out.present.tolist()
((3, 10), [1, 1, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flowcodec.codecs.task_nets import GridDecoder
from flowcodec.coop.fusion import FusionBase
from flowcodec.coop.views import N_ANCHORS, ViewConfig, anchor_corner
from flowcodec.flops import count_flops

__all__ = ["CellFusion", "GLOBAL_GRID", "scatter_prior"]

#: Side of the edge's global grid of cells.
GLOBAL_GRID = 4


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def scatter_prior(cells: int, grid: int = GLOBAL_GRID, area: float = ViewConfig.area,
                  floor: float = 0.02) -> torch.Tensor:
    """Initial scatter logits ``(N_ANCHORS * cells^2, grid^2)``: ``log(share + floor)``,
    ``share`` the part of global cell ``g`` that cell ``p`` of a window of ``area`` (of
    the image, square, at anchor ``a``) covers, at row ``a * cells^2 + p``."""
    side = math.sqrt(area)
    out = torch.empty(N_ANCHORS * cells * cells, grid * grid)
    for a in range(N_ANCHORS):
        ay, ax = anchor_corner(a)
        top, left = ay * (1 - side), ax * (1 - side)
        for p in range(cells * cells):
            i, j = divmod(p, cells)
            r0, c0 = top + i * side / cells, left + j * side / cells
            r1, c1 = r0 + side / cells, c0 + side / cells
            for g in range(grid * grid):
                u, v = divmod(g, grid)
                share = (_overlap(r0, r1, u / grid, (u + 1) / grid)
                         * _overlap(c0, c1, v / grid, (v + 1) / grid) * grid * grid)
                out[a * cells * cells + p, g] = math.log(share + floor)
    return out


class CellFusion(FusionBase):
    """Edge side with cells: per-kind token decoders, an (anchor, cell) embedding, a masked
    normalised scatter onto a ``grid x grid`` map, a count embedding and a convolutional
    decoder to ``common`` features ``(C, H, W)``.

    ``forward(latents, kinds, mask, batch, anchors)``: ``latents`` ``N`` tensors
    ``(B, latent * cells^2)`` (channel-major, as the device's codec decodes them) or None,
    ``kinds`` and ``anchors`` (ids, default the ``N``-device protocol's) per device,
    ``mask`` bool ``(B, N)``. Returns features ``(B, C, H, W)`` and the devices fused, bool
    ``(B, N)``."""

    def __init__(self, kinds: Sequence[str], latent: int, cells: int, dim: int, hidden: int,
                 common: Sequence[int], max_devices: int, grid: int = GLOBAL_GRID) -> None:
        super().__init__()
        self.latent, self.cells, self.dim, self.grid = latent, cells, dim, grid
        self.positions = cells * cells
        self.width = latent * self.positions
        self.max_devices = max_devices
        self.decoders = nn.ModuleDict({k: nn.Linear(latent, dim) for k in kinds})
        self.refine = nn.ModuleDict({
            k: nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU()) for k in kinds})
        self.place = nn.Embedding(N_ANCHORS * self.positions, dim)
        nn.init.normal_(self.place.weight, std=0.1)
        self.scatter = nn.Parameter(scatter_prior(cells, grid))
        self.pos = nn.Parameter(torch.zeros(dim, grid, grid))
        self.count = nn.Embedding(max_devices + 1, dim)
        nn.init.zeros_(self.count.weight)
        self.mix = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.synth = GridDecoder(hidden, grid, tuple(common), nonneg=True)

    def tokens(self, latents, kinds, anchors: torch.Tensor, b: int) -> torch.Tensor:
        """Tokens ``(B, N * cells^2, dim)`` of every device's cells (zeros where None)."""
        dev, p = self.scatter.device, self.positions
        tok = torch.zeros(b, len(latents), p, self.dim, device=dev)
        slots = anchors.to(dev)[:, None] * p + torch.arange(p, device=dev)
        for i, (t, k) in enumerate(zip(latents, kinds)):
            if t is None:
                continue
            cell = t.to(dev).float().view(b, self.latent, p).transpose(1, 2)  # (B, P, latent)
            tok[:, i] = self.refine[k](self.decoders[k](cell) + self.place(slots[i]))
        return tok.flatten(1, 2)

    def weights(self, anchors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Scatter weights ``(B, N * cells^2, grid^2)``: per global cell, a softmax of the
        learned logits over the tokens present (rows of absent tokens and of samples with
        none present: zero)."""
        dev, p = self.scatter.device, self.positions
        slots = (anchors.to(dev)[:, None] * p + torch.arange(p, device=dev)).flatten()
        logit = self.scatter[slots].unsqueeze(0).expand(len(present), -1, -1)
        keep = present.to(dev).repeat_interleave(p, 1).unsqueeze(-1)  # (B, N * P, 1)
        w = torch.softmax(logit.masked_fill(~keep, -1e9), 1)
        return w * keep

    def forward(self, latents, kinds, mask=None, batch=None,
                anchors=None) -> tuple[torch.Tensor, torch.Tensor]:
        b, m = self.check(latents, kinds, mask, batch)
        a = self.check_anchors(anchors, len(latents))
        m = m.to(self.scatter.device)
        tok = self.tokens(latents, kinds, a, b)
        w = self.weights(a, m)
        g = self.grid
        glob = torch.einsum("btg,btd->bdg", w, tok).reshape(b, self.dim, g, g)
        n = m.sum(1)
        glob = glob + self.pos + self.count(n.clamp(max=self.max_devices))[:, :, None, None]
        return self.synth(self.mix(glob).flatten(1)), m

    def flops_parts(self, kinds) -> tuple[int, dict]:
        """Edge FLOPs per sample before the tail: ``(base, {kind: per device})`` (the
        scatter: one multiply-accumulate per token, global cell and channel)."""
        g2, p = self.grid * self.grid, self.positions
        base = (count_flops(self.mix, (self.dim, self.grid, self.grid))
                + count_flops(self.synth, (self.mix[0].out_channels * g2,)))
        return base, {k: count_flops(self.decoders[k], (p, self.latent))
                      + count_flops(self.refine[k], (p, self.dim)) + 2 * p * g2 * self.dim
                      for k in set(kinds)}
