"""A hidden-state codec for a split point of the language family (issue 29).

What crosses split point ``p`` of a :class:`~flowcodec.family.lm.LanguageFamily` is one
hidden state of width ``D`` per token. :class:`HiddenStateCodec` (registry name
``"lm-hidden"``) turns the device's states ``(B, T, D)`` into one packet per sample and
the edge's decoder turns it back into states for the larger member's remaining blocks, so
the edge never runs the shared blocks ``1..p`` itself:

- **side information** the receiver has for free: the positions of the tokens (it knows
  where it is in the sequence) and, with ``condition=True``, the token ids, which travel
  anyway in speculative decoding (the drafts). Their embedding ``e`` (a learned copy of the
  family's token and position embeddings, :meth:`HiddenStateCodec.init_from`) is what the
  decoder starts from; the codec sends what the blocks added to it;
- **analysis** (device, per token): ``LayerNorm -> Linear(D, hidden) -> GELU ->
  Linear(hidden, latent)`` on ``h - e``;
- **variable rate in one model**: ``rates`` rate points, each a learned per-channel gain
  before rounding (its learned inverse after) and its own factorized entropy model
  (:func:`~flowcodec.codecs.entropy.entropy_bottleneck`); the rate point is written in the
  header's meta byte (``0x80 | r``), so any rate point decodes with the same checkpoint;
- **quantisation**: uniform noise in training, rounding (to the entropy model's medians,
  clamped to its tables' support) in eval mode and in ``compress``;
- **coding**: the symbols are range-coded with the frozen tables
  (:func:`flowcodec.codecs.arith.encode_batch`, the byte-tight stream format 2 of the task
  codecs); a packet is ``varint(T) | payload``;
- **synthesis** (edge, per token): ``e + MLP(Linear(latent, hidden)(y) +
  Linear(D, hidden)(LayerNorm(e)))``.

Rate is measured from real bytes: ``8 * len(stream.to_bytes())`` (a self-contained stream,
header included) or, in a session where the header went once,
``8 * len(stream.to_compact())``. The header declares the largest shape a stream decodes to
``(context, D)``; the packet's token count ``T`` must be at most that, and the payload at
most :func:`~flowcodec.codecs.arith.range_max_bytes` of ``T * latent`` symbols.

The positions (``start``) and, with ``condition=True``, the ids are side information:
``decompress`` must be given the same ones ``compress`` had.

:func:`train_hidden_codec` trains a codec against the frozen family (distillation of the
larger member on the decoded states + ``lambda * bits``); :func:`evaluate_hidden_codec`
measures the curve (bits per token from real bytes against the member's loss);
``python -m flowcodec.lm.codec train|eval`` (also ``flowcodec lm codec ...``) run them.

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=16).eval()
>>> codec = HiddenStateCodec((16, 32), point=1, latent=4, hidden=16, rates=2).init_from(fam)
>>> _ = codec.eval().update(force=True)
>>> ids = torch.randint(0, 65, (2, 10))
>>> h = fam.features(ids, 1)
>>> streams = codec.compress(h, rate=1, ids=ids)
>>> out = codec.decompress(streams, ids=ids)
>>> tuple(out.shape), torch.equal(out, codec(h, rate=1, ids=ids).features)
((2, 10, 32), True)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec
from flowcodec.codecs import arith
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec
from flowcodec.codecs.entropy import entropy_bottleneck
from flowcodec.errors import CheckpointError, ConfigError

__all__ = ["HiddenStateCodec", "HiddenCodecTrainConfig", "HiddenCodecTrainResult",
           "train_hidden_codec", "evaluate_hidden_codec", "save_hidden_codec",
           "load_hidden_codec", "add_codec_commands", "main", "FORMAT2", "TEXT_BITS_PER_CHAR"]

#: Bit 7 of the header's meta byte: the payload is range-coded (format 2, the only one).
FORMAT2 = 0x80

#: Sending the text itself: one byte per character.
TEXT_BITS_PER_CHAR = 8.0

#: Latents are clamped to this magnitude before rounding (a diverged model or a hostile
#: input cannot ask for a symbol far outside the tables: it is clamped to their support).
_CLAMP = 1e4


def _put_count(n: int) -> bytes:
    """``n`` as an unsigned LEB128 varint."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _get_count(data: bytes, limit: int) -> tuple[int, int]:
    """``(count, bytes used)`` of the varint at the start of ``data``; BitstreamError when it
    is truncated, over-long, zero or above ``limit``."""
    n, shift = 0, 0
    for i in range(3):  # 3 varint bytes hold 21 bits, past any context
        if i >= len(data):
            raise BitstreamError("hidden-state packet: the token count is truncated")
        b = data[i]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if b == 0 and i > 0:
                raise BitstreamError("hidden-state packet: over-long token count")
            if not 1 <= n <= limit:
                raise BitstreamError(f"hidden-state packet declares {n} tokens; this stream "
                                     f"holds 1..{limit}")  # fmt: skip
            return n, i + 1
    raise BitstreamError("hidden-state packet: the token count is longer than 3 bytes")


@register_codec("lm-hidden")
class HiddenStateCodec(FeatureCodec):
    """Hidden states of a language family's split point as one entropy-coded packet per
    sample (see the module docstring).

    Inputs: ``h`` float ``(B, T, D)``, the states of ``T`` consecutive tokens at positions
    ``start .. start + T - 1`` (``start + T <= context``); ``ids`` int64 ``(B, T)``, the
    tokens (needed with ``condition=True``, by both sides). ``forward(h, rate, ids, start)``
    returns a :class:`~flowcodec.codecs.base.CodecOutput` (states ``(B, T, D)``, estimated
    bits ``(B,)``, likelihoods ``{"y": (B * T, latent, 1)}``); ``compress`` returns ``B``
    streams of one packet (after ``update()``); ``decompress`` returns float32 ``(B, T, D)``.

    Parameters
    ----------
    feature_shape : (context, D)
        The family's context and width (``family.feature_shape(point)``).
    point : int
        The split point the codec was made for (recorded; the codec itself does not run
        the family).
    latent : int
        Latent values per token.
    hidden : int
        Width of the analysis and synthesis MLPs.
    rates : int
        Rate points (gain vector + entropy model each; 0 is the lowest rate), 1..127.
    vocab : int
        Token ids the side information takes (with ``condition=True``).
    condition : bool
        Let both sides use the token ids' embedding (the ids travel with the states).
    backend : {"auto", "compressai", "torch"}
        Entropy-model implementation (see :mod:`flowcodec.codecs.entropy`).
    """

    layouts = ("tokens",)

    def __init__(self, feature_shape: Sequence[int], point: int = 1, latent: int = 32,
                 hidden: int = 256, rates: int = 4, vocab: int = 65, condition: bool = True,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__(feature_shape)
        if len(self.feature_shape) != 2:
            raise ConfigError(f"lm-hidden codec: feature_shape must be (context, D), got "
                              f"{self.feature_shape}")  # fmt: skip
        bad = []
        for name, v, lo, hi in (("point", point, 1, 64), ("latent", latent, 1, 1024),
                                ("hidden", hidden, 1, 8192), ("rates", rates, 1, 127),
                                ("vocab", vocab, 2, 1 << 16)):  # fmt: skip
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                bad.append(f"{name}={v!r} (an int in {lo}..{hi})")
        if self.feature_shape[0] > 1 << 14:
            bad.append(f"context={self.feature_shape[0]} (at most {1 << 14})")
        if bad:
            raise ConfigError("lm-hidden codec: " + "; ".join(bad))
        self.context, self.dim = self.feature_shape
        self.point, self.latent, self.hidden, self.rates = point, latent, hidden, rates
        self.vocab, self.condition, self.backend = vocab, bool(condition), backend
        d = self.dim
        self.pos = nn.Embedding(self.context, d)
        self.tok = nn.Embedding(vocab, d) if self.condition else None
        self.g_a = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(),
                                 nn.Linear(hidden, latent))  # fmt: skip
        self.s_in = nn.Linear(latent, hidden)
        self.s_norm = nn.LayerNorm(d)
        self.s_side = nn.Linear(d, hidden)
        self.g_s = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, d))  # fmt: skip
        for emb in (self.pos, self.tok):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        # rate point r: y * exp(gain[r]) is rounded; the decoder sees y_hat * exp(inv_gain[r])
        span = torch.linspace(-math.log(4.0), 0.0, rates) if rates > 1 else torch.zeros(1)
        self.gain = nn.Parameter(span[:, None].repeat(1, latent))
        self.inv_gain = nn.Parameter(-span[:, None].repeat(1, latent))
        self.entropy_bottlenecks = nn.ModuleList(entropy_bottleneck(latent, backend)
                                                 for _ in range(rates))  # fmt: skip

    # --- configuration --------------------------------------------------------------------
    def config(self) -> dict:
        return {**super().config(), "point": self.point, "latent": self.latent,
                "hidden": self.hidden, "rates": self.rates, "vocab": self.vocab,
                "condition": self.condition, "format": 2}  # fmt: skip

    def kwargs(self) -> dict:
        """The constructor's arguments besides ``feature_shape`` (what a checkpoint stores)."""
        return {"point": self.point, "latent": self.latent, "hidden": self.hidden,
                "rates": self.rates, "vocab": self.vocab, "condition": self.condition,
                "backend": self.backend}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return self.g_a

    def flops_per_token(self) -> dict[str, int]:
        """FLOPs per token of the device's analysis (``encoder``) and the edge's synthesis
        (``decoder``): 2 per multiply-accumulate of the linear layers, as
        :func:`flowcodec.flops.count_flops` counts them (layer norms and GELUs not)."""
        d, h, m = self.dim, self.hidden, self.latent
        return {"encoder": 2 * (d * h + h * m), "decoder": 2 * (m * h + d * h + h * h + h * d)}

    @torch.no_grad()
    def init_from(self, family) -> HiddenStateCodec:
        """Start the side embeddings from ``family``'s token and position embeddings (the
        decoder then starts from what stage 1 adds its blocks to). Returns self."""
        embed = family.stages[0].embed
        if tuple(embed.pos.weight.shape) != tuple(self.pos.weight.shape):
            raise ConfigError(f"lm-hidden codec for {self.feature_shape} cannot start from a "
                              f"family with positions {tuple(embed.pos.weight.shape)}")
        self.pos.weight.copy_(embed.pos.weight)
        if self.tok is not None:
            if tuple(embed.tok.weight.shape) != tuple(self.tok.weight.shape):
                raise ConfigError(f"lm-hidden codec with vocab {self.vocab} cannot start from "
                                  f"a family with vocab {embed.tok.weight.shape[0]}")
            self.tok.weight.copy_(embed.tok.weight)
        return self

    def aux_loss(self) -> torch.Tensor:
        """Quantile-fitting loss of every rate point's entropy model."""
        return sum(eb.loss() for eb in self.entropy_bottlenecks)

    def _device(self) -> torch.device:
        return self.gain.device

    def _rate(self, rate: int | None) -> int:
        r = self.rates - 1 if rate is None else rate
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.rates:
            raise ConfigError(f"lm-hidden codec: rate must be an int in 0..{self.rates - 1}, "
                              f"got {rate!r}")  # fmt: skip
        return r

    # --- checks ---------------------------------------------------------------------------
    def _check_start(self, start, n: int) -> None:
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ConfigError(f"lm-hidden codec: start must be an int >= 0, got {start!r}")
        if start + n > self.context:
            raise ConfigError(f"lm-hidden codec: positions {start}..{start + n - 1} exceed "
                              f"the context of {self.context} tokens")  # fmt: skip

    def _check_ids(self, ids, b: int, n: int) -> None:
        if ids is None:
            if self.condition:
                raise ConfigError("lm-hidden codec with condition=True needs the token ids "
                                  "(ids=, int64 (B, T)) on both sides")  # fmt: skip
            return
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) \
                or tuple(ids.shape) != (b, n):  # fmt: skip
            got = (f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                   else type(ids).__name__)  # fmt: skip
            raise ConfigError(f"lm-hidden codec: ids must be int64 ({b}, {n}), got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ConfigError(f"lm-hidden codec: ids must lie in 0..{self.vocab - 1}, got "
                              f"{int(ids.min())}..{int(ids.max())}")  # fmt: skip

    def check_features(self, h: torch.Tensor, ids=None, start: int = 0) -> None:
        """ConfigError unless ``h`` is a finite float ``(B, T, D)`` with ``B >= 1`` and
        ``start + T <= context``, and ``ids`` fit it (see the class docstring)."""
        if not isinstance(h, torch.Tensor):
            raise ConfigError(f"lm-hidden codec: states must be a torch.Tensor, got "
                              f"{type(h).__name__}")  # fmt: skip
        if h.ndim != 3 or h.shape[-1] != self.dim or h.shape[0] < 1 or h.shape[1] < 1:
            raise ConfigError(f"lm-hidden codec: states must have shape (B, T, {self.dim}) with "
                              f"B, T >= 1, got {tuple(h.shape)}")  # fmt: skip
        if not h.is_floating_point():
            raise ConfigError(f"lm-hidden codec: states must be floating point, got {h.dtype}")
        if not bool(torch.isfinite(h).all()):
            raise ConfigError("lm-hidden codec: states contain NaN or inf")
        self._check_start(start, h.shape[1])
        self._check_ids(ids, h.shape[0], h.shape[1])

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> HiddenStateCodec:
        """Set ``conceal`` to the mean state per position of ``features`` ``(N, context, D)``
        (the base class's statistics; the decoder conceals with the side information)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 3 \
                or tuple(features.shape[1:]) != self.feature_shape or not len(features):
            raise ConfigError(f"lm-hidden codec: fit takes states (N, {self.context}, "
                              f"{self.dim}), got {getattr(features, 'shape', type(features))}")
        self.conceal.copy_(features.float().mean(0))
        return self

    # --- the transforms -------------------------------------------------------------------
    def side(self, ids: torch.Tensor | None, start: int, b: int, n: int) -> torch.Tensor:
        """What the receiver knows of ``n`` tokens at ``start..``: the embedding of their
        positions, plus that of their ids with ``condition=True``; ``(B, n, D)``."""
        dev = self._device()
        e = self.pos(torch.arange(start, start + n, device=dev)).expand(b, n, self.dim)
        if self.condition:
            e = e + self.tok(ids.to(dev).long())
        return e

    def _latent(self, h: torch.Tensor, e: torch.Tensor, r: int) -> torch.Tensor:
        y = self.g_a(h.to(self._device()).float() - e) * self.gain[r].exp()
        return y.clamp(-_CLAMP, _CLAMP)

    def _synth(self, y_hat: torch.Tensor, e: torch.Tensor, r: int) -> torch.Tensor:
        u = self.s_in(y_hat * self.inv_gain[r].exp()) + self.s_side(self.s_norm(e))
        return e + self.g_s(u)

    def _medians(self, r: int) -> torch.Tensor:
        return self.entropy_bottlenecks[r].quantiles[:, 0, 1].detach()

    def forward(self, h: torch.Tensor, rate: int | None = None, ids: torch.Tensor | None = None,
                start: int = 0) -> CodecOutput:  # fmt: skip
        """Noisy (training) or rounded (eval) latents at rate point ``rate`` (default the
        highest). In eval mode after ``update()`` the rounded symbols are clamped to the
        tables' support, so the states equal what ``decompress`` returns."""
        self.check_features(h, ids, start)
        r = self._rate(rate)
        b, n, _ = h.shape
        e = self.side(ids, start, b, n)
        y = self._latent(h, e, r)
        with torch.autocast(y.device.type, enabled=False):  # likelihoods in float32
            y_hat, lik = self.entropy_bottlenecks[r](y.reshape(b * n, self.latent, 1).float())
        y_hat = y_hat.reshape(b, n, self.latent)
        if not self.training and self.entropy_bottlenecks[r]._offset.numel():
            c = self._coding(r)
            med = self._medians(r)
            k = torch.round(y - med).clamp(c["lo_t"].to(y.device), c["hi_t"].to(y.device))
            y_hat = k + med
        bits = -torch.log2(lik).reshape(b, -1).sum(1)
        return CodecOutput(self._synth(y_hat, e, r), bits, {"y": lik})

    # --- coding ---------------------------------------------------------------------------
    def update(self, force: bool = False) -> bool:
        """Freeze every rate point's CDF tables; returns whether any changed."""
        changed = [bool(eb.update(force=force)) for eb in self.entropy_bottlenecks]
        self._coding_cache = {}
        return any(changed)

    def _coding(self, r: int) -> dict:
        """Rate point ``r``'s frozen tables: supports ``lo``/``hi`` (int64 ``(latent,)``, also
        as tensors ``lo_t``/``hi_t``), ``last`` (the highest codable index per channel: the
        escape bin is never sent) and the rows as exact probabilities ``probs``
        ``(latent, W)``."""
        cache = self.__dict__.setdefault("_coding_cache", {})
        if r not in cache:
            eb = self.entropy_bottlenecks[r]
            if eb._quantized_cdf.numel() == 0:
                raise ConfigError("lm-hidden codec has no CDF tables: call codec.update() first")
            cdf = eb._quantized_cdf.cpu().tolist()
            lengths = eb._cdf_length.reshape(-1).cpu().tolist()
            offsets = eb._offset.reshape(-1).cpu().tolist()
            if len(cdf) != self.latent or len(lengths) != self.latent:
                raise ConfigError(f"lm-hidden codec: rate point {r} has {len(cdf)} CDF rows, "
                                  f"expected {self.latent}")  # fmt: skip
            rows = [row[: int(n)] for row, n in zip(cdf, lengths)]
            for row in rows:
                if len(row) < 3:
                    raise ConfigError(f"lm-hidden codec: rate point {r} has a CDF row of "
                                      f"{len(row)} entries")  # fmt: skip
                arith.check_cdf(row)
            lo = np.asarray(offsets, dtype=np.int64)
            last = np.asarray([len(row) - 3 for row in rows], dtype=np.int64)
            width = max(len(row) - 1 for row in rows)
            cache[r] = {"lo": lo, "hi": lo + last, "last": last,
                        "probs": arith.dyadic_probs(rows, width),
                        "lo_t": torch.from_numpy(lo).float(),
                        "hi_t": torch.from_numpy(lo + last).float()}  # fmt: skip
        return cache[r]

    def header(self, rate: int | None = None) -> Header:
        """The header ``compress`` writes at rate point ``rate`` (what a session sends
        once): codec name, fingerprint, the largest shape ``(context, D)`` and the meta
        byte ``0x80 | rate``."""
        r = self._rate(rate)
        return self.make_header(meta=bytes([FORMAT2 | r]),
                                tensors=[TensorSpec("float32", self.feature_shape)])

    def rate_of(self, stream: Bitstream) -> int:
        """The rate point a stream was coded at (its header's meta byte); BitstreamError
        for anything else."""
        meta = stream.header.meta
        if len(meta) != 1 or not meta[0] & FORMAT2 or (meta[0] & ~FORMAT2) >= self.rates:
            raise BitstreamError(f"lm-hidden codec: header meta must be one byte 0x80 | rate "
                                 f"with rate in 0..{self.rates - 1}, got "
                                 f"{meta.hex() or 'none'}")  # fmt: skip
        return meta[0] & ~FORMAT2

    def symbols(self, h: torch.Tensor, rate: int | None = None, ids=None,
                start: int = 0) -> torch.Tensor:  # fmt: skip
        """Integer symbols ``(B, T, latent)`` (int64, around the medians, clamped to the
        support) that ``compress`` codes at rate point ``rate``."""
        self.check_features(h, ids, start)
        r = self._rate(rate)
        c = self._coding(r)
        b, n, _ = h.shape
        y = self._latent(h, self.side(ids, start, b, n), r)
        k = torch.round(y - self._medians(r)).long().cpu()
        return torch.maximum(torch.minimum(k, torch.from_numpy(c["hi"])), torch.from_numpy(c["lo"]))

    @torch.no_grad()
    def compress(self, h: torch.Tensor, rate: int | None = None, ids: torch.Tensor | None = None,
                 start: int = 0, seq: int = 0) -> list[Bitstream]:  # fmt: skip
        """One stream per sample (sample ``b`` numbered ``seq + b``), one packet each:
        ``varint(T) | range-coded symbols``."""
        r = self._rate(rate)
        k = self.symbols(h, r, ids, start).numpy()
        c = self._coding(r)
        b, n, m = k.shape
        probs = np.tile(c["probs"], (n, 1))  # token-major: token 0's channels, token 1's, ...
        payloads = arith.encode_batch((k - c["lo"]).reshape(b, n * m), probs)
        head = self.header(r)
        count = _put_count(n)
        return [Bitstream(head, [count + p], seq=seq + i) for i, p in enumerate(payloads)]

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream], ids: torch.Tensor | None = None,
                   start: int = 0, n_tokens: int | None = None) -> torch.Tensor:  # fmt: skip
        """States ``(B, T, D)`` (float32, CPU) from ``B`` streams of ``T`` tokens each, at
        positions ``start..`` (and with the ``ids`` the sender had, ``condition=True``).

        A lost packet (``None``) is concealed: its tokens decode from the entropy models'
        medians (what the decoder makes of the side information alone); its token count
        comes from ``ids`` or ``n_tokens`` (BitstreamError when neither says it)."""
        self._check_start(start, 1)
        self.check_streams(streams, 1)
        rates = [self.rate_of(s) for s in streams]
        limit = self.context - start
        counts, codes = [], []
        for s in streams:
            data = s.packets[0]
            if data is None:
                counts.append(None)
                codes.append(None)
                continue
            n, used = _get_count(bytes(data), limit)
            counts.append(n)
            codes.append(bytes(data[used:]))
        known = {n for n in counts if n is not None}
        if ids is not None and isinstance(ids, torch.Tensor) and ids.ndim == 2:
            known.add(int(ids.shape[1]))
        if n_tokens is not None:
            if not isinstance(n_tokens, int) or n_tokens < 1:
                raise ConfigError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
            known.add(n_tokens)
        if len(known) > 1:
            raise BitstreamError(f"lm-hidden codec: the streams (and ids / n_tokens) disagree "
                                 f"on the token count: {sorted(known)}")  # fmt: skip
        if not known:
            raise BitstreamError("lm-hidden codec: every packet is lost and neither ids nor "
                                 "n_tokens says how many tokens to conceal")  # fmt: skip
        n = known.pop()
        b = len(streams)
        self._check_start(start, n)
        self._check_ids(ids, b, n)
        dev = self._device()
        y_hat = torch.zeros(b, n, self.latent, device=dev)
        out = torch.zeros(b, n, self.dim, device=dev)
        e = self.side(ids, start, b, n)
        for r in sorted(set(rates)):
            at = [i for i, q in enumerate(rates) if q == r]
            c = self._coding(r)
            have = [i for i in at if codes[i] is not None]
            med = self._medians(r)
            y_hat[at] = med.to(dev)
            if have:
                probs = np.tile(c["probs"], (n, 1))
                idx = arith.decode_batch([codes[i] for i in have], probs,
                                         arith.range_max_bytes(n * self.latent))  # fmt: skip
                idx = idx.reshape(len(have), n, self.latent)
                if bool((idx > c["last"]).any()):
                    raise BitstreamError("lm-hidden codec: a payload decodes to the escape "
                                         "symbol, which no encoder sends")  # fmt: skip
                k = torch.from_numpy(idx + c["lo"]).float().to(dev)
                y_hat[have] = k + med
            out[at] = self._synth(y_hat[at], e[at], r)
        out = out.float().cpu()
        bad = ~torch.isfinite(out)
        if bool(bad.any()):  # a receiver never hands non-finite states to the tail
            out = torch.where(bad, e.detach().float().cpu(), out)
        return out


# --- saving and loading ------------------------------------------------------------------------
def save_hidden_codec(codec: HiddenStateCodec, path: str | os.PathLike,
                      extra: dict | None = None) -> Path:  # fmt: skip
    """Write ``codec`` (its tables frozen by ``update()`` first) as float32 safetensors and
    JSON (:func:`flowcodec.codecs.zoo.save_codec`); returns the weights' path."""
    from flowcodec.codecs.zoo import save_codec

    if not isinstance(codec, HiddenStateCodec):
        raise ConfigError(f"expected a HiddenStateCodec, got {type(codec).__name__}")
    codec.update()
    return save_codec(codec, path, codec.kwargs(), extra, half=False)


def load_hidden_codec(path: str | os.PathLike) -> HiddenStateCodec:
    """Load a codec written by :func:`save_hidden_codec` (SHA-256 and shapes checked before
    anything is built; eval mode). CheckpointError if it is anything else."""
    from flowcodec.codecs.zoo import load_codec
    from flowcodec.family.checkpoint import read_config

    cfg = read_config(path)
    name = cfg.get("config", {}).get("name") if isinstance(cfg.get("config"), dict) else None
    if cfg.get("kind") != "codec" or name != "lm-hidden":
        raise CheckpointError(f"{path} holds a {cfg.get('kind')!r} {name!r}, not an "
                              "lm-hidden codec")  # fmt: skip
    codec = load_codec(path)
    if not isinstance(codec, HiddenStateCodec):
        raise CheckpointError(f"{path} does not hold a HiddenStateCodec")
    return codec


# --- training ----------------------------------------------------------------------------------
@dataclass
class HiddenCodecTrainConfig:
    """Settings of :func:`train_hidden_codec` (plain values, saved with the checkpoint).

    ``lams``: the rate weight of each rate point, in nats (of the distillation loss per
    token) per bit per token, rate point 0 (the lowest rate) first; their count is the
    codec's ``rates``. Each step draws ``batch_size`` windows of ``context`` tokens (the
    family's by default) and gives an equal share of them to every rate point (so
    ``batch_size`` is rounded up to a multiple of the rate points). The rate term is off for
    the first ``rate_warmup`` share of the run and ramps in over the next one. ``seconds``
    is a wall-clock budget: the learning rate's cosine follows whichever of steps and
    seconds runs out first (as in :func:`flowcodec.lm.train.lr_at`); the entropy models'
    densities and the rate points' gains learn at ``fast_lr`` times that rate."""

    lams: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003)
    latent: int = 32
    hidden: int = 256
    condition: bool = True
    steps: int = 2000
    batch_size: int = 16
    context: int | None = None
    lr: float = 2e-3
    min_lr: float = 1e-4
    fast_lr: float = 5.0
    warmup: int = 50
    rate_warmup: float = 0.1
    kd: float = 1.0
    ce: float = 0.0
    mse: float = 0.1
    temperature: float = 1.0
    grad_clip: float = 1.0
    seconds: float | None = None
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 16
    checkpoint_every: int = 100
    device: str = "cpu"
    progress: bool = True

    @property
    def rates(self) -> int:
        return len(self.lams)

    def validate(self, family_context: int) -> None:
        """ConfigError naming every bad field."""
        bad = []
        if not self.lams or any(not isinstance(v, int | float) or not math.isfinite(v) or v < 0
                                for v in self.lams):  # fmt: skip
            bad.append(f"lams={self.lams!r} (numbers >= 0, one per rate point)")
        elif len(self.lams) > 127:
            bad.append(f"lams: {len(self.lams)} rate points, at most 127")
        for name in ("latent", "hidden", "steps", "batch_size", "eval_every", "eval_windows",
                     "checkpoint_every"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad.append(f"{name}={v!r} (an int >= 1)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            bad.append(f"warmup={self.warmup!r} (an int >= 0)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            bad.append(f"lr={self.lr!r}, min_lr={self.min_lr!r} (0 <= min_lr <= lr, lr > 0)")
        if not 0 <= self.rate_warmup < 0.5:
            bad.append(f"rate_warmup={self.rate_warmup!r} (in [0, 0.5))")
        for name in ("kd", "ce", "mse", "grad_clip", "fast_lr"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v >= 0:
                bad.append(f"{name}={v!r} (>= 0)")
        if self.kd == 0 and self.ce == 0:
            bad.append("kd and ce are both 0 (nothing ties the codec to the task)")
        if not self.temperature > 0:
            bad.append(f"temperature={self.temperature!r} (> 0)")
        if self.context is not None and (not isinstance(self.context, int)
                                         or not 1 <= self.context <= family_context):
            bad.append(f"context={self.context!r} (1..{family_context}, the family's)")
        if self.seconds is not None and not self.seconds > 0:
            bad.append(f"seconds={self.seconds!r} (> 0 or None)")
        if bad:
            raise ConfigError("bad HiddenCodecTrainConfig: " + "; ".join(bad))


@dataclass
class HiddenCodecTrainResult:
    """Steps run, seconds (resumed runs count their earlier time) and the history of
    periodic checks ``[{"step", "seconds", "loss", "kd", "bits_per_token", "eval"}]``."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


class _StateOf:
    """What :mod:`flowcodec.lm.train`'s training-state helpers need of a model, for a codec
    (its state dict and its config as a plain dict)."""

    def __init__(self, codec: HiddenStateCodec) -> None:
        self.codec = codec
        self.config = codec.config()

    def state_dict(self):
        return self.codec.state_dict()

    def load_state_dict(self, state):
        return self.codec.load_state_dict(state)


def _lr(step: int, cfg: HiddenCodecTrainConfig, elapsed: float) -> tuple[float, float]:
    """(learning rate, share of the run done) at ``step`` after ``elapsed`` seconds."""
    t = step / cfg.steps
    if cfg.seconds:
        t = max(t, elapsed / cfg.seconds)
    t = min(1.0, t)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup, t
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)), t


def _windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return ids[starts.unsqueeze(1) + torch.arange(context + 1)]


@torch.no_grad()
def _probe(codec, head, tail, val_ids, context: int, windows: int, dev) -> list[dict]:
    """Eval-mode forward on ``windows`` validation windows: the member's loss through the
    codec at each rate point and the *estimated* bits per token (real bytes come from
    :func:`evaluate_hidden_codec`)."""
    from flowcodec.lm.data import eval_windows

    was = codec.training
    codec.eval()
    w = _windows(val_ids, eval_windows(val_ids, context, windows), context).to(dev)
    x, y = w[:, :-1], w[:, 1:]
    h = head(x)
    base = F.cross_entropy(tail(h).flatten(0, 1), y.flatten()).item()
    out = []
    for r in range(codec.rates):
        o = codec(h, rate=r, ids=x)
        loss = F.cross_entropy(tail(o.features).flatten(0, 1), y.flatten()).item()
        out.append({"rate": r, "loss": round(loss, 4), "increase": round(loss - base, 4),
                    "est_bits_per_token": round(float(o.bits.sum()) / x.numel(), 2)})
    codec.train(was)
    return out


def train_hidden_codec(family, point: int, member: int | None = None,
                       train_ids: torch.Tensor | None = None, val_ids: torch.Tensor | None = None,
                       cfg: HiddenCodecTrainConfig | None = None,
                       codec: HiddenStateCodec | None = None,
                       checkpoint: str | os.PathLike | None = None,
                       resume: bool = False) -> tuple[HiddenStateCodec, HiddenCodecTrainResult]:
    """Train a hidden-state codec for split ``point`` of ``family``, for member ``member``'s
    tail (default the largest). Returns the codec (eval mode, tables frozen) and the result.

    Teacher forcing on random windows of ``train_ids``: the frozen head gives the states
    ``h`` and the member's tail on them the teacher's logits; the loss per rate point is

        kd * T^2 KL(teacher || tail(codec(h))) + ce * CE(tail(codec(h)), next)
            + mse * ||codec(h) - h||^2 / Var(h) + ramp * lams[r] * bits per token

    plus the entropy models' quantile loss. The family is frozen and left as it was (modes
    and ``requires_grad`` restored). ``codec``: continue training this one (default: a new
    codec from ``cfg`` started from the family's embeddings). ``checkpoint``: a path stem
    where the training state (``-state.safetensors`` / ``-state.json``, with SHA-256) is
    written every ``cfg.checkpoint_every`` steps; ``resume=True`` continues from it."""
    from flowcodec.family.lm import LanguageFamily
    from flowcodec.lm.data import sample_windows
    from flowcodec.lm.train import _load_state, _save_state, _state_paths
    from flowcodec.progress import tqdm
    from flowcodec.training import Frozen, kd_loss

    if not isinstance(family, LanguageFamily):
        raise ConfigError(f"train_hidden_codec needs a LanguageFamily, got {type(family).__name__}")
    member = family.num_members if member is None else member
    family._check_point(member, point)
    if point < 1 or point >= member:
        raise ConfigError(f"split point must be in 1..{member - 1} for member {member} (the "
                          f"codec replaces stages 1..point), got {point}")  # fmt: skip
    cfg = cfg or HiddenCodecTrainConfig()
    cfg.validate(family.context)
    if train_ids is None:
        raise ConfigError("train_hidden_codec needs train_ids (the training text as ids)")
    if resume and checkpoint is None:
        raise ConfigError("resume=True needs a checkpoint path")
    context = cfg.context or family.context
    dev = torch.device(cfg.device)
    if codec is None:
        codec = HiddenStateCodec(family.feature_shape(point), point=point, latent=cfg.latent,
                                 hidden=cfg.hidden, rates=cfg.rates, vocab=family.vocab,
                                 condition=cfg.condition).init_from(family)  # fmt: skip
    if not isinstance(codec, HiddenStateCodec) or codec.rates != cfg.rates:
        raise ConfigError(f"codec must be a HiddenStateCodec with {cfg.rates} rate points "
                          f"(one per lam)")  # fmt: skip
    if tuple(codec.feature_shape) != (family.context, family.dim) or codec.point != point:
        raise ConfigError(f"codec for {codec.feature_shape} at point {codec.point} does not "
                          f"fit this family's point {point} ({family.context}, {family.dim})")
    rates = cfg.rates
    per = -(-cfg.batch_size // rates)  # windows per rate point
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    frozen = Frozen(family)
    fam_device = next(family.parameters()).device
    try:
        family.to(dev)
        codec.to(dev).train()
        head, tail = family.split(member, point)
        head.eval()
        tail.eval()
        # the entropy models' densities and the gains learn faster than the transforms (a
        # short run must move the rate from the models' wide start to where lams put it)
        aux = [p for n, p in codec.named_parameters() if n.endswith("quantiles")]
        fast = [p for n, p in codec.named_parameters() if not n.endswith("quantiles")
                and (n.startswith("entropy_bottlenecks.") or n in ("gain", "inv_gain"))]
        seen = {id(p) for p in aux + fast}
        main = [p for p in codec.parameters() if id(p) not in seen]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": fast, "lr": cfg.fast_lr * cfg.lr},
                                {"params": aux, "lr": 1e-2}])  # fmt: skip
        step, spent, history = 0, 0.0, []
        saved = _StateOf(codec)
        if resume and _state_paths(checkpoint)[1].is_file():
            step, spent, history = _load_state(checkpoint, saved, opt, gen)
        # the states' spread, for the mse term (one fixed batch of the training text)
        probe_gen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            x0, _ = sample_windows(train_ids, 8, context, probe_gen)
            h0 = head(x0.to(dev))
            var = float(h0.var(dim=(0, 1)).mean().clamp_min(1e-8))
        t0 = time.perf_counter() - spent
        bar = tqdm(total=cfg.steps, initial=step, desc="train lm-hidden codec",
                   disable=not cfg.progress)  # fmt: skip
        recent: dict[str, list[float]] = {}
        while step < cfg.steps:
            elapsed = time.perf_counter() - t0
            if cfg.seconds is not None and elapsed >= cfg.seconds:
                break
            lr, done = _lr(step, cfg, elapsed)
            opt.param_groups[0]["lr"] = lr
            opt.param_groups[1]["lr"] = cfg.fast_lr * lr
            ramp = min(1.0, max(0.0, (done - cfg.rate_warmup) / max(cfg.rate_warmup, 1e-9)))
            x, y = sample_windows(train_ids, per * rates, context, gen)
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                h = head(x)
                teacher = tail(h) if cfg.kd else None
            feats, bits = [], []
            for r in range(rates):
                sl = slice(r * per, (r + 1) * per)
                o = codec(h[sl], rate=r, ids=x[sl])
                feats.append(o.features)
                bits.append(o.bits / context)  # bits per token, per window
            h_hat = torch.cat(feats)
            logits = tail(h_hat)
            loss = h_hat.new_zeros(())
            parts = {"kd": 0.0, "ce": 0.0, "mse": 0.0}
            for r in range(rates):
                sl = slice(r * per, (r + 1) * per)
                lg = logits[sl].flatten(0, 1)
                term = cfg.lams[r] * ramp * bits[r].mean()
                if cfg.kd:
                    kd = kd_loss(lg, teacher[sl].flatten(0, 1), cfg.temperature)
                    term = term + cfg.kd * kd
                    parts["kd"] += kd.item() / rates
                if cfg.ce:
                    ce = F.cross_entropy(lg, y[sl].flatten())
                    term = term + cfg.ce * ce
                    parts["ce"] += ce.item() / rates
                if cfg.mse:
                    mse = F.mse_loss(h_hat[sl], h[sl]) / var
                    term = term + cfg.mse * mse
                    parts["mse"] += mse.item() / rates
                loss = loss + term / rates
                recent.setdefault(f"bits_r{r}", []).append(bits[r].mean().item())
            opt.zero_grad(set_to_none=True)
            (loss + codec.aux_loss()).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(main + fast, cfg.grad_clip)
            opt.step()
            step += 1
            recent.setdefault("loss", []).append(loss.item())
            for k, v in parts.items():
                recent.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(recent['loss'][-20:]):.3f}",
                            kd=f"{np.mean(recent['kd'][-20:]):.3f}",
                            bits="/".join(f"{np.mean(recent[f'bits_r{r}'][-20:]):.0f}"
                                          for r in range(rates)))  # fmt: skip
            last = step == cfg.steps or (cfg.seconds is not None
                                         and time.perf_counter() - t0 >= cfg.seconds)
            if step % cfg.eval_every == 0 or last:
                rec = {"step": step, "seconds": round(time.perf_counter() - t0, 1)}
                for k, v in recent.items():
                    rec[k] = round(float(np.mean(v)), 4)
                recent = {}
                if val_ids is not None:
                    rec["eval"] = _probe(codec, head, tail, val_ids, context,
                                         cfg.eval_windows, dev)  # fmt: skip
                    bar.write("step {}: {}".format(step, "  ".join(
                        f"r{e['rate']}: +{e['increase']:.3f} nats @ {e['est_bits_per_token']:.1f} "
                        "b/tok" for e in rec["eval"])))  # fmt: skip
                history.append(rec)
            if checkpoint is not None and (step % cfg.checkpoint_every == 0 or last):
                _save_state(checkpoint, saved, opt, gen, step, time.perf_counter() - t0,
                            history, cfg)  # fmt: skip
        bar.close()
        seconds = time.perf_counter() - t0
        if checkpoint is not None:
            _save_state(checkpoint, saved, opt, gen, step, seconds, history, cfg)
    finally:
        family.to(fam_device)
        frozen.restore()
    codec.eval()
    codec.update(force=True)
    return codec, HiddenCodecTrainResult(step, seconds, history)


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_hidden_codec(family, codec: HiddenStateCodec, val_ids: torch.Tensor,
                          member: int | None = None, max_windows: int | None = None,
                          batch_size: int = 16, progress: bool = False,
                          flops: bool = True) -> dict:  # fmt: skip
    """The rate-loss curve of ``codec`` on ``val_ids``, teacher-forced, with real bytes.

    The text is cut into consecutive windows of the family's context (each starting without
    history, as :func:`flowcodec.lm.train.evaluate_lm` does; ``max_windows`` takes that many,
    evenly spaced). For each window the device's states at the codec's split point are
    compressed at each rate point (ids and positions as side information), decompressed,
    and run through the member's tail. Returns ``{"rows": [...], ...}`` with, per rate
    point: ``bits_per_token`` (``8 * len(to_bytes())`` per window over its tokens: header
    and framing included), ``session_bits_per_token`` (``to_compact()``: the header sent
    once per session), ``payload_bits_per_token``, ``est_bits_per_token`` (the entropy
    model's estimate), ``loss`` and ``loss_increase`` (nats per character against the
    member without the codec), ``top1_agreement`` (share of positions whose argmax equals
    the member's own); the device's own answer at equal device cost (``device_exit``: the
    loss and agreement of exit ``point``, the floor a codec must beat); the text baseline,
    the member's loss, and FLOPs per token (the
    shared blocks the edge skips, the codec's encoder and decoder; ``flops=False`` leaves
    them out, which spares the FLOP counter's import)."""
    from flowcodec.lm.data import eval_windows
    from flowcodec.progress import tqdm

    member = family.num_members if member is None else member
    point = codec.point
    family._check_point(member, point)
    if tuple(codec.feature_shape) != (family.context, family.dim):
        raise ConfigError(f"codec for {codec.feature_shape} does not fit this family "
                          f"({family.context}, {family.dim})")  # fmt: skip
    if codec.condition and codec.vocab != family.vocab:
        raise ConfigError(f"codec for vocab {codec.vocab}, family vocab {family.vocab}")
    context = family.context
    starts = eval_windows(val_ids, context, max_windows, " to evaluate a codec")
    fam_modes = [(m, m.training) for m in family.modules()]
    codec_was = codec.training
    family.eval()
    codec.eval()
    dev = next(family.parameters()).device
    head, tail = family.split(member, point)
    r_n = codec.rates
    sums = {k: torch.zeros(r_n, dtype=torch.float64)
            for k in ("full", "compact", "payload", "est", "nll", "agree")}  # fmt: skip
    base_nll, exit_nll, exit_agree, tokens = 0.0, 0.0, 0.0, 0
    t_code = 0.0
    try:
        bar = tqdm(total=len(starts), desc="eval lm-hidden codec", disable=not progress)
        for i in range(0, len(starts), batch_size):
            w = _windows(val_ids, starts[i : i + batch_size], context).to(dev)
            x, y = w[:, :-1], w[:, 1:]
            h = head(x)
            base = tail(h)
            base_nll += float(F.cross_entropy(base.flatten(0, 1).float(), y.flatten(),
                                              reduction="sum"))  # fmt: skip
            top = base.argmax(-1)
            own = family.exits[point - 1](h)  # the device's own answer at the split point
            exit_nll += float(F.cross_entropy(own.flatten(0, 1).float(), y.flatten(),
                                              reduction="sum"))  # fmt: skip
            exit_agree += float((own.argmax(-1) == top).sum())
            tokens += y.numel()
            for r in range(r_n):
                t = time.perf_counter()
                streams = codec.compress(h, rate=r, ids=x)
                h_hat = codec.decompress(streams, ids=x).to(dev)
                t_code += time.perf_counter() - t
                sums["full"][r] += sum(len(s.to_bytes()) for s in streams)
                sums["compact"][r] += sum(len(s.to_compact()) for s in streams)
                sums["payload"][r] += sum(len(s.packets[0]) for s in streams)
                sums["est"][r] += float(codec(h, rate=r, ids=x).bits.sum())
                lg = tail(h_hat)
                sums["nll"][r] += float(F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(),
                                                        reduction="sum"))  # fmt: skip
                sums["agree"][r] += float((lg.argmax(-1) == top).sum())
            bar.update(len(w))
        bar.close()
    finally:
        for m, t in fam_modes:
            m.training = t
        codec.train(codec_was)
    loss0 = base_nll / tokens
    rows = []
    for r in range(r_n):
        loss = float(sums["nll"][r]) / tokens
        rows.append({"rate": r,
                     "bits_per_token": 8 * float(sums["full"][r]) / tokens,
                     "session_bits_per_token": 8 * float(sums["compact"][r]) / tokens,
                     "payload_bits_per_token": 8 * float(sums["payload"][r]) / tokens,
                     "est_bits_per_token": float(sums["est"][r]) / tokens,
                     "loss": loss, "loss_increase": loss - loss0,
                     "top1_agreement": float(sums["agree"][r]) / tokens})  # fmt: skip
    text = val_ids.numpy().astype(np.uint8).tobytes() if family.vocab <= 256 else None
    fl = codec.flops_per_token()
    counted = None
    if flops:
        counted = {"shared_blocks_skipped_by_edge": family.head_flops(point),
                   "member": family.info()[member - 1].flops,
                   "codec_encoder_device": fl["encoder"], "codec_decoder_edge": fl["decoder"]}
    return {"member": member, "point": point, "condition": codec.condition,
            "windows": len(starts), "tokens": tokens, "context": context,
            "loss_without_codec": loss0, "rows": rows,
            "device_exit": {"member": point, "loss": exit_nll / tokens,
                            "top1_agreement": exit_agree / tokens},
            "text_bits_per_char": TEXT_BITS_PER_CHAR,
            "text_zlib_bits_per_char": (8 * len(zlib.compress(text, 9)) / len(text)
                                        if text is not None else None),
            "flops_per_token": counted,
            "coding_seconds": round(t_code, 2)}  # fmt: skip


def write_curve(result: dict, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write an :func:`evaluate_hidden_codec` result as ``stem.json`` and ``stem.csv`` (one
    row per rate point, then the text baseline and the device's own exit); returns both
    paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jp, cp = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.csv"
    jp.write_text(json.dumps(result, indent=1))
    keys = ["rate", "bits_per_token", "session_bits_per_token", "payload_bits_per_token",
            "est_bits_per_token", "loss", "loss_increase", "top1_agreement"]
    with cp.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["scheme", *keys])
        for row in result["rows"]:
            wr.writerow(["codec", *(round(row[k], 5) if isinstance(row[k], float) else row[k]
                                    for k in keys)])  # fmt: skip
        wr.writerow(["text", "", result["text_bits_per_char"], "", "", "",
                     round(result["loss_without_codec"], 5), 0.0, 1.0])  # fmt: skip
        ex = result.get("device_exit")
        if ex:  # the device's own exit: no bits, the floor a codec must beat
            wr.writerow(["device-exit", "", 0, 0, 0, 0, round(ex["loss"], 5),
                         round(ex["loss"] - result["loss_without_codec"], 5),
                         round(ex["top1_agreement"], 5)])  # fmt: skip
    return jp, cp


# --- commands ----------------------------------------------------------------------------------
def _load_family(weights: str | None):
    from flowcodec.lm.cli import _weights
    from flowcodec.lm.train import load_lm

    return load_lm(_weights(weights)).float().eval()


def cmd_train(args) -> int:
    from flowcodec.lm.data import CharVocab, load_shakespeare

    fam = _load_family(args.weights)
    train, val, _ = load_shakespeare(args.data, CharVocab(fam.chars))
    cfg = HiddenCodecTrainConfig(lams=tuple(args.lams), latent=args.latent, hidden=args.hidden,
                                 condition=not args.no_condition, steps=args.steps,
                                 batch_size=args.batch, lr=args.lr, seconds=args.seconds,
                                 seed=args.seed, kd=args.kd, ce=args.ce, mse=args.mse,
                                 eval_every=args.eval_every, progress=not args.quiet)  # fmt: skip
    codec, res = train_hidden_codec(fam, args.point, args.member, train, val, cfg,
                                    checkpoint=f"{args.out}-run", resume=args.resume)  # fmt: skip
    from flowcodec.lm.cli import _weights

    src = Path(_weights(args.weights))
    sha = json.loads(src.with_suffix(".json").read_text()).get("sha256") \
        if src.with_suffix(".json").is_file() else None  # fmt: skip
    extra = {"family": str(src), "family_sha256": sha, "point": args.point,
             "member": args.member or fam.num_members, "train": asdict(cfg),
             "train_steps": res.steps, "train_seconds": round(res.seconds, 1),
             "history": res.history}  # fmt: skip
    path = save_hidden_codec(codec, args.out, extra)
    print(f"{res.steps} steps in {res.seconds:.0f} s; saved {path}")
    if res.history and "eval" in res.history[-1]:
        for e in res.history[-1]["eval"]:
            print(f"rate {e['rate']}: {e['est_bits_per_token']:.1f} bits/token (estimate), "
                  f"loss {e['loss']:.4f} (+{e['increase']:.4f}) on {cfg.eval_windows} windows")
    return 0


def cmd_eval(args) -> int:
    from flowcodec.lm.data import CharVocab, load_shakespeare

    fam = _load_family(args.weights)
    codec = load_hidden_codec(args.codec)
    _, val, _ = load_shakespeare(args.data, CharVocab(fam.chars))
    res = evaluate_hidden_codec(fam, codec, val, member=args.member, max_windows=args.windows,
                                progress=not args.quiet)  # fmt: skip
    res["codec"] = str(args.codec)
    jp, cp = write_curve(res, args.out or f"{args.codec}-curve")
    print(f"member {res['member']} at split point {res['point']}, {res['windows']} windows "
          f"({res['tokens']} tokens); loss without the codec {res['loss_without_codec']:.4f}")
    print("rate  bits/token  session  payload  estimate  loss     increase  top-1 agree")
    for r in res["rows"]:
        print(f"{r['rate']:>4}  {r['bits_per_token']:>10.2f}  {r['session_bits_per_token']:>7.2f}"
              f"  {r['payload_bits_per_token']:>7.2f}  {r['est_bits_per_token']:>8.2f}  "
              f"{r['loss']:.4f}  {r['loss_increase']:>+8.4f}  {r['top1_agreement']:>11.4f}")
    ex = res["device_exit"]
    print(f"the device's own exit {ex['member']}: loss {ex['loss']:.4f} "
          f"(+{ex['loss'] - res['loss_without_codec']:.4f}), top-1 agree "
          f"{ex['top1_agreement']:.4f}")
    print(f"text: {res['text_bits_per_char']:.0f} bits/char (zlib -9 over the whole validation "
          f"text: {res['text_zlib_bits_per_char']:.2f})")
    fl = res["flops_per_token"]
    print(f"FLOPs/token: the edge skips {fl['shared_blocks_skipped_by_edge']:,} (shared blocks), "
          f"adds {fl['codec_decoder_edge']:,} (decoder); the device adds "
          f"{fl['codec_encoder_device']:,} (encoder)")
    print(f"wrote {jp} and {cp}")
    return 0


def add_codec_commands(sub) -> argparse.ArgumentParser:
    """Add ``codec train`` and ``codec eval`` to an argparse subparsers object (the
    ``flowcodec lm`` parser's); returns the ``codec`` parser."""
    c = sub.add_parser("codec", help="the hidden-state codec: train, eval", allow_abbrev=False)
    cs = c.add_subparsers(dest="codec_cmd", required=True)
    t = cs.add_parser("train", help="train a hidden-state codec and save it",
                      allow_abbrev=False)  # fmt: skip
    t.add_argument("--weights", default=None,
                   help="a family saved by `flowcodec lm train` (default: the shipped one)")
    t.add_argument("--point", type=int, default=1, help="split point (1..member - 1)")
    t.add_argument("--member", type=int, default=None, help="the edge's member (default largest)")
    t.add_argument("--out", required=True, help="codec path stem (writes .safetensors, .json)")
    t.add_argument("--data", default=None, help="tinyshakespeare.txt or its folder")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seconds", type=float, default=None, help="wall-clock budget")
    t.add_argument("--batch", type=int, default=16, help="windows per step (all rate points)")
    t.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.003, 0.001, 0.0003],
                   help="rate weight per rate point (nats per bit per token), lowest rate first")
    t.add_argument("--latent", type=int, default=32)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--no-condition", action="store_true",
                   help="do not use the token ids as side information")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--kd", type=float, default=1.0)
    t.add_argument("--ce", type=float, default=0.0)
    t.add_argument("--mse", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT-run-state.*")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
    e = cs.add_parser("eval", help="the rate-loss curve of a codec (JSON + CSV)",
                      allow_abbrev=False)  # fmt: skip
    e.add_argument("--weights", default=None,
                   help="a family saved by `flowcodec lm train` (default: the shipped one)")
    e.add_argument("--codec", required=True, help="codec path stem (from `codec train`)")
    e.add_argument("--member", type=int, default=None)
    e.add_argument("--data", default=None)
    e.add_argument("--windows", type=int, default=None,
                   help="evenly spaced validation windows (default: the whole text)")
    e.add_argument("--out", default=None, help="curve path stem (default CODEC-curve)")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowcodec.lm.codec", allow_abbrev=False,
                                description="the hidden-state codec of the language family")
    add_codec_commands(p.add_subparsers(dest="cmd", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv if argv[:1] == ["codec"] else ["codec", *argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
