"""Code token features with a codec for ``(C, H, W)`` maps (``"token-map"``).

A ViT's tokens are a class token (or a few leading tokens) followed by one token per
patch of a ``h x w`` grid. :class:`TokenMapCodec` lays them out as a map the convolutional
codecs can code: the patch tokens keep their grid (channels = the token width ``D``), the
leading tokens fill the next row(s), and rows of zeros pad the height to a multiple of
``multiple`` (the inner codec's stride). The inner codec (``"factorized"`` by default,
any registered ``chw`` codec) codes that map; its streams are re-labelled with this
codec's name and fingerprint, so a stream decodes only with the configuration that wrote
it. This is the baseline the token codecs are measured against in
``experiments/rd_vit_cifar10.json``: a map codec on reshaped tokens.

Example
-------
>>> import torch
>>> codec = TokenMapCodec((17, 8), inner="quant", inner_kwargs={"bits": 8}).eval()
>>> codec.map_shape
(8, 6, 4)
>>> h = torch.randn(2, 17, 8)
>>> codec.fit(h).update()
False
>>> float((codec.decompress(codec.compress(h)) - h).abs().max()) < 0.05
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flowcodec.bitstream import Bitstream, Header
from flowcodec.codecs.base import CodecOutput, FeatureCodec, build_codec, register_codec
from flowcodec.errors import ConfigError
from flowcodec.shapes import FeatureShape

__all__ = ["TokenMapCodec"]


class _ToMap(nn.Module):
    def __init__(self, codec: TokenMapCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, h):
        return self.codec.to_map(h)


@register_codec("token-map")
class TokenMapCodec(FeatureCodec):
    """Tokens ``(N, D)`` = ``first`` leading tokens + a ``grid`` of patch tokens, coded as
    a ``(D, H', W)`` map by the registered codec ``inner`` (built with ``inner_kwargs``).

    Parameters
    ----------
    feature_shape : (N, D)
    inner : str
        A registered codec for ``(C, H, W)`` features.
    inner_kwargs : dict
        Its constructor arguments.
    grid : (h, w), optional
        The patch grid (default: square, ``h = w = sqrt(N - first)``).
    first : int
        Leading tokens before the grid (a class token: 1).
    multiple : int
        The map's height is padded to a multiple of this (the inner codec's stride).
    """

    layouts = ("tokens",)

    def __init__(self, feature_shape: Sequence[int], inner: str = "factorized",
                 inner_kwargs: dict | None = None, grid: Sequence[int] | None = None,
                 first: int = 1, multiple: int = 2) -> None:  # fmt: skip
        super().__init__(feature_shape)
        if len(self.feature_shape) != 2:
            raise ConfigError(f"token-map takes (N, D) tokens, got {self.feature_shape}")
        n, d = self.feature_shape
        if not isinstance(first, int) or not 0 <= first < n:
            raise ConfigError(f"first must be an int in 0..{n - 1}, got {first!r}")
        if grid is None:
            side = math.isqrt(n - first)
            grid = (side, side)
        gh, gw = (int(g) for g in grid)
        if gh < 1 or gw < 1 or gh * gw != n - first:
            raise ConfigError(f"grid {tuple(grid)} does not hold the {n - first} tokens after "
                              f"the first {first}; pass grid=(h, w)")  # fmt: skip
        if not isinstance(multiple, int) or multiple < 1:
            raise ConfigError(f"multiple must be a positive int, got {multiple!r}")
        rows = gh + -(-first // gw)
        rows = -(-rows // multiple) * multiple
        if gw % multiple:
            raise ConfigError(f"the grid width {gw} is not a multiple of {multiple}")
        self.grid, self.first, self.multiple = (gh, gw), first, multiple
        self.map_shape = (d, rows, gw)
        self.inner_name, self.inner_kwargs = inner, dict(inner_kwargs or {})
        self.inner = build_codec(inner, FeatureShape(self.map_shape, "chw"), **self.inner_kwargs)

    def config(self) -> dict:
        return {**super().config(), "inner": self.inner.config(), "grid": list(self.grid),
                "first": self.first, "multiple": self.multiple}  # fmt: skip

    # --- layout ----------------------------------------------------------------------------
    def to_map(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` -> map ``(B, D, H', W)``."""
        b, n, d = h.shape
        (gh, gw), f = self.grid, self.first
        lead = torch.zeros(b, self.map_shape[1] * gw - gh * gw, d, dtype=h.dtype, device=h.device)
        lead[:, :f] = h[:, :f]
        seq = torch.cat([h[:, f:], lead], 1)  # patches in row order, then the leading tokens
        return seq.transpose(1, 2).reshape(b, d, self.map_shape[1], gw)

    def to_tokens(self, m: torch.Tensor) -> torch.Tensor:
        """Map ``(B, D, H', W)`` -> tokens ``(B, N, D)``."""
        b, d = m.shape[:2]
        (gh, gw), f = self.grid, self.first
        seq = m.reshape(b, d, -1).transpose(1, 2)
        return torch.cat([seq[:, gh * gw: gh * gw + f], seq[:, : gh * gw]], 1)

    # --- the codec calls -------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module | None:
        enc = self.inner.encoder
        return nn.Sequential(_ToMap(self), enc) if enc is not None else None

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> TokenMapCodec:
        super().fit(features)
        self.inner.fit(self.to_map(features.float()))
        return self

    def update(self, force: bool = False) -> bool:
        return self.inner.update(force=force)

    def forward(self, h: torch.Tensor, **kwargs) -> CodecOutput:
        self.check_features(h)
        out = self.inner(self.to_map(h), **kwargs)
        return CodecOutput(self.to_tokens(out.features), out.bits, out.likelihoods)

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        fp = self.fingerprint  # once for the batch
        return [Bitstream(self._relabel(s.header, self.name, fp), s.packets)
                for s in self.inner.compress(self.to_map(h))]  # fmt: skip

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        if isinstance(streams, Bitstream) or not isinstance(streams, Sequence) or not streams:
            self.check_streams(streams, 0)  # raises the named error
        fp, inner_fp = self.fingerprint, self.inner.fingerprint  # once for the batch
        for s in streams:
            self._check_stream(s, fp)
        inner = [Bitstream(self._relabel(s.header, self.inner.name, inner_fp), s.packets)
                 for s in streams]  # fmt: skip
        return self.to_tokens(self.inner.decompress(inner))

    @staticmethod
    def _relabel(header: Header, name: str, fingerprint: bytes) -> Header:
        return Header(name, fingerprint, header.tensors, header.meta, header.flags)
