"""Quantisation baselines: uniform k-bit quantisation, and PCA projection plus quantisation.

- :class:`QuantCodec` (``"quant"``): each channel is clipped to a range fitted on training
  features (low/high percentiles), quantised uniformly to ``bits`` bits and coded
  losslessly with zstd, one packet per channel group.
- :class:`PCACodec` (``"pca"``): each spatial position's channel vector is projected
  onto the top ``rank`` principal components fitted on training features (a 1x1
  convolution on the device), and the coefficients are quantised and coded as above.

Both must be fitted (``fit(features)``) before ``compress``; a lost packet's channels are
concealed by the training mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, channel_groups, register_codec
from flowcodec.errors import ConfigError

__all__ = ["QuantCodec", "PCACodec", "uniform_quantize"]


def uniform_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Integer levels ``0..2**bits-1`` of ``x`` clipped to ``[lo, hi]`` (broadcast)."""
    levels = (1 << bits) - 1
    scale = (hi - lo).clamp_min(1e-8) / levels
    # nan_to_num: a projection of huge finite features can overflow to inf - inf = NaN
    q = torch.nan_to_num((x - lo) / scale, nan=0.0, posinf=levels, neginf=0.0)
    return torch.round(q.clamp(0, levels)).to(torch.int64), scale


def _zstd_compress(data: bytes, level: int) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress(data)


def _zstd_decompress(data: bytes, size: int) -> bytes:
    """The ``size`` bytes a zstd frame holds, never allocating more than about ``2 * size``.

    python-zstandard's one-shot ``decompress`` allocates whatever content size the frame
    header declares (``max_output_size`` is ignored when a size is declared), so a hostile
    12-byte frame could ask for terabytes. Here the frame header is read first (it must
    declare exactly ``size``), the window the decoder may allocate is capped by ``size``,
    and the output is read through a stream with a bounded ``read``.
    """
    import io

    import zstandard

    try:
        params = zstandard.get_frame_parameters(bytes(data))
    except (zstandard.ZstdError, ValueError, TypeError) as e:
        raise BitstreamError(f"zstd payload has no valid frame header: {e}") from e
    if params.content_size != size:
        raise BitstreamError(f"zstd frame declares {params.content_size} bytes, expected {size}")
    window = 1 << max(zstandard.WINDOWLOG_MIN, (max(size, 1) - 1).bit_length())
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        with dctx.stream_reader(io.BytesIO(bytes(data))) as reader:
            out = reader.read(size + 1)
    except (zstandard.ZstdError, ValueError, OverflowError, MemoryError) as e:
        raise BitstreamError(f"zstd payload does not decode: {e}") from e
    if len(out) != size:
        raise BitstreamError(f"zstd payload holds {len(out)} bytes, expected {size}")
    return out


class _Quantised(FeatureCodec):
    """Shared part: quantise a ``(B, K, H, W)`` tensor per channel and zstd-code groups."""

    def __init__(self, feature_shape: Sequence[int], bits: int, packets: int, level: int,
                 coded_channels: int, percentile: float) -> None:  # fmt: skip
        super().__init__(feature_shape)
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"bits must be an int in 1..8, got {bits!r}")
        if not 0 <= percentile < 50:
            raise ConfigError("percentile must be in [0, 50)")
        self.bits, self.level, self.percentile = bits, int(level), float(percentile)
        self.k = int(coded_channels)
        self.groups = channel_groups(self.k, packets)
        self.register_buffer("lo", torch.zeros(self.k))
        self.register_buffer("hi", torch.ones(self.k))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def config(self) -> dict:
        return {**super().config(), "bits": self.bits, "packets": len(self.groups),
                "level": self.level, "percentile": self.percentile}  # fmt: skip

    # subclasses map features <-> the coded tensor (B, K, *rest)
    def _to_coded(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def _from_coded(self, c: torch.Tensor) -> torch.Tensor:
        return c

    def _fit_range(self, c: torch.Tensor) -> None:
        flat = c.transpose(0, 1).reshape(self.k, -1).float()
        if flat.shape[1] > 200_000:
            idx = torch.linspace(0, flat.shape[1] - 1, 200_000).long()
            flat = flat[:, idx]
        q = torch.tensor([self.percentile / 100, 1 - self.percentile / 100])
        lohi = torch.quantile(flat, q, dim=1)
        self.lo.copy_(lohi[0])
        self.hi.copy_(torch.maximum(lohi[1], lohi[0] + 1e-6))
        self.fitted.fill_(True)

    def _bounds(self, ndim: int):
        shape = (1, self.k) + (1,) * (ndim - 2)
        return self.lo.view(shape), self.hi.view(shape)

    def _quant(self, c: torch.Tensor):
        lo, hi = self._bounds(c.ndim)
        q, scale = uniform_quantize(c, lo, hi, self.bits)
        return q, lo, scale

    def forward(self, h: torch.Tensor) -> CodecOutput:
        """Quantise and dequantise; ``bits`` is the fixed-length size (before zstd)."""
        self.check_features(h)
        c = self._to_coded(h)
        q, lo, scale = self._quant(c)
        bits = torch.full((len(h),), float(self.bits * c[0].numel()))
        return CodecOutput(self._from_coded(q.float() * scale + lo), bits, {})

    def _require_fit(self) -> None:
        if not bool(self.fitted):
            raise ConfigError(f"{self.name}: call fit(training_features) before compress")

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        self._require_fit()
        q, _, _ = self._quant(self._to_coded(h.float().cpu()))
        arr = q.to(torch.uint8).numpy()
        header = self.make_header(tensors=[TensorSpec("float32", self.feature_shape)])
        return [Bitstream(header, [_zstd_compress(a[g].tobytes(), self.level)
                                   for g in self.groups]) for a in arr]  # fmt: skip

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, len(self.groups))
        rest = self._coded_rest()
        lo, hi = self._bounds(2 + len(rest))
        scale = (hi - lo).clamp_min(1e-8) / ((1 << self.bits) - 1)
        conceal = self._to_coded(self.conceal[None].cpu())[0]
        out = conceal.expand(len(streams), self.k, *rest).clone()
        per = int(np.prod(rest))
        for b, s in enumerate(streams):
            for g, p in zip(self.groups, s.packets):
                if p is None:
                    continue
                n = (g.stop - g.start) * per
                raw = np.frombuffer(_zstd_decompress(p, n), dtype=np.uint8)
                if raw.max(initial=0) >= 1 << self.bits:
                    raise BitstreamError(f"level {raw.max()} out of range for {self.bits} bits")
                vals = torch.from_numpy(raw.astype(np.float32)).view(-1, *rest)
                out[b, g] = vals * scale[0, g] + lo[0, g]
        return self.conceal_nonfinite(self._from_coded(out))

    def _coded_rest(self) -> tuple[int, ...]:
        return tuple(self.feature_shape[1:])


@register_codec("quant")
class QuantCodec(_Quantised):
    """Uniform ``bits``-bit quantisation per channel, then zstd.

    Inputs: ``h`` float ``(B, C, ...)``; ``compress`` returns ``B`` streams of
    ``packets`` packets (zstd frames of one uint8 level per element); ``decompress``
    returns float32 ``(B, C, ...)``. Ranges come from ``fit`` (the ``percentile`` and
    ``100 - percentile`` percentiles of each channel).

    Example
    -------
    >>> import torch
    >>> codec = QuantCodec((4, 2, 2), bits=8).fit(torch.rand(100, 4, 2, 2))
    >>> h = torch.rand(3, 4, 2, 2)
    >>> float((codec.decompress(codec.compress(h)) - h).abs().max()) < 0.01
    True
    """

    def __init__(self, feature_shape: Sequence[int], bits: int = 8, packets: int = 1,
                 level: int = 10, percentile: float = 0.1) -> None:  # fmt: skip
        super().__init__(feature_shape, bits, packets, level, int(feature_shape[0]), percentile)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> QuantCodec:
        super().fit(features)
        self._fit_range(features)
        return self


@register_codec("pca")
class PCACodec(_Quantised):
    """Project channel vectors onto ``rank`` principal components, quantise, zstd.

    Inputs: ``h`` float ``(B, C, H, W)``; the coded tensor is ``(B, rank, H, W)``;
    ``decompress`` returns float32 ``(B, C, H, W)``. ``fit`` computes the mean, the
    components and the coefficient ranges from training features.

    Example
    -------
    >>> import torch
    >>> codec = PCACodec((8, 4, 4), rank=8, bits=8).fit(torch.randn(50, 8, 4, 4))
    >>> h = torch.randn(2, 8, 4, 4)
    >>> float((codec.decompress(codec.compress(h)) - h).abs().max()) < 0.2
    True
    """

    layouts = ("chw",)

    def __init__(self, feature_shape: Sequence[int], rank: int = 8, bits: int = 6,
                 packets: int = 1, level: int = 10, percentile: float = 0.1) -> None:  # fmt: skip
        shape = tuple(int(d) for d in feature_shape)
        if len(shape) != 3:
            raise ConfigError(f"pca needs (C, H, W) features, got {shape}")
        if not 1 <= rank <= shape[0]:
            raise ConfigError(f"rank must be in 1..{shape[0]}, got {rank}")
        super().__init__(feature_shape, bits, packets, level, rank, percentile)
        self.rank = int(rank)
        self.register_buffer("mean", torch.zeros(shape[0]))
        self.register_buffer("components", torch.eye(shape[0])[:rank].clone())  # (rank, C)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank}

    def _to_coded(self, h: torch.Tensor) -> torch.Tensor:
        x = h - self.mean.view(1, -1, 1, 1).to(h.device)
        return torch.einsum("rc,bchw->brhw", self.components.to(h.device), x)

    def _from_coded(self, c: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("rc,brhw->bchw", self.components.to(c.device), c)
        return x + self.mean.view(1, -1, 1, 1).to(c.device)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> PCACodec:
        FeatureCodec.fit(self, features)
        x = features.float().permute(0, 2, 3, 1).reshape(-1, self.feature_shape[0])
        self.mean.copy_(x.mean(0))
        cov = torch.cov((x - self.mean).T)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.rank]
        self.components.copy_(evecs[:, order].T)
        self._fit_range(self._to_coded(features.float()))
        return self

    @property
    def encoder(self) -> nn.Module:
        conv = nn.Conv2d(self.feature_shape[0], self.rank, 1, bias=True)
        with torch.no_grad():
            conv.weight.copy_(self.components[:, :, None, None])
            conv.bias.copy_(-(self.components @ self.mean))
        return conv
