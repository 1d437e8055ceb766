"""Learned feature codecs: factorized prior, mean-scale hyperprior, and fixed-length binary.

All three share one shape: a light encoder ``g_a`` on the device turns the features
``(C, H, W)`` into a latent ``(M, H/2, W/2)``; a decoder ``g_s`` at the receiver restores
features of the original shape for the larger member's tail.

- :class:`FactorizedCodec` (``"factorized"``): EntropyBottleneck over the latent; the
  latent channels are cut into ``packets`` groups, each rANS-coded on its own, so a lost
  packet loses only its channels (they are replaced by the prior's medians).
- :class:`HyperpriorCodec` (``"hyperprior"``): a hyper-latent ``z`` (EntropyBottleneck,
  packet 0) predicts means and scales of ``y`` (GaussianConditional, packets 1..G). A
  lost ``y`` packet is replaced by its predicted means; a lost ``z`` packet loses all.
- :class:`BinaryCodec` (``"binary"``): one bit per latent element (learned binarisation,
  no entropy coding), fixed length; trained with bit flips so that residual bit errors
  degrade the features gracefully. Lost packets decode to 0 (between -1 and +1).

``forward(h, drop_prob=0.0, flip_prob=0.0, generator=None)`` simulates packet drops
(and, for the binary codec, bit flips) during training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, channel_groups, register_codec
from flowcodec.codecs.entropy import (
    IndexPlan,
    decode_planned,
    eb_symbols,
    entropy_bottleneck,
    frozen_tables,
    gaussian_conditional,
    rans_decode,
    rans_encode,
    to_symbols,
)
from flowcodec.errors import ConfigError

__all__ = ["LearnedCodec", "FactorizedCodec", "HyperpriorCodec", "BinaryCodec",
           "packet_mask"]  # fmt: skip


def packet_mask(batch: int, groups: Sequence[slice], channels: int, prob: float,
                generator: torch.Generator | None, device) -> torch.Tensor:  # fmt: skip
    """Bool ``(B, channels, 1, 1)``: True where a channel's packet is dropped (i.i.d. ``prob``)."""
    lost = torch.rand(batch, len(groups), generator=generator) < prob
    per_ch = torch.zeros(batch, channels, dtype=torch.bool)
    for j, g in enumerate(groups):
        per_ch[:, g] = lost[:, j : j + 1]
    return per_ch.to(device)[:, :, None, None]


class _Encoder(nn.Sequential):
    def __init__(self, cin: int, hidden: int, latent: int) -> None:
        super().__init__(
            nn.Conv2d(cin, hidden, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, latent, 3, padding=1),
        )


class _Decoder(nn.Sequential):
    def __init__(self, latent: int, hidden: int, cout: int, nonneg: bool) -> None:
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent, hidden, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 3, padding=1),
        ]
        if nonneg:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class LearnedCodec(FeatureCodec):
    """Common part of the learned codecs (not registered itself).

    Parameters
    ----------
    feature_shape : (C, H, W)
        Features at the split point; ``H`` and ``W`` must be even.
    latent : int
        Latent channels ``M`` (the latent is ``(M, H/2, W/2)``).
    hidden : int
        Width of the encoder's and decoder's hidden layers.
    packets : int
        Number of independently decodable packets the latent channels are cut into.
    nonneg : bool
        End the decoder with a ReLU (features after a ReLU/max-pool are non-negative).
    backend : {"auto", "compressai", "torch"}
        Entropy models from CompressAI (needed to code) or their torch-only twins
        (training without CompressAI installed; same state-dict keys).
    """

    layouts = ("chw",)

    def __init__(self, feature_shape: Sequence[int], latent: int = 32, hidden: int = 64,
                 packets: int = 1, nonneg: bool = True, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(feature_shape)
        if len(self.feature_shape) != 3 or any(d % 2 for d in self.feature_shape[1:]):
            raise ConfigError(f"feature_shape must be (C, H, W) with even H, W, got "
                              f"{self.feature_shape}")  # fmt: skip
        if latent < 1 or hidden < 1:
            raise ConfigError("latent and hidden must be positive")
        c, h, w = self.feature_shape
        self.latent, self.hidden, self.nonneg = int(latent), int(hidden), bool(nonneg)
        self.latent_shape = (self.latent, h // 2, w // 2)
        self.groups = channel_groups(self.latent, packets)
        self.backend = backend
        self.g_a = _Encoder(c, hidden, latent)
        self.g_s = _Decoder(latent, hidden, c, nonneg)

    def config(self) -> dict:
        return {**super().config(), "latent": self.latent, "hidden": self.hidden,
                "packets": len(self.groups), "nonneg": self.nonneg}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return self.g_a

    def aux_loss(self) -> torch.Tensor:
        """Auxiliary loss fitting the entropy bottleneck's quantiles (0 if none)."""
        losses = [m.loss() for m in self.modules() if hasattr(m, "quantiles")]
        return sum(losses[1:], losses[0]) if losses else torch.zeros((), device=self._device())

    def _header(self):
        return self.make_header(tensors=[TensorSpec("float32", self.feature_shape)])

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def _bits(likelihoods: torch.Tensor) -> torch.Tensor:
    return -torch.log2(likelihoods).flatten(1).sum(1)


@register_codec("factorized")
class FactorizedCodec(LearnedCodec):
    """Factorized-prior codec (EntropyBottleneck) with channel-group packets.

    Inputs: ``h`` float32 ``(B, C, H, W)``. ``forward`` returns a :class:`CodecOutput`
    (features ``(B, C, H, W)``, estimated bits ``(B,)``, likelihoods ``{"y": ...}``).
    ``compress`` returns ``B`` streams of ``packets`` packets (after ``update()``);
    ``decompress`` returns float32 ``(B, C, H, W)`` with lost packets' channels concealed
    by the prior's medians.

    Example
    -------
    >>> import torch
    >>> codec = FactorizedCodec((16, 8, 8), latent=8, packets=2).eval()
    >>> out = codec(torch.rand(2, 16, 8, 8))
    >>> tuple(out.features.shape), tuple(out.bits.shape)
    ((2, 16, 8, 8), (2,))
    """

    def __init__(self, feature_shape: Sequence[int], latent: int = 32, hidden: int = 64,
                 packets: int = 1, nonneg: bool = True, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(feature_shape, latent, hidden, packets, nonneg, backend)
        self.entropy_bottleneck = entropy_bottleneck(self.latent, backend)

    def _medians(self) -> torch.Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].detach().view(1, -1, 1, 1)

    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        self.check_features(h)
        y = self.g_a(h)
        y_hat, lik = self.entropy_bottleneck(y)
        if drop_prob > 0:
            lost = packet_mask(len(h), self.groups, self.latent, drop_prob, generator, h.device)
            y_hat = torch.where(lost, self._medians().expand_as(y_hat), y_hat)
        return CodecOutput(self.g_s(y_hat), _bits(lik), {"y": lik})

    def update(self, force: bool = False) -> bool:
        """Freeze the CDF tables (CompressAI ``update()``); returns whether they changed."""
        return bool(self.entropy_bottleneck.update(force=force))

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        sym = eb_symbols(self.entropy_bottleneck, self.g_a(h.to(self._device()))).cpu()
        idx = torch.arange(self.latent, dtype=torch.int32).view(1, -1, 1, 1).expand_as(sym)
        tables = _tables_of(self.entropy_bottleneck)
        header = self._header()
        out = []
        for b in range(len(sym)):
            out.append(Bitstream(header, [rans_encode(self.entropy_bottleneck, sym[b, g],
                                                      idx[b, g], tables)
                                          for g in self.groups]))  # fmt: skip
        return out

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, len(self.groups))
        tables = _tables_of(self.entropy_bottleneck)
        m, hh, ww = self.latent_shape
        sym = torch.zeros(len(streams), m, hh, ww, dtype=torch.int32)
        plans = [IndexPlan(tables, torch.arange(g.start, g.stop, dtype=torch.int32)
                            .view(-1, 1, 1).expand(-1, hh, ww)) for g in self.groups]  # fmt: skip
        for b, s in enumerate(streams):
            for g, plan, p in zip(self.groups, plans, s.packets):
                if p is None:
                    continue  # symbol 0 = the median: concealment
                sym[b, g] = decode_planned(tables, p, plan)
        dev = self._device()
        y_hat = sym.to(dev).float() + self._medians().to(dev)
        return self.conceal_nonfinite(self.g_s(y_hat).float().cpu())


@register_codec("hyperprior")
class HyperpriorCodec(LearnedCodec):
    """Mean-scale hyperprior codec: ``z`` (EntropyBottleneck) predicts ``y``'s Gaussians.

    Packet 0 carries ``z``; packets ``1..packets`` carry groups of ``y``'s channels.
    Shapes as :class:`FactorizedCodec`; ``likelihoods`` has ``"y"`` and ``"z"``.

    Example
    -------
    >>> import torch
    >>> codec = HyperpriorCodec((16, 8, 8), latent=8, hyper=4).eval()
    >>> codec(torch.rand(1, 16, 8, 8)).likelihoods["z"].shape
    torch.Size([1, 4, 2, 2])
    """

    def __init__(self, feature_shape: Sequence[int], latent: int = 32, hidden: int = 64,
                 packets: int = 1, nonneg: bool = True, backend: str = "auto",
                 hyper: int = 16) -> None:  # fmt: skip
        super().__init__(feature_shape, latent, hidden, packets, nonneg, backend)
        if self.latent_shape[1] % 2 or self.latent_shape[2] % 2:
            raise ConfigError("hyperprior needs feature H, W divisible by 4")
        self.hyper = int(hyper)
        self.h_a = nn.Sequential(
            nn.Conv2d(latent, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hyper, 3, stride=2, padding=1),
        )  # fmt: skip
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(hyper, hidden, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * latent, 3, padding=1),
        )  # fmt: skip
        self.entropy_bottleneck = entropy_bottleneck(self.hyper, backend)
        self.gaussian_conditional = gaussian_conditional(backend)

    def config(self) -> dict:
        return {**super().config(), "hyper": self.hyper}

    @property
    def encoder(self) -> nn.Module:
        return _HyperEncoder(self)

    def _params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, scales = self.h_s(z_hat).chunk(2, 1)
        return means, scales

    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        self.check_features(h)
        y = self.g_a(h)
        z_hat, z_lik = self.entropy_bottleneck(self.h_a(y))
        means, scales = self._params(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means)
        if drop_prob > 0:
            lost = packet_mask(len(h), self.groups, self.latent, drop_prob, generator, h.device)
            y_hat = torch.where(lost, means, y_hat)
        return CodecOutput(self.g_s(y_hat), _bits(y_lik) + _bits(z_lik), {"y": y_lik, "z": z_lik})

    def update(self, force: bool = False) -> bool:
        """Freeze both entropy models' CDF tables."""
        a = self.entropy_bottleneck.update(force=force)
        gc = self.gaussian_conditional
        if force or gc._offset.numel() == 0:
            gc.update()
            return True
        return bool(a)

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        dev = self._device()
        y = self.g_a(h.to(dev))
        z = self.h_a(y)
        zt, yt = _tables_of(self.entropy_bottleneck), _tables_of(self.gaussian_conditional)
        # z's symbols as the coder will send them (clamped to each table's range), so the
        # scales that index y's tables are the ones the decoder computes from what it reads
        lo = torch.as_tensor(zt.lo[: self.hyper], device=dev).view(1, -1, 1, 1)
        hi = torch.as_tensor(zt.hi[: self.hyper], device=dev).view(1, -1, 1, 1)
        zsym = torch.minimum(torch.maximum(eb_symbols(self.entropy_bottleneck, z).long(), lo),
                             hi).int()  # fmt: skip
        z_hat = zsym.float() + self.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)
        means, scales = self._params(z_hat)
        idx = self.gaussian_conditional.build_indexes(scales).cpu()
        ysym = to_symbols(y - means).cpu()
        zsym = zsym.cpu()
        zidx = torch.arange(self.hyper, dtype=torch.int32).view(1, -1, 1, 1).expand_as(zsym)
        header = self._header()
        out = []
        for b in range(len(ysym)):
            packets = [rans_encode(self.entropy_bottleneck, zsym[b], zidx[b], zt)]
            packets += [rans_encode(self.gaussian_conditional, ysym[b, g], idx[b, g], yt)
                        for g in self.groups]  # fmt: skip
            out.append(Bitstream(header, packets))
        return out

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, 1 + len(self.groups))
        dev = self._device()
        m, hh, ww = self.latent_shape
        zshape = (self.hyper, hh // 2, ww // 2)
        zt, yt = _tables_of(self.entropy_bottleneck), _tables_of(self.gaussian_conditional)
        zidx = torch.arange(self.hyper, dtype=torch.int32).view(-1, 1, 1).expand(*zshape)
        zsym = torch.zeros(len(streams), *zshape, dtype=torch.int32)
        zplan = IndexPlan(zt, zidx)
        for b, s in enumerate(streams):
            if s.packets[0] is not None:
                zsym[b] = decode_planned(zt, s.packets[0], zplan)
        med = self.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)
        means, scales = self._params(zsym.to(dev).float() + med)
        idx = self.gaussian_conditional.build_indexes(scales).cpu()
        y_hat = means.clone()
        for b, s in enumerate(streams):
            if s.packets[0] is None:
                continue  # without z the y packets cannot be decoded: all concealed
            for g, p in zip(self.groups, s.packets[1:]):
                if p is None:
                    continue  # concealed by the predicted means
                sym = rans_decode(self.gaussian_conditional, p, idx[b, g], yt)
                y_hat[b, g] = sym.to(dev).float() + means[b, g]
        return self.conceal_nonfinite(self.g_s(y_hat).float().cpu())


class _HyperEncoder(nn.Module):
    """What the device runs for the hyperprior codec: g_a, h_a and h_s (for the indexes)."""

    def __init__(self, codec: HyperpriorCodec) -> None:
        super().__init__()
        self.g_a, self.h_a, self.h_s = codec.g_a, codec.h_a, codec.h_s

    def forward(self, h):
        y = self.g_a(h)
        return y, self.h_s(torch.round(self.h_a(y)))


@register_codec("binary")
class BinaryCodec(LearnedCodec):
    """Fixed-length binary codec: one bit per latent element, no entropy coding.

    The encoder's output goes through ``tanh`` and is binarised to +-1 (straight-through
    gradient in training). ``forward(h, flip_prob=p)`` flips each bit with probability
    ``p`` (a binary symmetric channel) so the decoder learns to tolerate residual errors;
    ``drop_prob`` zeroes whole packets. Each packet is ``ceil(bits/8)`` bytes of packed bits;
    its length is fixed, so flipped bits never desynchronise the stream.

    Example
    -------
    >>> import torch
    >>> codec = BinaryCodec((16, 8, 8), latent=8, packets=2).eval()
    >>> [len(p) for p in codec.compress(torch.rand(1, 16, 8, 8))[0].packets]
    [8, 8]
    """

    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        self.check_features(h)
        t = torch.tanh(self.g_a(h))
        b = t + (torch.where(t >= 0, 1.0, -1.0) - t).detach()
        if flip_prob > 0:
            flips = torch.rand(b.shape, generator=generator) < flip_prob
            b = torch.where(flips.to(b.device), -b, b)
        if drop_prob > 0:
            lost = packet_mask(len(h), self.groups, self.latent, drop_prob, generator, h.device)
            b = b.masked_fill(lost, 0.0)
        bits = torch.full((len(h),), float(math.prod(self.latent_shape)), device=h.device)
        return CodecOutput(self.g_s(b), bits, {})

    def _packet_bytes(self, g: slice) -> int:
        return math.ceil((g.stop - g.start) * self.latent_shape[1] * self.latent_shape[2] / 8)

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        bits = (self.g_a(h.to(self._device())) >= 0).cpu().numpy().astype(np.uint8)
        header = self._header()
        return [Bitstream(header, [np.packbits(bb[g].reshape(-1)).tobytes()
                                   for g in self.groups]) for bb in bits]  # fmt: skip

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, len(self.groups))
        m, hh, ww = self.latent_shape
        lat = torch.zeros(len(streams), m, hh, ww)
        for b, s in enumerate(streams):
            for g, p in zip(self.groups, s.packets):
                if p is None:
                    continue
                if len(p) != self._packet_bytes(g):
                    raise BitstreamError(f"binary packet has {len(p)} bytes, expected "
                                         f"{self._packet_bytes(g)}")  # fmt: skip
                n = (g.stop - g.start) * hh * ww
                v = np.unpackbits(np.frombuffer(p, dtype=np.uint8))[:n].astype(np.float32)
                lat[b, g] = torch.from_numpy(2 * v - 1).view(-1, hh, ww)
        return self.conceal_nonfinite(self.g_s(lat.to(self._device())).float().cpu())


def flip_bits(stream: Bitstream, prob: float, generator: torch.Generator | None = None
              ) -> Bitstream:  # fmt: skip
    """A copy of ``stream`` whose payload bits are flipped i.i.d. with probability ``prob``.

    This models residual bit errors reaching a decoder that does not drop packets on a
    failed CRC (a fixed-length codec can decode them; an entropy-coded one cannot).
    """
    out = []
    for p in stream.packets:
        if p is None:
            out.append(None)
            continue
        bits = np.unpackbits(np.frombuffer(p, dtype=np.uint8))
        mask = (torch.rand(len(bits), generator=generator) < prob).numpy().astype(np.uint8)
        out.append(np.packbits(bits ^ mask).tobytes())
    return Bitstream(stream.header, out)


def _tables_of(model: nn.Module) -> tuple:
    return frozen_tables(model)


__all__ += ["flip_bits"]
