"""One rate point of a variable-rate codec, usable wherever a codec is expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flowcodec.bitstream import Bitstream
from flowcodec.codecs.base import CodecOutput, FeatureCodec
from flowcodec.errors import ConfigError

if TYPE_CHECKING:
    from flowcodec.codecs.task import TaskCodec

__all__ = ["RatePoint", "RateLadder"]


class RateLadder:
    """What a codec with ``rates`` rate points shares, each point a learned gain (``gain[r]``,
    log scale) and a factorized entropy model (``entropy_bottlenecks[r]``): the quantile
    loss of all of them, the rate check, and the device the codec's tensors live on.
    ``RATE_NAME`` names the codec in the rate check's error."""

    RATE_NAME = "codec"

    def aux_loss(self) -> torch.Tensor:
        """Quantile-fitting loss of every rate point's entropy model."""
        return sum(eb.loss() for eb in self.entropy_bottlenecks)

    def _device(self) -> torch.device:
        return self.gain.device

    def _rate(self, rate: int | None) -> int:
        r = self.rates - 1 if rate is None else rate
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.rates:
            raise ConfigError(f"{self.RATE_NAME}: rate must be an int in 0..{self.rates - 1}, "
                              f"got {rate!r}")  # fmt: skip
        return r


class RatePoint(FeatureCodec):
    """One rate point of a variable-rate codec, usable wherever a codec is expected.

    ``codec.at_rate(r)`` shares the parent's modules (no copy): ``compress`` codes at rate
    point ``r``; ``decompress`` reads each stream's own rate point from its header, so
    streams of any rate point of the parent decode.

    Example
    -------
    >>> import torch
    >>> from flowcodec.codecs.task import TaskCodec
    >>> codec = TaskCodec((16, 8, 8), latent=4, stem=[(16, True)], hidden=16, rates=2).eval()
    >>> _ = codec.update(force=True)
    >>> low = codec.at_rate(0)
    >>> low.rate_of(low.compress(torch.rand(1, 16, 8, 8))[0])
    0
    """

    def __init__(self, codec: TaskCodec, rate: int) -> None:
        super().__init__(codec.feature_shape)
        self.base = codec
        self.rate = codec._rate(rate)
        self.name = codec.name
        self.conceal = codec.conceal

    def config(self) -> dict:
        return self.base.config()

    @property
    def encoder(self) -> nn.Module:
        return self.base.encoder

    @property
    def groups(self) -> list[slice]:
        return self.base.groups

    def rate_of(self, stream: Bitstream) -> int:
        return self.base.rate_of(stream)

    @property
    def views(self) -> int:
        return self.base.views

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape

    def check_features(self, h: torch.Tensor) -> None:
        self.base.check_features(h)

    def device_features(self, head, x: torch.Tensor) -> torch.Tensor:
        return self.base.device_features(head, x)

    def encoder_flops(self) -> int:
        return self.base.encoder_flops()

    def aux_loss(self) -> torch.Tensor:
        return self.base.aux_loss()

    def update(self, force: bool = False) -> bool:
        return self.base.update(force)

    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        return self.base(h, rate=self.rate, drop_prob=drop_prob, generator=generator)

    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        return self.base.compress(h, rate=self.rate)

    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        return self.base.decompress(streams)
