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

:func:`~flowcodec.lm.codec_train.train_hidden_codec` trains a codec against the frozen
family (distillation of the larger member on the decoded states + ``lambda * bits``);
:func:`~flowcodec.lm.codec_train.evaluate_hidden_codec` measures the curve (bits per token
from real bytes against the member's loss); ``python -m flowcodec.lm.codec train|eval``
(also ``flowcodec lm codec ...``, :mod:`flowcodec.lm.codec_cli`) run them.

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

if __name__ == "__main__":  # `python -m flowcodec.lm.codec ...`: run the commands' module,
    # which imports this one under its own name (defining the codec here, as __main__, too
    # would register it twice)
    import runpy

    runpy.run_module("flowcodec.lm.codec_cli", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowcodec._moved import moved
from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec, varint
from flowcodec.codecs import arith
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec
from flowcodec.codecs.entropy import entropy_bottleneck
from flowcodec.codecs.rate_point import RateLadder
from flowcodec.errors import CheckpointError, ConfigError

__all__ = ["HiddenStateCodec", "save_hidden_codec", "load_hidden_codec", "FORMAT2",
           "TEXT_BITS_PER_CHAR"]

# training and evaluation live in flowcodec.lm.codec_train, the commands in
# flowcodec.lm.codec_cli; the old names warn for a release
__getattr__ = moved(__name__, {
    **dict.fromkeys(["HiddenCodecTrainConfig", "HiddenCodecTrainResult", "train_hidden_codec",
                     "evaluate_hidden_codec", "write_curve"], "flowcodec.lm.codec_train"),
    **dict.fromkeys(["add_codec_commands", "main"], "flowcodec.lm.codec_cli"),
})

#: Bit 7 of the header's meta byte: the payload is range-coded (format 2, the only one).
FORMAT2 = 0x80

#: Sending the text itself: one byte per character.
TEXT_BITS_PER_CHAR = 8.0

#: Latents are clamped to this magnitude before rounding (a diverged model or a hostile
#: input cannot ask for a symbol far outside the tables: it is clamped to their support).
_CLAMP = 1e4


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
class HiddenStateCodec(RateLadder, FeatureCodec):
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

    RATE_NAME = "lm-hidden codec"

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
        count = varint(n)
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

