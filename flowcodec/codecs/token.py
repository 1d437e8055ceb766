"""Token codecs: compress token features ``(N, D)`` (a transformer's hidden state) by
sending only the tokens that matter, entropy-coded.

:class:`TokenPruneCodec` (``"token-prune"``):

- a learned scorer rates every token; the tokens whose score is above ``threshold`` are
  kept (the first, a class token, always when ``keep_first``), so the kept count varies
  per sample;
- each kept token is mapped to a small latent (``latent`` values), quantised and
  rANS-coded with a factorized entropy model (an ``EntropyBottleneck`` over the latent
  channels);
- token ``i`` travels in packet ``i % packets``; each packet starts with the positions of
  its kept tokens (:func:`encode_positions`: the count, then the subset's rank among all
  subsets of that size, in ``ceil(log2(n + 1)) + ceil(log2 C(n, k))`` bits), followed by
  the rANS payload of their latents. A packet decodes on its own, so a lost packet loses
  its tokens, not the sample;
- at the receiver, every position whose token was pruned or lost gets a learned fill
  vector for that position, so the tail sees ``N`` tokens in the order it expects.

Both token codecs (:class:`TokenCodecBase`) take ``prior="hyperprior"``: side values ``z``
from the mean and max of the sent token latents travel in an extra packet 0 and set a
per-channel Gaussian (mean, scale) for the latents in the token packets, which stay
independently decodable; a lost ``z`` packet conceals the whole sample with the fill.
The hyperprior's packets are arithmetic-coded (no rANS state flush, so ``z`` takes a byte
or two); the factorized default stays rANS-coded. Arithmetic-coded payloads are in stream
format 2 (:func:`range_encode`: the compiled range coder, made byte-tight; header flag
:data:`FLAG_RANGE`); streams of format 1 (:func:`arith_encode`, the exact pure-Python
coder, what these codecs wrote before) still decode.

Channels-last maps ``(H, W, C)`` (swin) are taken as ``H * W`` tokens of width ``C``.
``forward(h, drop_prob=0.0, generator=None)`` is differentiable: the keep decision is a
hard threshold with a straight-through sigmoid gradient, and the rate estimate counts the
kept tokens' latent bits plus the exact position bits.

Example
-------
>>> import torch
>>> codec = TokenPruneCodec((17, 32), latent=8, packets=2).eval()
>>> out = codec(torch.randn(3, 17, 32))
>>> tuple(out.features.shape), tuple(out.bits.shape)
((3, 17, 32), (3,))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec
from flowcodec.codecs.entropy_models import entropy_bottleneck, gaussian_conditional
from flowcodec.codecs.positions import (
    MAX_TOKENS,
    decode_positions,
    decode_positions_batch,
    encode_positions,
    encode_positions_mask,
    pack_bits,
    position_bits,
    unpack_bits,
)
from flowcodec.codecs.rans import (
    IndexPlan,
    decode_planned,
    eb_symbols,
    frozen_tables,
    rans_encode,
    to_symbols,
)
from flowcodec.codecs.table_coding import (
    ARITH_PRECISION,
    ESCAPE_RANGE,
    FLAG_RANGE,
    arith_decode,
    arith_encode,
    range_decode,
    range_decode_batch,
    range_encode,
    range_encode_batch,
)
from flowcodec.errors import ConfigError

__all__ = ["TokenPruneCodec", "TokenCodecBase", "TokenSymbols", "TokenDecoded",
           "encode_positions", "decode_positions", "position_bits", "MAX_TOKENS", "PRIORS",
           "FLAG_RANGE", "range_encode", "range_decode", "arith_encode", "arith_decode",
           "ARITH_PRECISION", "ESCAPE_RANGE", "pack_bits", "unpack_bits"]  # fmt: skip

#: Entropy models a token codec can code its latents with (``prior=``).
PRIORS = ("factorized", "hyperprior")


class _TokenEncoder(nn.Module):
    """What the device runs: the scorer and the latent transform, per token."""

    def __init__(self, codec: TokenPruneCodec) -> None:
        super().__init__()
        self.scorer, self.g_a = codec.scorer, codec.g_a
        self.n, self.d = codec.n_tokens, codec.width

    def forward(self, h):
        t = h.reshape(h.shape[0], self.n, self.d)
        return self.scorer(t), self.g_a(t)


class TokenSymbols(NamedTuple):
    """What a token codec's networks hand its coder (:meth:`TokenCodecBase._analysis`):
    the quantised latents and the side information, with no byte written yet."""

    #: Which tokens go where: the kept tokens, bool ``(B, N)`` (token-prune), or each
    #: token's canonical cluster, int64 ``(B, N)`` (token-merge); on the CPU.
    where: torch.Tensor
    #: Integer symbols ``(B, M, K)`` around the centres (``K``: tokens or clusters).
    sym: torch.Tensor
    #: CDF table indexes ``(B, M)`` of the latent channels.
    cidx: torch.Tensor
    #: The hyperprior's side symbols ``(B, Z)``, or None (factorized).
    zsym: torch.Tensor | None


class TokenDecoded(NamedTuple):
    """What a token codec's decoder reads from the streams
    (:meth:`TokenCodecBase._decode_symbols`), for the synthesis to turn into features."""

    #: Decoded int32 symbols ``(B, K, M)`` (``K``: tokens or clusters; 0 where lost).
    sym: torch.Tensor
    #: Per output position: received, bool ``(B, N)`` (token-prune), or the cluster that
    #: fills it, int64 ``(B, N)``, -1 where none arrived (token-merge).
    where: torch.Tensor
    #: Each latent's centre ``(B, M)`` (the medians, or the hyperprior's means).
    centre: torch.Tensor


class TokenCodecBase(FeatureCodec):
    """What the token codecs share: ``(N, D)`` tokens or an ``(H, W, C)`` map taken as
    ``H * W`` tokens, a per-token latent transform and synthesis with a position
    embedding, a learned fill for the positions not received, and one factorized entropy
    model whose rANS decode plans are cached per symbol count.

    ``compress(h)`` is ``_code_symbols(_analysis(h))`` and ``decompress(streams)`` is
    ``_synthesis(_decode_symbols(streams))``: :meth:`_analysis` and :meth:`_synthesis` are
    the networks (the encoder up to the quantised symbols; dequantisation and the
    synthesis), :meth:`_code_symbols` and :meth:`_decode_symbols` the coding (side codes,
    entropy coding of the symbols, stream framing and checks), so each half can be run
    and timed alone (``experiments/bench_receive.py``)."""

    layouts = ("tokens", "hwc")

    def _init_tokens(self, name: str) -> None:
        """Check the feature shape; set ``layout``, ``n_tokens`` and ``width``."""
        shape = self.feature_shape
        if len(shape) not in (2, 3):
            raise ConfigError(f"{name} takes (N, D) tokens or an (H, W, C) map, got {shape}")
        self.layout = "tokens" if len(shape) == 2 else "hwc"
        self.n_tokens, self.width = math.prod(shape[:-1]), shape[-1]
        if self.n_tokens > MAX_TOKENS:
            raise ConfigError(f"{name} takes at most {MAX_TOKENS} tokens, got {self.n_tokens}")

    def _init_transforms(self, latent: int, hidden: int, backend: str,
                         prior: str = "factorized", hyper: int = 8,
                         coder: str | None = None) -> None:  # fmt: skip
        """The latent transform, the synthesis, the fill and the entropy model(s).

        ``prior="factorized"``: one ``EntropyBottleneck`` over the ``latent`` channels
        (built in the same order as before the option existed, so checkpoints and
        streams are unchanged). ``prior="hyperprior"``: ``entropy_bottleneck`` codes the
        ``hyper`` side values ``z`` instead, ``h_a`` maps the mean and max of the
        sample's sent token latents to ``z``, ``h_s`` maps ``z`` to a per-channel mean
        and scale, and ``gaussian_conditional`` codes the token latents with them.
        """
        if prior not in PRIORS:
            raise ConfigError(f"prior must be one of {PRIORS}, got {prior!r}")
        if coder not in (None, "rans", "arith"):
            raise ConfigError(f"coder must be 'rans' or 'arith' (or None: the prior's "
                              f"default), got {coder!r}")  # fmt: skip
        self._coder_choice = coder
        if prior == "hyperprior" and (not isinstance(hyper, int) or hyper < 1):
            raise ConfigError(f"hyper must be a positive int, got {hyper!r}")
        self.prior = prior
        d = self.width
        self.g_a = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, latent))
        self.g_s_in = nn.Linear(latent, hidden)
        self.pos = nn.Parameter(torch.zeros(self.n_tokens, hidden))
        self.g_s_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, d))
        self.fill = nn.Parameter(torch.zeros(self.n_tokens, d))
        if prior == "factorized":
            self.entropy_bottleneck = entropy_bottleneck(latent, backend)
        else:
            self.hyper = int(hyper)
            self.entropy_bottleneck = entropy_bottleneck(self.hyper, backend)
            self.h_a = nn.Sequential(nn.Linear(2 * latent, hidden), nn.GELU(),
                                     nn.Linear(hidden, self.hyper))  # fmt: skip
            self.h_s = nn.Sequential(nn.Linear(self.hyper, hidden), nn.GELU(),
                                     nn.Linear(hidden, 2 * latent))  # fmt: skip
            with torch.no_grad():  # start at scale 1 (not at the 0.11 bound)
                self.h_s[-1].bias[latent:] = 1.0
            self.gaussian_conditional = gaussian_conditional(backend)
        self._plans: dict = {}

    def _prior_config(self) -> dict:
        """Config keys of the prior and the coder (none for the defaults: fingerprints
        kept)."""
        default = "arith" if self._hyper else "rans"
        coder = self._coder_choice
        extra = {"coder": coder} if coder is not None and coder != default else {}
        if self.prior == "factorized":
            return extra
        return {"prior": self.prior, "hyper": self.hyper, **extra}

    @property
    def _hyper(self) -> bool:
        return self.prior == "hyperprior"

    @property
    def _nz(self) -> int:
        """Packets ahead of the token packets: 1 (``z``) with the hyperprior, else 0."""
        return 1 if self._hyper else 0

    def aux_loss(self) -> torch.Tensor:
        """Auxiliary loss fitting the entropy bottleneck's quantiles."""
        return self.entropy_bottleneck.loss()

    def update(self, force: bool = False) -> bool:
        """Freeze the CDF tables; returns whether they changed."""
        self._plans = {}
        changed = bool(self.entropy_bottleneck.update(force=force))
        if self._hyper:
            gc = self.gaussian_conditional
            if force or gc._offset.numel() == 0:
                gc.update()
                changed = True
        return changed

    # --- the latent entropy model (either prior) -------------------------------------------
    def _y_model(self) -> nn.Module:
        return self.gaussian_conditional if self._hyper else self.entropy_bottleneck

    @staticmethod
    def _pool(y: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """Mean and max over the sent tokens of latents ``y`` ``(B, M, K)``; ``sent`` is a
        0/1 ``(B, K)`` mask. A sample with no sent token pools to zeros."""
        w = sent.to(y.dtype)[:, None, :]
        mean = (y * w).sum(-1) / w.sum(-1).clamp(min=1.0)
        mx = torch.where(w > 0, y, torch.full_like(y, -math.inf)).amax(-1)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        return torch.cat([mean, mx], 1)

    def _params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel means and scales ``(B, M)`` from ``z_hat`` ``(B, Z)``, one sample at
        a time (so the scale indexes cannot depend on the batch a sample is in)."""
        out = torch.cat([self.h_s(z_hat[b:b + 1]) for b in range(len(z_hat))])
        means, scales = out.chunk(2, 1)
        return means, scales

    def _latent_forward(self, y: torch.Tensor, sent: torch.Tensor):
        """``(y_hat, likelihoods (B, M, K), z bits (B,), extra likelihoods)`` of latents
        ``y`` ``(B, M, K)`` of which the tokens in ``sent`` ``(B, K)`` are sent."""
        if not self._hyper:
            y_hat, lik = self.entropy_bottleneck(y)
            return y_hat, lik, torch.zeros(len(y), device=y.device), {}
        z = self.h_a(self._pool(y, sent.detach()))
        z_hat, z_lik = self.entropy_bottleneck(z[..., None])  # (B, Z, 1)
        means, scales = self._params(z_hat[..., 0])
        y_hat, lik = self.gaussian_conditional(y, scales[..., None].expand_as(y),
                                               means[..., None].expand_as(y))  # fmt: skip
        return y_hat, lik, -torch.log2(z_lik).sum((1, 2)), {"z": z_lik}

    def _latent_symbols(self, y: torch.Tensor, sent: torch.Tensor):
        """What ``compress`` codes: ``(symbols (B, M, K), CDF indexes (B, M), z packets)``;
        the z packets are one arithmetic-coded string per sample, or ``None``
        (factorized)."""
        sym, idx, zsym = self._quantise(y, sent)
        return sym, idx, self._code_z(zsym)

    def _quantise(self, y: torch.Tensor, sent: torch.Tensor):
        """``(symbols (B, M, K), CDF indexes (B, M), z symbols (B, Z) or None)`` of latents
        ``y`` ``(B, M, K)`` of which the tokens in ``sent`` ``(B, K)`` are sent (with the
        hyperprior, ``h_a`` and ``h_s`` run here)."""
        chan = torch.arange(self.latent, dtype=torch.int32)
        if not self._hyper:
            sym = eb_symbols(self.entropy_bottleneck, y).cpu()
            return sym, chan.expand(len(y), -1), None
        eb = self.entropy_bottleneck
        zsym = eb_symbols(eb, self.h_a(self._pool(y, sent))[..., None])  # (B, Z, 1)
        means, scales = self._params(zsym[..., 0].float() + self._medians())
        idx = self.gaussian_conditional.build_indexes(scales).cpu()
        sym = to_symbols(y - means[..., None]).cpu()
        return sym, idx, zsym[..., 0].cpu()

    def _code_z(self, zsym: torch.Tensor | None) -> list[bytes] | None:
        """The z packets of z symbols ``(B, Z)`` (one per sample), or None (factorized)."""
        if zsym is None:
            return None
        zidx = torch.arange(self.hyper, dtype=torch.int32)
        code = range_encode if self._stream_format() == 2 else arith_encode
        return [code(self.entropy_bottleneck, zsym[b], zidx) for b in range(len(zsym))]

    #: The stream format ``compress`` writes: 2 (arithmetic-coded payloads through the
    #: compiled range coder, header flag :data:`FLAG_RANGE`) or 1 (the exact pure-Python
    #: coder: streams written before format 2). ``decompress`` reads both.
    stream_format: int = 2

    def _stream_format(self) -> int:
        if self.stream_format not in (1, 2):
            raise ConfigError(f"{self.name}: stream_format must be 1 or 2, got "
                              f"{self.stream_format!r}")  # fmt: skip
        return self.stream_format

    def _header(self) -> Header:
        """The header ``compress`` writes: flag :data:`FLAG_RANGE` when the codec has
        arithmetic-coded payloads and writes format 2."""
        header = self.make_header(tensors=[TensorSpec("float32", self.feature_shape)])
        ranged = self._stream_format() == 2 and (self._hyper or self._coder() == "arith")
        return dataclasses.replace(header, flags=FLAG_RANGE) if ranged else header

    @staticmethod
    def format_of(stream: Bitstream) -> int:
        """The stream format of a stream's arithmetic-coded payloads, from its header flags
        (2 with :data:`FLAG_RANGE`, else 1); BitstreamError for an unknown flag."""
        flags = stream.header.flags
        if flags & ~FLAG_RANGE:
            raise BitstreamError(f"token codec: unknown header flags 0x{flags:02x}")
        return 2 if flags & FLAG_RANGE else 1

    def _received(self, streams: Sequence[Bitstream], have_z: torch.Tensor) -> list[list]:
        """Per token packet, its received payloads ``(sample, data, stream format)`` in
        sample order. A sample with no z has no scales (its whole sample gets the fill),
        and a lost packet has no payload; :meth:`format_of` checks each stream read, in
        order."""
        recv = [[] for _ in range(self.packets)]
        nz, format_of = self._nz, self.format_of
        for b, (s, z) in enumerate(zip(streams, have_z.tolist())):
            if not z:
                continue
            fmt = format_of(s)
            for p, data in enumerate(s.packets[nz:]):
                if data is not None:
                    recv[p].append((b, data, fmt))
        return recv

    def _read_z(self, streams: Sequence[Bitstream]):
        """Decoder side: ``(centres (B, M), CDF indexes (B, M), z received (B,))``. A
        latent decodes to its symbol plus its centre (the factorized medians, or the
        predicted means). With the hyperprior, a sample whose z packet is lost has no
        indexes: its token packets are not read and the whole sample gets the fill."""
        n = len(streams)
        chan = torch.arange(self.latent, dtype=torch.int32)
        dev = self._device()
        if not self._hyper:
            cen = self._medians().to(dev).expand(n, -1)
            return cen, chan.expand(n, -1), torch.ones(n, dtype=torch.bool)
        eb = self.entropy_bottleneck
        zidx = torch.arange(self.hyper, dtype=torch.int32)
        zsym = torch.zeros(n, self.hyper, dtype=torch.int32)
        have = torch.tensor([s.packets[0] is not None for s in streams])
        for b, s in enumerate(streams):
            if have[b]:
                decode = range_decode if self.format_of(s) == 2 else arith_decode
                zsym[b] = decode(eb, s.packets[0], zidx)
        means, scales = self._params(zsym.to(dev).float() + self._medians().to(dev))
        return means, self.gaussian_conditional.build_indexes(scales).cpu(), have

    #: How the token latents are coded: ``"arith"`` (exact arithmetic coding, the
    #: hyperprior's default, with the scale-indexed rows) or ``"rans"`` (the factorized
    #: default, so its streams are byte for byte what they were). Development switches for
    #: ``experiments/token_prior_rd.py``: streams of the two are not interchangeable and
    #: the config does not record them.
    _token_coder = "arith"
    _factorized_coder = "rans"

    def _coder(self) -> str:
        if self._coder_choice is not None:
            return self._coder_choice
        return self._token_coder if self._hyper else self._factorized_coder

    def _encode_tokens(self, model, tables, s: torch.Tensor, idx: torch.Tensor) -> bytes:
        """Payload of token latents ``s`` ``(k, M)`` with CDF indexes ``idx`` ``(M,)``."""
        if self._coder() == "arith":
            code = range_encode if self._stream_format() == 2 else arith_encode
            return code(model, s, idx.expand_as(s))
        return rans_encode(model, s, idx.expand_as(s), tables)

    def _encode_tokens_batch(self, model, tables, s: torch.Tensor,
                             idx: torch.Tensor) -> list[bytes]:  # fmt: skip
        """The payloads of ``B`` samples' token latents ``s`` ``(B, k, M)`` with CDF indexes
        ``idx`` ``(B, M)``: :meth:`_encode_tokens` of each, format 2 for the whole batch at
        once (:func:`range_encode_batch`, the same bytes)."""
        if self._coder() == "arith" and self._stream_format() == 2:
            return range_encode_batch(model, s, idx[:, None, :].expand_as(s))
        return [self._encode_tokens(model, tables, s[b], idx[b]) for b in range(len(s))]

    def _decode_tokens_batch(self, tables, payloads: list[bytes], idx: torch.Tensor, k: int,
                             fmts: list[int]) -> torch.Tensor:  # fmt: skip
        """:meth:`_decode_tokens` of several payloads (payload ``j`` with CDF indexes
        ``idx[j]`` ``(M,)`` and stream format ``fmts[j]``): int32 symbols ``(len, k, M)``;
        the format-2 arithmetic-coded ones decoded for the batch at once
        (:func:`range_decode_batch`, the same checks)."""
        out = torch.zeros(len(payloads), k, self.latent, dtype=torch.int32)
        if not payloads:
            return out
        fast = [j for j, f in enumerate(fmts) if f == 2] if self._coder() == "arith" else []
        if fast:
            rows = idx[fast][:, None, :].expand(len(fast), k, -1)
            sym = range_decode_batch(self._y_model(), [payloads[j] for j in fast], rows)
            out[fast] = torch.from_numpy(sym.astype(np.int32)).reshape(len(fast), k, -1)
        if len(fast) < len(payloads):
            done = set(fast)
            for j, data in enumerate(payloads):
                if j not in done:
                    out[j] = self._decode_tokens(tables, data, idx[j], k, fmts[j])
        return out

    def _decode_tokens(self, tables, data: bytes, idx: torch.Tensor, k: int,
                       fmt: int = 1) -> torch.Tensor:  # fmt: skip
        """Symbols ``(k, M)`` of ``k`` tokens from a payload, channel indexes ``idx``
        ``(M,)`` (rANS plans cached per count for the factorized prior); ``fmt``: the
        stream format of arithmetic-coded payloads."""
        if self._coder() == "arith":
            decode = range_decode if fmt == 2 else arith_decode
            return decode(self._y_model(), data, idx.expand(k, -1))
        if not self._hyper:
            return decode_planned(tables, data, self._plan(tables, k))
        return decode_planned(tables, data, IndexPlan(tables, idx.expand(k, -1)))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> TokenCodecBase:
        """Set the concealment value and the fill tokens to the training features' mean."""
        super().fit(features)
        self.fill.copy_(self.conceal.reshape(self.n_tokens, self.width))
        return self

    def _device(self) -> torch.device:
        return self.fill.device

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], self.n_tokens, self.width)

    def _medians(self) -> torch.Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].detach()

    def _plan(self, tables, k: int) -> IndexPlan:
        plan = self._plans.get(k)
        if plan is None:
            idx = torch.arange(self.latent, dtype=torch.int32).expand(k, self.latent)
            plan = self._plans[k] = IndexPlan(tables, idx)
        return plan

    def _with_fill(self, rec: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
        """Decoded tokens ``rec`` ``(B, N, D)`` where ``got``, the fill elsewhere, as
        float32 features of the input's shape (non-finite values concealed)."""
        out = torch.where(got.to(rec.device)[..., None], rec, self.fill.detach())
        out = out.float().cpu().reshape(len(rec), *self.feature_shape)
        return self.conceal_nonfinite(out)


@register_codec("token-prune")
class TokenPruneCodec(TokenCodecBase):
    """Importance-based token pruning with a factorized entropy model over kept tokens.

    Inputs: ``h`` float ``(B, N, D)`` (or ``(B, H, W, C)``, taken as ``H * W`` tokens).
    ``forward`` returns a :class:`CodecOutput` (features of the input's shape, estimated
    bits ``(B,)``, likelihoods ``{"y": (B, latent, N)}``, and ``kept``, a bool
    ``(B, N)`` of the tokens sent, as the attribute ``codec.last_kept``). ``compress``
    returns ``B`` streams of ``packets`` packets (after ``update()``); ``decompress``
    returns float32 features with pruned and lost tokens replaced by the learned fill.

    Parameters
    ----------
    feature_shape : (N, D) or (H, W, C)
        Token features (layout ``"tokens"``) or a channels-last map (``"hwc"``).
    latent : int
        Latent values per kept token.
    hidden : int
        Width of the scorer's, encoder's and decoder's hidden layers.
    packets : int
        Packets per sample; token ``i`` travels in packet ``i % packets``.
    keep_first : bool
        Always send token 0 (a class token).
    threshold : float
        Score logit above which a token is kept.
    backend : {"auto", "compressai", "torch"}
        Entropy-model implementation (see :mod:`flowcodec.codecs.entropy`).
    prior : {"factorized", "hyperprior"}
        Entropy model of the kept tokens' latents. ``"hyperprior"`` adds a packet 0
        holding ``z`` (``hyper`` values from the mean and max of the kept latents) that
        sets a per-channel Gaussian (mean, scale) for the token packets ``1..packets``;
        a lost ``z`` packet conceals the whole sample with the fill.
    hyper : int
        Side values ``z`` per sample (hyperprior only).
    coder : {None, "rans", "arith"}
        How the token latents are coded: CompressAI's rANS (the factorized prior's
        default), or the exact arithmetic coder of :mod:`flowcodec.codecs.arith` (the
        hyperprior's default), which has no 4-byte state flush. The trained weights are
        the same for both; only the streams differ.
    """

    def __init__(self, feature_shape: Sequence[int], latent: int = 16, hidden: int = 64,
                 packets: int = 2, keep_first: bool = True, threshold: float = 0.0,
                 backend: str = "auto", prior: str = "factorized",
                 hyper: int = 8, coder: str | None = None) -> None:  # fmt: skip
        super().__init__(feature_shape)
        self._init_tokens("token-prune")
        if latent < 1 or hidden < 1:
            raise ConfigError("latent and hidden must be positive")
        if not 1 <= packets <= self.n_tokens:
            raise ConfigError(f"packets must be in 1..{self.n_tokens}, got {packets}")
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be finite, got {threshold}")
        self.latent, self.hidden, self.packets = int(latent), int(hidden), int(packets)
        self.keep_first, self.threshold = bool(keep_first), float(threshold)
        self.backend = backend
        d = self.width
        self.scorer = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(),
                                    nn.Linear(hidden, 1))  # fmt: skip
        nn.init.constant_(self.scorer[-1].bias, 2.0)  # start by keeping every token
        self._init_transforms(self.latent, hidden, backend, prior, hyper, coder)

    def config(self) -> dict:
        return {**super().config(), "latent": self.latent, "hidden": self.hidden,
                "packets": self.packets, "keep_first": self.keep_first,
                "threshold": self.threshold, **self._prior_config()}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return _TokenEncoder(self)

    # --- pieces ----------------------------------------------------------------------------
    def _keep(self, logits: torch.Tensor) -> torch.Tensor:
        keep = logits > self.threshold
        if self.keep_first:
            keep[:, 0] = True
        return keep

    def _synth(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, N, M)`` -> tokens ``(B, N, D)``."""
        return self.g_s_out(self.g_s_in(y_hat) + self.pos)

    def _candidates(self, p: int) -> range:
        return range(p, self.n_tokens, self.packets)

    def _position_bits(self, keep: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(keep.shape[0])
        for b, row in enumerate(keep.tolist()):
            for p in range(self.packets):
                cand = self._candidates(p)
                k = sum(row[i] for i in cand)
                out[b] += 8 * -(-position_bits(k, len(cand)) // 8)
        return out

    # --- the three calls -------------------------------------------------------------------
    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        self.check_features(h)
        t = self._tokens(h)
        logits = self.scorer(t).squeeze(-1)
        keep = self._keep(logits.detach())
        soft = torch.sigmoid(logits - self.threshold)
        m = keep.float() + soft - soft.detach()  # hard forward, sigmoid gradient
        if self.keep_first:
            m = torch.cat([torch.ones_like(m[:, :1]), m[:, 1:]], 1)
        y_hat, lik, z_bits, extra = self._latent_forward(self.g_a(t).transpose(1, 2), keep)
        tok_bits = -torch.log2(lik).sum(1)  # (B, N)
        bits = (m * tok_bits).sum(1) + self._position_bits(keep).to(h.device) + z_bits
        if drop_prob > 0:
            lost = torch.rand(len(h), self.packets, generator=generator) < drop_prob
            idx = torch.arange(self.n_tokens) % self.packets
            lost = lost[:, idx]
            if self._hyper:  # a lost z packet loses every token of the sample
                lost = lost | (torch.rand(len(h), 1, generator=generator) < drop_prob)
            m = m * (~lost).to(m.device, m.dtype)
        rec = self._synth(y_hat.transpose(1, 2))
        out = m[..., None] * rec + (1 - m[..., None]) * self.fill
        self.last_kept = keep
        return CodecOutput(out.reshape(h.shape), bits, {"y": lik, **extra})

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        return self._code_symbols(self._analysis(h))

    @torch.no_grad()
    def _analysis(self, h: torch.Tensor) -> TokenSymbols:
        """The networks of :meth:`compress`: the scorer's keep decision and the quantised
        latents of every token ``(B, M, N)``."""
        t = self._tokens(h.to(self._device()).float())
        keep = self._keep(self.scorer(t).squeeze(-1))
        sym, cidx, zsym = self._quantise(self.g_a(t).transpose(1, 2), keep)  # B,M,N
        return TokenSymbols(keep.cpu(), sym, cidx, zsym)

    def _code_symbols(self, s: TokenSymbols) -> list[Bitstream]:
        """The coding of :meth:`compress`: the streams of :meth:`_analysis`'s output. Each
        packet's position codes and token payloads are coded for the whole batch at once
        (:func:`encode_positions_mask`; the payloads of the samples that keep as many of
        the packet's tokens together, :meth:`_encode_tokens_batch`): the bytes of
        :func:`encode_positions` and :meth:`_encode_tokens` sample by sample."""
        keep, sym, cidx = s.where, s.sym, s.cidx
        zpk = self._code_z(s.zsym)
        model = self._y_model()
        tables = frozen_tables(model)
        header = self._header()
        nb = len(sym)
        keep = keep.numpy()
        per_packet = []
        for p in range(self.packets):
            cand = np.asarray(self._candidates(p))
            mask = keep[:, cand]  # (B, c)
            counts = mask.sum(1)
            order = np.argsort(~mask, axis=1, kind="stable")  # kept first, in order
            data = encode_positions_mask(mask)
            s_p = sym[:, :, torch.from_numpy(cand)].transpose(1, 2)  # (B, c, M)
            s_p = s_p.gather(1, torch.from_numpy(order)[..., None].expand_as(s_p))
            for k in np.unique(counts[counts > 0]).tolist():
                rows = np.flatnonzero(counts == k)
                tok = self._encode_tokens_batch(model, tables, s_p[rows, :k],
                                                cidx[torch.from_numpy(rows)])  # fmt: skip
                for b, t in zip(rows.tolist(), tok):
                    data[b] += t
            per_packet.append(data)
        out = []
        for b in range(nb):
            packets = [] if zpk is None else [zpk[b]]
            packets.extend(data[b] for data in per_packet)
            out.append(Bitstream(header, packets))
        return out

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        return self._synthesis(self._decode_symbols(streams))

    @torch.no_grad()
    def _decode_symbols(self, streams: Sequence[Bitstream]) -> TokenDecoded:
        """The coding of :meth:`decompress`: the streams checked and read back to symbols
        ``(B, N, M)`` and the received tokens (with the hyperprior, ``h_s`` runs here: the
        token payloads are read with the scales it gives)."""
        self.check_streams(streams, self._nz + self.packets)
        tables = frozen_tables(self._y_model())
        centre, cidx, have_z = self._read_z(streams)
        n, m = self.n_tokens, self.latent
        sym = torch.zeros(len(streams), n, m, dtype=torch.int32)
        got = np.zeros((len(streams), n), dtype=bool)
        # per packet, the received payloads: (sample, data, stream format); a sample with
        # no z has no scales, so the whole sample gets the fill; a lost packet's tokens too
        recv = self._received(streams, have_z)
        reads = []
        for p in range(self.packets):  # every packet's position codes first
            if not recv[p]:
                continue
            cand = np.asarray(self._candidates(p))
            datas = [d for _, d, _ in recv[p]]
            local, used = decode_positions_batch(datas, len(cand))
            counts = np.fromiter(map(len, local), np.int64, len(local))
            rest = [len(d) - u for d, u in zip(datas, used)]
            for j in np.flatnonzero(counts == 0).tolist():
                if rest[j]:
                    raise BitstreamError(f"token packet {p}: {rest[j]} bytes after a "
                                         "position code with no tokens")  # fmt: skip
            reads.append((p, cand, local, used, counts))
        for p, cand, local, used, counts in reads:  # then the token payloads, by token count
            samples = np.array([b for b, _, _ in recv[p]], dtype=np.int64)
            for k in np.unique(counts[counts > 0]).tolist():
                at = np.flatnonzero(counts == k)
                rows = samples[at]
                payloads = [bytes(recv[p][j][1][used[j]:]) for j in at.tolist()]
                fmts = [recv[p][j][2] for j in at.tolist()]
                pos = cand[np.array([local[j] for j in at.tolist()], np.int64)]
                dec = self._decode_tokens_batch(tables, payloads, cidx[torch.from_numpy(rows)],
                                                k, fmts)  # fmt: skip
                sym[torch.from_numpy(rows)[:, None], torch.from_numpy(pos)] = dec
                got[rows[:, None], pos] = True
        return TokenDecoded(sym, torch.from_numpy(got), centre)

    @torch.no_grad()
    def _synthesis(self, d: TokenDecoded) -> torch.Tensor:
        """The networks of :meth:`decompress`: features from :meth:`_decode_symbols`."""
        y_hat = d.sym.to(self._device()).float() + d.centre[:, None, :]
        return self._with_fill(self._synth(y_hat), d.where)
