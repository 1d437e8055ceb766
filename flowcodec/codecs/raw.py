"""Raw features (float32 or float16): the uncompressed baseline.

The features are cut into ``packets`` channel groups, each sent as one packet of raw
little-endian values; a lost group is filled with the codec's concealment values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, channel_groups, register_codec
from flowcodec.errors import ConfigError

__all__ = ["RawCodec"]

_NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


@register_codec("raw")
class RawCodec(FeatureCodec):
    """Send features as raw float32 or float16 values.

    Inputs: ``h`` float ``(B, C, ...)``. ``compress`` returns ``B`` streams of
    ``packets`` packets each; ``decompress`` returns float32 ``(B, C, ...)``.
    """

    def __init__(self, feature_shape: Sequence[int], dtype: str = "float32", packets: int = 1):
        super().__init__(feature_shape)
        if dtype not in _NP:
            raise ConfigError(f"dtype must be one of {sorted(_NP)}, got {dtype!r}")
        self.dtype = dtype
        self.groups = channel_groups(self.feature_shape[0], packets)

    def config(self) -> dict:
        return {**super().config(), "dtype": self.dtype, "packets": len(self.groups)}

    def forward(self, h: torch.Tensor) -> CodecOutput:
        self.check_features(h)
        h_hat = h.to(_TORCH[self.dtype]).float()
        bits = torch.full((h.shape[0],), 8.0 * h[0].numel() * _NP[self.dtype].itemsize)
        return CodecOutput(h_hat, bits, {})

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        arr = h.detach().to("cpu", torch.float32).numpy()
        if self.dtype == "float16":  # saturate instead of overflowing to inf
            arr = np.clip(arr, -65504.0, 65504.0)
        arr = arr.astype(_NP[self.dtype])
        header = self.make_header(tensors=[TensorSpec("float32", self.feature_shape)])
        return [Bitstream(header, [a[g].tobytes() for g in self.groups]) for a in arr]

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, len(self.groups))
        out = self.conceal.detach().cpu().expand(len(streams), *self.feature_shape).clone()
        rest = self.feature_shape[1:]
        for b, s in enumerate(streams):
            for g, p in zip(self.groups, s.packets):
                if p is None:
                    continue
                want = (g.stop - g.start) * int(np.prod(rest)) * _NP[self.dtype].itemsize
                if len(p) != want:
                    raise BitstreamError(f"packet has {len(p)} bytes, expected {want}")
                vals = np.frombuffer(p, dtype=_NP[self.dtype]).astype(np.float32)
                out[b, g] = torch.from_numpy(vals.reshape(g.stop - g.start, *rest))
        # A CRC-valid payload may still hold inf/NaN (or float16 overflow of a huge feature):
        # the tail gets the concealment value there, never a non-finite feature.
        return self.conceal_nonfinite(out)
