"""Joint source-channel (JSCC) codecs: split-point features straight to channel symbols.

A digital hop compresses features into bytes and a link protects them with CRC, LDPC and
QAM: below the MCS's threshold the packet is lost (the cliff), above it more SNR buys
nothing. A JSCC codec (registry name ``"jscc"``, :class:`JSCCCodec`) maps the features to
``symbols`` complex channel symbols and is trained *through* the channel, so accuracy
degrades gracefully with the SNR.

- **encoder** (device): the task codec's design (:class:`~flowcodec.codecs.task.TaskEncoder`:
  conv-BN-ReLU stem, global max pooling, a linear map), with FiLM modulation of the pooled
  features by the side information ``(snr_db / 10, uses / symbols)``;
- **analog** (``constellation="analog"``): the ``2 * symbols`` outputs are ``symbols``
  complex numbers; the first ``uses`` of them are sent, scaled so that the sample's symbols
  have *exactly* unit average energy (``sum |x|^2 = uses`` for every sample);
- **discrete** (``"qam16"``, ``"psk16"`` or ``"learned16"``): each symbol is one of 16
  constellation points (unit average energy over the points), chosen by a straight-through
  Gumbel-softmax estimator in training and by argmax in eval. ``qam16`` is the Gray-labelled
  16-QAM of Sionna / 5G, so the indices can go through the exact link's QAM mapper without
  channel coding (:meth:`JSCCCodec.send_uncoded`) and be packed into bytes
  (:meth:`JSCCCodec.compress`);
- **variable length**: ``uses`` (the channel uses, 1..symbols) is chosen per SNR from
  ``schedule`` (or given) and recorded with the transmission (:class:`Transmission`);
  training draws it from ``levels`` so that every prefix of the symbols is a usable code;
- **receiver**: equalisation with the receiver's channel knowledge (MMSE for analog
  symbols; for discrete ones the posterior mean of the constellation point, or the hard
  decision), then a decoder (:class:`~flowcodec.codecs.task.TaskDecoder` with FiLM after its
  first layer) back to the features the larger member's tail expects.

Inputs ``h`` float ``(B, C, H, W)``; ``snr_db`` a float or a float tensor ``(B,)``.
``forward(h, snr_db, channel=..., uses=..., generator=...)`` returns a :class:`JSCCOutput`
(features ``(B, C, H, W)``, bits: zeros (an analog codec sends no bits), likelihoods empty,
the :class:`Transmission`). :meth:`~JSCCCodec.encode` and :meth:`~JSCCCodec.decode` are the
device and receiver halves; :meth:`~JSCCCodec.transmit` runs both through a channel.

Example
-------
>>> import torch
>>> from channels import AWGN
>>> codec = JSCCCodec((16, 8, 8), symbols=8, stem=[(16, True)], hidden=32).eval()
>>> tx = codec.encode(torch.rand(2, 16, 8, 8), snr_db=10.0, uses=6)
>>> tx.symbols.shape, tx.uses.tolist(), round(float(tx.symbols.abs().square().sum(1)[0]), 4)
(torch.Size([2, 8]), [6, 6], 6.0)
>>> feats, tx = codec.transmit(torch.rand(2, 16, 8, 8), AWGN(), snr_db=5.0,
...                            generator=torch.Generator().manual_seed(0))
>>> tuple(feats.shape)
(2, 16, 8, 8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec
from flowcodec.codecs.multiview import MultiView
from flowcodec.codecs.task_nets import TaskDecoder, TaskEncoder
from flowcodec.errors import ConfigError

__all__ = ["JSCCCodec", "JSCCOutput", "Transmission", "FiLM", "constellation_points",
           "CONSTELLATIONS", "SNR_RANGE"]  # fmt: skip

#: Constellations of the discrete variant (16 points each) and the analog one.
CONSTELLATIONS = ("analog", "qam16", "psk16", "learned16")
#: SNRs (Es/N0, dB) a codec accepts as side information.
SNR_RANGE = (-30.0, 60.0)
_M = 16  # points of the discrete constellations
_EPS = 1e-12


def constellation_points(kind: str) -> torch.Tensor:
    """The 16 points ``(16,)`` complex64 of ``kind``, unit average energy.

    ``"qam16"``: Gray-labelled 16-QAM with index bits ``b0 b1 b2 b3`` (MSB first) mapped to
    ``((1 - 2 b0)(1 + 2 b2) + j (1 - 2 b1)(1 + 2 b3)) / sqrt(10)`` (the 5G / Sionna mapping);
    ``"psk16"`` and ``"learned16"`` (its starting point): 16-PSK with a Gray labelling.
    """
    i = torch.arange(_M)
    if kind == "qam16":
        b = [(i >> (3 - j)) & 1 for j in range(4)]
        re = (1 - 2 * b[0]) * (1 + 2 * b[2])
        im = (1 - 2 * b[1]) * (1 + 2 * b[3])
        return torch.complex(re.float(), im.float()) / math.sqrt(10.0)
    if kind in ("psk16", "learned16"):
        gray = i ^ (i >> 1)  # the point at angle k carries label gray(k)
        pts = torch.zeros(_M, dtype=torch.complex64)
        pts[gray] = torch.polar(torch.ones(_M), 2 * math.pi * i.float() / _M)
        return pts
    raise ConfigError(f"constellation must be one of {CONSTELLATIONS[1:]}, got {kind!r}")


class FiLM(nn.Module):
    """Feature-wise affine modulation ``x * (1 + gamma(c)) + beta(c)`` by side information.

    ``x`` ``(B, dim)``, ``c`` ``(B, cond)``. The last layer starts at zero: a fresh FiLM is
    the identity (a codec warm-started from a task codec starts where that codec was).
    """

    def __init__(self, dim: int, cond: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2 * dim))  # fmt: skip
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.net(c.to(x.dtype)).chunk(2, dim=1)
        return x * (1 + gamma) + beta


@dataclass
class Transmission:
    """What crosses the channel for a batch, and the side information sent with it.

    Attributes
    ----------
    symbols : torch.Tensor
        ``(B, symbols)`` complex64; positions at and after ``uses[b]`` are zero (not sent).
    uses : torch.Tensor
        ``(B,)`` int64: complex channel uses of each sample (symbols actually sent).
    snr_db : torch.Tensor
        ``(B,)`` float32: the SNR the encoder was told (side information).
    indices : torch.Tensor or None
        ``(B, symbols)`` int64 constellation indices (discrete codecs; -1 where unsent).
    """

    symbols: torch.Tensor
    uses: torch.Tensor
    snr_db: torch.Tensor
    indices: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``(B, symbols)`` bool: which positions were sent."""
        k = self.symbols.shape[1]
        return torch.arange(k, device=self.uses.device)[None, :] < self.uses[:, None]

    @property
    def channel_uses(self) -> int:
        """Complex channel uses of the whole batch (flat channels: one per symbol)."""
        return int(self.uses.sum())


@dataclass
class JSCCOutput(CodecOutput):
    """:class:`CodecOutput` of a JSCC codec, with the :class:`Transmission` it made."""

    transmission: Transmission | None = None


class _DeviceEncoder(nn.Module):
    """The device half as a plain module ``(B, C, H, W) -> (B, symbols)`` complex (at
    10 dB, every symbol sent, one view): what :meth:`FeatureCodec.encoder_flops` counts
    (once per view)."""

    def __init__(self, codec: JSCCCodec) -> None:
        super().__init__()
        self.codec = codec
        # a fresh module starts in training mode; take the codec's, so that whoever sets
        # this wrapper's mode and restores it (count_flops) restores the codec's own
        self.training = codec.training

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.codec._encode_views(h, 10.0, None, None, views=1).symbols


@register_codec("jscc")
class JSCCCodec(MultiView, FeatureCodec):
    """Analog or discrete JSCC codec with SNR side information and variable length.

    Parameters
    ----------
    feature_shape : (C, H, W)
        Features at the split point; ``H`` and ``W`` even.
    symbols : int
        Most complex channel uses per sample (1..4096).
    stem : sequence of (channels, pool)
        Encoder conv blocks (default one block of ``2 * C`` channels with pooling, the
        task codec's default, so a task codec's encoder can be copied in).
    hidden : int
        Width of the decoder's first linear layer.
    nonneg : bool
        End the decoder with a ReLU (non-negative features).
    constellation : {"analog", "qam16", "psk16", "learned16"}
        Analog symbols or one of the 16-point constellations.
    levels : sequence of int
        Channel-use counts training draws from (every prefix length the codec must serve);
        default ``[symbols]``.
    schedule : sequence of (min_snr_db, uses)
        Channel uses chosen per SNR when a call gives none: the entry with the highest
        ``min_snr_db`` not above the SNR (below every entry: the first one's uses). Default
        ``[(-inf, symbols)]``: always every symbol.
    film : int
        Hidden width of the FiLM networks.
    tau : float
        Gumbel-softmax temperature (discrete codecs, training).
    views : int
        Input views the device codes into one transmission (1..4, the first of
        :data:`flowcodec.views.VIEWS`: the input, its mirror image, the two shifted
        by 2 pixels): the encoder runs on each view's features (stacked on the channel
        axis, :func:`~flowcodec.views.view_features`) and sends the mean of their
        unit-power symbols, scaled back to unit power (discrete codecs: the point the mean
        of their logits picks). The channel uses and the receiver are those of one view;
        :meth:`set_views` changes it without touching the weights.
    """

    #: A :class:`~flowcodec.pipeline.Hop` sends this codec's symbols through an analog
    #: channel (channel uses, not bytes, set the transmission time).
    sends_symbols = True

    def __init__(self, feature_shape: Sequence[int], symbols: int = 16,
                 stem: Sequence[Sequence] | None = None, hidden: int = 512, nonneg: bool = True,
                 constellation: str = "analog", levels: Sequence[int] | None = None,
                 schedule: Sequence[Sequence] | None = None, film: int = 64,
                 tau: float = 1.0, views: int = 1) -> None:  # fmt: skip
        super().__init__(feature_shape)
        self.set_views(views)
        if len(self.feature_shape) != 3 or any(d % 2 for d in self.feature_shape[1:]):
            raise ConfigError(f"jscc codec: feature_shape must be (C, H, W) with even H, W, "
                              f"got {self.feature_shape}")  # fmt: skip
        if _bad_int(symbols, 1, 4096) or _bad_int(hidden, 1, 1 << 16) or _bad_int(film, 1, 4096):
            raise ConfigError(f"jscc codec: symbols must be in 1..4096, hidden in 1..65536 and "
                              f"film in 1..4096, got {symbols}, {hidden}, {film}")  # fmt: skip
        if constellation not in CONSTELLATIONS:
            raise ConfigError(f"jscc codec: constellation must be one of {CONSTELLATIONS}, "
                              f"got {constellation!r}")  # fmt: skip
        if not (isinstance(tau, (int, float)) and 0 < tau <= 100):
            raise ConfigError(f"jscc codec: tau must be in (0, 100], got {tau!r}")
        self.symbols, self.hidden, self.film = int(symbols), int(hidden), int(film)
        self.constellation, self.nonneg, self.tau = constellation, bool(nonneg), float(tau)
        self.discrete = constellation != "analog"
        c = self.feature_shape[0]
        stem = [(2 * c, True)] if stem is None else [(int(a), bool(b)) for a, b in stem]
        if not stem or any(not 1 <= a <= 4096 for a, _ in stem):
            raise ConfigError(f"jscc codec: stem must list (channels in 1..4096, pool), "
                              f"got {stem}")  # fmt: skip
        self.stem_spec = stem
        levels = [self.symbols] if levels is None else list(levels)
        if not levels or any(_bad_int(n, 1, self.symbols) for n in levels):
            raise ConfigError(f"jscc codec: levels must be ints in 1..{self.symbols}, "
                              f"got {levels}")  # fmt: skip
        self.levels = sorted({int(n) for n in levels})
        sched = [(-math.inf, self.symbols)] if schedule is None else schedule
        try:
            sched = sorted((float(s), int(n)) for s, n in sched)
        except (TypeError, ValueError):
            raise ConfigError(f"jscc codec: schedule must list (min_snr_db, uses), "
                              f"got {schedule!r}") from None  # fmt: skip
        if not sched or any(math.isnan(s) or not 1 <= n <= self.symbols for s, n in sched):
            raise ConfigError(f"jscc codec: schedule needs (min_snr_db, uses in "
                              f"1..{self.symbols}) entries, got {schedule!r}")  # fmt: skip
        self.schedule = sched
        out = self.symbols * (_M if self.discrete else 2)
        self.g_a = TaskEncoder(c, stem, out)
        self.film_a = FiLM(stem[-1][0], 2, self.film)
        self.g_s = TaskDecoder(2 * self.symbols, self.hidden, self.feature_shape, self.nonneg)
        self.film_s = FiLM(self.hidden, 2, self.film)
        if self.discrete:
            pts = torch.view_as_real(constellation_points(constellation))
            if constellation == "learned16":
                self.points_param = nn.Parameter(pts.clone())
            else:
                self.register_buffer("points_fixed", pts, persistent=False)

    # --- configuration --------------------------------------------------------------------
    def config(self) -> dict:
        return {**super().config(), "symbols": self.symbols, "hidden": self.hidden,
                "stem": [list(s) for s in self.stem_spec], "nonneg": self.nonneg,
                "constellation": self.constellation, "levels": self.levels,
                "schedule": [[s, n] for s, n in self.schedule], "film": self.film,
                **({"views": self.views} if self.views > 1 else {})}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return _DeviceEncoder(self)

    def points(self) -> torch.Tensor:
        """The constellation ``(16,)`` complex, scaled to unit average energy (discrete)."""
        if not self.discrete:
            raise ConfigError("an analog jscc codec has no constellation")
        p = self.points_param if self.constellation == "learned16" else self.points_fixed
        p = p.float()
        p = p / p.square().sum(1).mean().clamp_min(_EPS).sqrt()
        return torch.view_as_complex(p.contiguous())

    def _device(self) -> torch.device:
        return self.g_s.mlp[0].weight.device

    # --- side information -----------------------------------------------------------------
    def _snr(self, snr_db, batch: int) -> torch.Tensor:
        """The SNR as a float32 tensor ``(B,)`` on the codec's device (checked)."""
        if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float, torch.Tensor)):
            raise ConfigError(f"jscc codec: snr_db must be a float or a tensor (B,), "
                              f"got {type(snr_db).__name__}")  # fmt: skip
        s = torch.as_tensor(snr_db, dtype=torch.float32).detach().to(self._device())
        if s.ndim == 0:
            s = s.expand(batch)
        if s.shape != (batch,):
            raise ConfigError(f"jscc codec: snr_db must be a scalar or shape ({batch},), "
                              f"got {tuple(s.shape)}")  # fmt: skip
        lo, hi = SNR_RANGE
        if not bool(torch.isfinite(s).all()) or bool((s < lo).any() | (s > hi).any()):
            raise ConfigError(f"jscc codec: snr_db must be finite and in [{lo:g}, {hi:g}] dB")
        return s.contiguous()

    def uses_for(self, snr_db: float) -> int:
        """Channel uses the schedule picks at ``snr_db``."""
        n = self.schedule[0][1]
        for s, k in self.schedule:
            if snr_db >= s:
                n = k
        return n

    def _uses(self, uses, snr: torch.Tensor) -> torch.Tensor:
        if uses is None:
            return torch.tensor([self.uses_for(float(s)) for s in snr.tolist()],
                                dtype=torch.long, device=snr.device)  # fmt: skip
        if isinstance(uses, bool) or not isinstance(uses, (int, torch.Tensor)):
            raise ConfigError(f"jscc codec: uses must be an int or an int tensor (B,), "
                              f"got {type(uses).__name__}")  # fmt: skip
        u = torch.as_tensor(uses).to(snr.device)
        if u.is_floating_point() or u.is_complex():
            raise ConfigError("jscc codec: uses must be integers")
        u = u.long().expand(len(snr)) if u.ndim == 0 else u.long()
        if u.shape != snr.shape or bool((u < 1).any() | (u > self.symbols).any()):
            raise ConfigError(f"jscc codec: uses must be in 1..{self.symbols}, one per sample")
        return u.contiguous()

    def _cond(self, snr: torch.Tensor, uses: torch.Tensor) -> torch.Tensor:
        return torch.stack([snr / 10.0, uses.float() / self.symbols], dim=1)

    # --- the two halves -------------------------------------------------------------------
    def encode(self, h: torch.Tensor, snr_db=10.0, uses=None,
               generator: torch.Generator | None = None) -> Transmission:  # fmt: skip
        """Device half: features ``(B, *input_shape)`` (``(B, C, H, W)``, or the views'
        features stacked on the channel axis) to a :class:`Transmission`.

        ``snr_db``: float or ``(B,)``; ``uses``: int or ``(B,)`` (default: the schedule's
        choice at each sample's SNR). ``generator`` draws the Gumbel noise (discrete codecs
        in training mode)."""
        self.check_features(h)
        return self._encode_views(h.to(self._device()), snr_db, uses, generator, self.views)

    def _encode_views(self, h: torch.Tensor, snr_db, uses, generator,
                      views: int) -> Transmission:  # fmt: skip
        b = len(h)
        snr = self._snr(snr_db, b)
        n = self._uses(uses, snr)
        if views > 1:
            h = h.reshape(b * views, *self.feature_shape)
        rep = (lambda t: t.repeat_interleave(views, 0)) if views > 1 else (lambda t: t)
        z = self.g_a.pool(self.g_a.stem(h))
        y = self.g_a.proj(self.film_a(z, self._cond(rep(snr), rep(n)))).float()
        mask = torch.arange(self.symbols, device=y.device)[None, :] < n[:, None]
        if not self.discrete:
            x = torch.view_as_complex(y.view(len(y), self.symbols, 2).contiguous())
            x = x * rep(mask)
            x = x * (rep(n)[:, None].float() / _energy(x)).sqrt()
            if views > 1:  # the views' unit-power symbols, averaged, back to unit power
                x = x.view(b, views, self.symbols).mean(1)
                x = x * (n[:, None].float() / _energy(x)).sqrt()
            return Transmission(x.to(torch.complex64), n, snr)
        logits = y.view(len(y), self.symbols, _M)
        if views > 1:
            logits = logits.view(b, views, self.symbols, _M).mean(1)
        pts = torch.view_as_real(self.points())  # (M, 2)
        idx = logits.argmax(-1)
        hard = nn.functional.one_hot(idx, _M).to(logits.dtype)
        if self.training:
            u = torch.rand(logits.shape, generator=generator).to(logits.device)
            g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
            soft = torch.softmax((logits + g) / self.tau, -1)
            idx = soft.argmax(-1)
            hard = nn.functional.one_hot(idx, _M).to(soft.dtype)
            hard = hard + soft - soft.detach()  # straight-through
        x = torch.view_as_complex((hard @ pts).contiguous()) * mask
        return Transmission(x.to(torch.complex64), n, snr, torch.where(mask, idx, -1))

    def decode(self, received: torch.Tensor, tx: Transmission) -> torch.Tensor:
        """Receiver half: equalised symbols ``(B, symbols)`` complex (unsent positions are
        ignored) and the transmission's side information to features ``(B, C, H, W)``."""
        if not isinstance(received, torch.Tensor) or not received.is_complex():
            raise ConfigError("jscc codec: received symbols must be a complex tensor")
        if received.shape != tx.symbols.shape or received.shape[1] != self.symbols:
            raise ConfigError(f"jscc codec: received symbols must have shape "
                              f"{tuple(tx.symbols.shape)}, got {tuple(received.shape)}")
        r = torch.where(tx.mask, received, torch.zeros_like(received))
        r = torch.view_as_real(r.to(self._device())).flatten(1).float()
        cond = self._cond(tx.snr_db, tx.uses)
        g = self.g_s
        a = torch.relu(self.film_s(g.mlp[0](r.to(g.mlp[0].weight.dtype)), cond))
        out = g.conv(g.mlp[3](g.mlp[2](a)).view(len(r), *g.base))
        return out if self.training else self.conceal_nonfinite(out.float())

    # --- through a channel ----------------------------------------------------------------
    def equalize(self, channel, tx: Transmission, snr_db=None,
                 generator: torch.Generator | None = None, hard: bool = False) -> torch.Tensor:
        """Send ``tx.symbols`` through ``channel`` (a ``channels.AnalogChannel``) and
        equalise with its realisation (perfect CSI): MMSE for analog symbols; for discrete
        ones the posterior mean of the point (``hard``: the most likely point).
        ``snr_db`` (default the transmission's) may differ from what the encoder was told
        (mismatch); returns ``(B, symbols)`` complex, differentiable in the symbols."""
        from channels import AnalogChannel

        if not isinstance(channel, AnalogChannel):
            raise ConfigError(f"jscc codec: channel must be a channels.AnalogChannel, "
                              f"got {type(channel).__name__}")  # fmt: skip
        snr = tx.snr_db if snr_db is None else self._snr(snr_db, len(tx.uses))
        x = tx.symbols
        if type(channel).__name__ == "OFDMTDLChannel":  # takes one SNR per call
            if bool((snr != snr[0]).any()):
                raise ConfigError("jscc codec: an OFDM channel takes one SNR per batch")
            s = float(snr[0])
        else:
            s = snr.to(x.device)
        y, real = channel(x, snr_db=s, generator=generator, return_channel=True)
        hgain = real.h.to(y.dtype)
        no = torch.as_tensor(real.noise_var, device=y.device).float()
        no = no.reshape(-1, 1) if no.ndim == 1 else no
        g2 = hgain.abs().square()
        if not self.discrete:
            return y * hgain.conj() / (g2 + no)
        y_eq = y * hgain.conj() / g2.clamp_min(_EPS)
        no_eq = (no / g2.clamp_min(_EPS)).clamp_min(1e-6)
        pts = self.points().to(y.device)
        d = (y_eq[..., None] - pts).abs().square() / no_eq[..., None]
        if hard:
            return pts[d.argmin(-1)]
        p = torch.softmax(-d, -1)
        return torch.einsum("bkm,m->bk", p.to(pts.dtype), pts)

    def transmit(self, h: torch.Tensor, channel, snr_db=10.0, uses=None,
                 generator: torch.Generator | None = None, hard: bool = False,
                 true_snr_db=None) -> tuple[torch.Tensor, Transmission]:  # fmt: skip
        """Encode at ``snr_db``, send through ``channel`` at ``true_snr_db`` (default the
        same: no mismatch), equalise and decode. Returns ``(features, transmission)``."""
        tx = self.encode(h, snr_db, uses, generator)
        rx = self.equalize(channel, tx, true_snr_db, generator, hard)
        return self.decode(rx, tx), tx

    def forward(self, h: torch.Tensor, snr_db=10.0, channel=None, uses=None,
                generator: torch.Generator | None = None, drop_prob: float = 0.0,
                flip_prob: float = 0.0) -> JSCCOutput:  # fmt: skip
        """Training / evaluation pass through ``channel`` (default AWGN with ``generator``):
        features, zero bits, the transmission."""
        if channel is None:
            from channels import AWGN

            channel = AWGN(device=str(self._device()))
        feats, tx = self.transmit(h, channel, snr_db, uses, generator)
        return JSCCOutput(feats, torch.zeros(len(h), device=feats.device), {}, tx)

    # --- the exact link's modulator, without channel coding -------------------------------
    def send_uncoded(self, h: torch.Tensor, channel, snr_db=10.0, uses=None,
                     generator: torch.Generator | None = None,
                     true_snr_db=None) -> tuple[torch.Tensor, Transmission]:  # fmt: skip
        """Discrete codecs: the indices as bits through Sionna's mapper (the exact link's
        QAM mapper for ``qam16``, a custom constellation otherwise), ``channel.receive``
        (equalised) and Sionna's max-log demapper with hard decisions, then decode.
        No CRC and no channel code: a wrong symbol is a wrong point, not a lost packet."""
        if not self.discrete:
            raise ConfigError("send_uncoded is for discrete jscc codecs")
        from sionna.phy.mapping import Constellation, Demapper, Mapper

        tx = self.encode(h, snr_db, uses, generator)
        if self.constellation == "qam16":
            const = Constellation("qam", 4)
        else:
            const = Constellation("custom", 4, points=self.points().detach().cpu())
        idx = tx.indices.clamp_min(0).cpu()
        bits = torch.stack([(idx >> (3 - j)) & 1 for j in range(4)], -1).flatten(1).float()
        x = Mapper(constellation=const)(bits)
        snr = tx.snr_db if true_snr_db is None else self._snr(true_snr_db, len(h))
        s = float(snr[0]) if bool((snr == snr[0]).all()) else snr.cpu()
        x_eq, no_eff = channel.receive(x, snr_db=s, generator=generator)
        b = Demapper("maxlog", constellation=const, hard_out=True)(x_eq, no_eff.clamp_min(1e-6))
        b = b.view(len(h), self.symbols, 4).long()
        got = sum(b[..., j] << (3 - j) for j in range(4))
        rx = self.points().detach().cpu()[got]
        return self.decode(rx.to(self._device()), tx), tx

    # --- bytes (discrete codecs): 4 bits per sent symbol ----------------------------------
    def compress(self, h: torch.Tensor, snr_db=10.0, uses=None) -> list[Bitstream]:
        """Discrete codecs: one stream per sample, the sent indices packed 4 bits each; the
        header's meta holds the channel uses and the SNR side information (0.5 dB steps).
        Analog codecs send symbols, not bytes: ConfigError."""
        if not self.discrete:
            raise ConfigError("an analog jscc codec sends channel symbols, not bytes: use "
                              "encode()/transmit()")  # fmt: skip
        self.check_features(h)
        with torch.no_grad():
            tx = self.encode(h, snr_db, uses)
        out = []
        for b in range(len(h)):
            n = int(tx.uses[b])
            code = int(round(float(tx.snr_db[b]) * 2))
            meta = n.to_bytes(2, "big") + code.to_bytes(2, "big", signed=True)
            idx = tx.indices[b, :n].tolist() + [0] * (n % 2)
            payload = bytes((idx[i] << 4) | idx[i + 1] for i in range(0, len(idx), 2))
            header = self.make_header(meta=meta,
                                      tensors=[TensorSpec("float32", self.feature_shape)])
            out.append(Bitstream(header, [payload]))
        return out

    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        """Features from :meth:`compress` streams (a lost packet: the concealment value)."""
        if not self.discrete:
            raise ConfigError("an analog jscc codec has no bytes to decompress")
        self.check_streams(streams, 1)
        pts = self.points().detach()
        feats = []
        with torch.no_grad():
            for s in streams:
                meta = s.header.meta
                if len(meta) != 4:
                    raise BitstreamError("jscc codec: header meta must be 4 bytes")
                n = int.from_bytes(meta[:2], "big")
                snr = int.from_bytes(meta[2:], "big", signed=True) / 2
                lo, hi = SNR_RANGE
                if not 1 <= n <= self.symbols or not lo <= snr <= hi:
                    raise BitstreamError(f"jscc codec: header says {n} symbols at {snr} dB; "
                                         f"allowed 1..{self.symbols} at {lo:g}..{hi:g} dB")
                p = s.packets[0]
                if p is None:
                    feats.append(self.conceal[None].float().cpu())
                    continue
                if len(p) != (n + 1) // 2:
                    raise BitstreamError(f"jscc codec: payload of {len(p)} bytes for {n} "
                                         f"symbols (expected {(n + 1) // 2})")  # fmt: skip
                idx = [v for byte in p for v in (byte >> 4, byte & 15)][:n]
                rx = torch.zeros(1, self.symbols, dtype=torch.complex64)
                rx[0, :n] = pts.cpu()[torch.tensor(idx)]
                tx = Transmission(rx, torch.tensor([n]), torch.tensor([float(snr)]))
                tx = Transmission(rx.to(self._device()), tx.uses.to(self._device()),
                                  tx.snr_db.to(self._device()))  # fmt: skip
                feats.append(self.decode(rx.to(self._device()), tx).cpu())
        return torch.cat(feats)

    # --- warm start -----------------------------------------------------------------------
    @torch.no_grad()
    def load_task_codec(self, task) -> list[str]:
        """Copy a trained :class:`~flowcodec.codecs.task.TaskCodec`'s encoder and decoder
        (or another JSCC codec's, FiLM included) where shapes match (a task codec's latent
        of ``2 * symbols`` numbers becomes the symbols); a
        decoder narrower than the task codec's keeps the hidden units with the largest
        weight products (magnitude pruning). Returns the names of the tensors copied."""
        mine = self.state_dict()
        src = dict(task.state_dict())
        w0, b0, w2 = (src.get(k) for k in ("g_s.mlp.0.weight", "g_s.mlp.0.bias",
                                            "g_s.mlp.2.weight"))  # fmt: skip
        if w0 is not None and w2 is not None and w0.shape[0] > self.hidden \
                and w0.shape[1] == mine["g_s.mlp.0.weight"].shape[1]:
            score = w0.float().norm(dim=1) * w2.float().norm(dim=0)
            keep = score.topk(self.hidden).indices.sort().values
            src["g_s.mlp.0.weight"], src["g_s.mlp.0.bias"] = w0[keep], b0[keep]
            src["g_s.mlp.2.weight"] = w2[:, keep]
        copied = []
        for k, v in src.items():
            if (k.startswith(("g_a.", "g_s.", "film_")) or k == "conceal") and k in mine \
                    and mine[k].shape == v.shape:
                mine[k].copy_(v)
                copied.append(k)
        return copied


def _energy(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1)``: each row's symbol energy, kept away from zero."""
    return x.abs().square().sum(1, keepdim=True).clamp_min(_EPS)


def _bad_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi
