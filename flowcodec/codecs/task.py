"""Low-rate task codecs: a split point's features as a few dozen entropy-coded numbers.

A 10-class task needs a few bits per image, not the thousands a feature map holds. The
:class:`TaskCodec` (registry name ``"task"``) reduces the features ``(C, H, W)`` on the
device to a short latent *vector* and rebuilds, at the receiver, features of the original
shape for the larger member's tail:

- **encoder** (device): a small convolutional stem (conv-BN-ReLU blocks, optionally
  max-pooled, the same shape as the family's exit branches so it can start from one),
  global max pooling and a linear map to ``latent`` numbers;
- **variable rate in one model**: ``rates`` rate points, each a learned per-channel gain
  (applied before rounding; its learned inverse after) and its own factorized entropy
  model (a CompressAI-style ``EntropyBottleneck`` over the ``latent`` channels). The rate
  point is chosen at ``compress(h, rate=r)`` and written in the stream's header (one meta
  byte), so the receiver decodes any of them with the same checkpoint;
- **coding** (stream format 2, the default): the symbols are range-coded by a compiled
  coder (:mod:`flowcodec.codecs.arith`, ``constriction``) made byte-tight (at most one byte
  above the shortest code of its interval, no 4-byte flush), with integer tables only; the
  optional context model runs in integer fixed point (:class:`FixedContext`) for the whole
  batch, one channel at a time. Streams of format 1 (the exact pure-Python coder and the
  float64 context model, what the codec wrote before) still decode; the header's meta byte
  tells them apart (:meth:`TaskCodec.format_of`);
- **packets**: the latent channels are cut into ``packets`` groups, each coded alone; a
  lost group is replaced by the entropy model's medians (what training with
  ``drop_prob`` shows the decoder);
- **decoder** (receiver): two linear layers to a ``(C, H/2, W/2)`` map, nearest
  upsampling and two 3x3 convolutions (ReLU at the end when the features are
  non-negative).

Inputs ``h`` float ``(B, C, H, W)``; ``forward(h, rate=r)`` returns a :class:`CodecOutput`
(features ``(B, C, H, W)``, estimated bits ``(B,)``, likelihoods ``{"y": (B, latent, 1)}``);
``compress`` returns ``B`` streams; ``decompress`` returns float32 ``(B, C, H, W)``.

Example
-------
>>> import torch
>>> codec = TaskCodec((16, 8, 8), latent=6, stem=[(16, True)], hidden=32, rates=3).eval()
>>> out = codec(torch.rand(2, 16, 8, 8), rate=1)
>>> tuple(out.features.shape), tuple(out.bits.shape)
((2, 16, 8, 8), (2,))
>>> _ = codec.update(force=True)
>>> streams = codec.compress(torch.rand(2, 16, 8, 8), rate=2)
>>> codec.rate_of(streams[0]), tuple(codec.decompress(streams).shape)
(2, (2, 16, 8, 8))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowcodec._moved import moved
from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs import arith
from flowcodec.codecs.base import CodecOutput, FeatureCodec, channel_groups, register_codec
from flowcodec.codecs.context_model import (
    ChannelContext,
    FixedContext,
    discrete_gaussian_likelihood,
    grid_cdf,
    grid_probs,
    grid_row,
    snap_cell,
)
from flowcodec.codecs.entropy import entropy_bottleneck
from flowcodec.codecs.multiview import MultiView
from flowcodec.codecs.rate_point import RateLadder, RatePoint
from flowcodec.codecs.task_nets import GridDecoder, Lift, TaskDecoder, TaskEncoder, stem_entry
from flowcodec.errors import ConfigError

__all__ = ["TaskCodec", "TaskEncoder", "TaskDecoder", "Lift", "ChannelContext",
           "discrete_gaussian_likelihood", "FixedContext", "grid_probs", "FORMAT2",
           "MultiView", "GridDecoder", "RatePoint"]

# VIEWS and view_features live in flowcodec.views; the old names warn for a release
__getattr__ = moved(__name__, dict.fromkeys(["VIEWS", "view_features"], "flowcodec.views"))

#: Bit 7 of a task stream's meta byte: its payloads are in format 2 (range coder, fixed-point
#: context model); without it, format 1 (exact arithmetic coder, float64 context model).
FORMAT2 = 0x80

#: Context codecs decode batches of up to this many samples one sample at a time
#: (:meth:`TaskCodec._decode_context_one`: fewer numpy calls per channel), larger ones for
#: the whole batch at once; the symbols are the same either way.
SMALL_BATCH = 6

#: Latents are clamped to this magnitude before coding, so that a diverged model or a
#: hostile input cannot ask the coder for a symbol far outside its tables.
_CLAMP = 1e4


@register_codec("task")
class TaskCodec(RateLadder, MultiView, FeatureCodec):
    """Low-rate task codec: a latent vector, ``rates`` rate points, exact arithmetic coding.

    Parameters
    ----------
    feature_shape : (C, H, W)
        Features at the split point; ``H`` and ``W`` even.
    latent : int
        Length of the latent vector (the most numbers a sample sends).
    stem : sequence of (channels, pool) or ("res", 0)
        The encoder's conv blocks; default one block of ``2 * C`` channels with pooling
        (the shape of the CIFAR-10 family's exit branch at split point 2). ``("res", 0)``
        is a residual block at the current width (two conv-BN-ReLU layers and a skip, as in
        the family's trunk), so that a stem can start as a copy of the trunk's next stage.
    hidden : int
        Width of the decoder's first linear layer.
    rates : int
        Number of rate points (gain vector + entropy model each); 0 is the lowest rate.
    packets : int
        Groups of latent channels coded as independent packets.
    nonneg : bool
        End the decoder with a ReLU (features after ReLU / max-pool are non-negative).
    backend : {"auto", "compressai", "torch"}
        Entropy-model implementation (both give the same tables; see ``entropy``).
    via : (C', H', W') or None
        Decode to features of this shape (a later split point's, e.g. ``(128, 8, 8)``), then
        :class:`Lift` them to ``feature_shape``. With a stem that copies the trunk's stages
        in between, a codec at an early split point can start from a trained codec of a
        later one (``experiments/train_task_codecs.py --lift-from``).
    """

    RATE_NAME = "task codec"

    layouts = ("chw",)
    #: The stream format ``compress`` writes: 2 (the compiled range coder; the context model
    #: in fixed point, batched) or 1 (the exact pure-Python arithmetic coder; the context
    #: model in float64, per sample: streams written before format 2). ``decompress``
    #: reads both. Codecs with more than 128 rate points always write format 1.
    stream_format: int = 2

    def __init__(self, feature_shape: Sequence[int], latent: int = 32,
                 stem: Sequence[Sequence] | None = None, hidden: int = 512, rates: int = 5,
                 packets: int = 1, nonneg: bool = True, backend: str = "auto",
                 context: bool = False, context_hidden: int = 16,
                 grid: int = 1, views: int = 1,
                 via: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__(feature_shape)
        self.set_views(views)
        if len(self.feature_shape) != 3 or any(d < 2 for d in self.feature_shape[1:]):
            raise ConfigError(f"task codec: feature_shape must be (C, H, W) with H, W >= 2, "
                              f"got {self.feature_shape}")  # fmt: skip
        if not 1 <= int(latent) <= 4096 or not 1 <= int(hidden) <= 1 << 16:
            raise ConfigError(f"task codec: latent must be in 1..4096 and hidden in 1..65536, "
                              f"got {latent}, {hidden}")  # fmt: skip
        if not 1 <= int(rates) <= 255:
            raise ConfigError(f"task codec: rates must be in 1..255, got {rates}")
        c = self.feature_shape[0]
        try:
            stem = [(2 * c, True)] if stem is None else [stem_entry(e) for e in stem]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"task codec: stem must list (channels, pool) or ('res', 0) "
                              f"entries, got {stem}") from e  # fmt: skip
        if not stem or any(a != "res" and not 1 <= a <= 4096 for a, _ in stem):
            raise ConfigError(f"task codec: stem must list (channels in 1..4096, pool), got {stem}")
        if not 1 <= int(grid) <= 16:
            raise ConfigError(f"task codec: grid must be in 1..16, got {grid}")
        if via is not None:
            via = tuple(int(d) for d in via)
            if (len(via) != 3 or int(grid) != 1 or min(via) < 1 or via[1] % 2 or via[2] % 2
                    or self.feature_shape[1] % via[1] or self.feature_shape[2] % via[2]):
                raise ConfigError(f"task codec: via must be (C, H, W) with even H, W dividing "
                                  f"the feature map's sides, and grid 1; got via={via}, "
                                  f"grid={grid}, features {self.feature_shape}")  # fmt: skip
        self.via = via
        self.latent, self.hidden, self.rates = int(latent), int(hidden), int(rates)
        self.stem_spec, self.nonneg, self.backend = stem, bool(nonneg), backend
        self.grid = int(grid)
        self.positions = self.grid * self.grid
        self.n_sym = self.latent * self.positions  # symbols per sample, channel-major
        self.channel_groups = channel_groups(self.latent, packets)
        # packets: groups of latent channels, each with all its positions
        self.groups = [slice(g.start * self.positions, g.stop * self.positions)
                       for g in self.channel_groups]  # fmt: skip
        self.g_a = TaskEncoder(c, stem, self.latent, self.grid)
        shape, nonneg = self.feature_shape, self.nonneg
        if self.via is not None:  # rebuild a later split point's features, then lift them
            self.g_s = nn.Sequential(TaskDecoder(self.latent, self.hidden, self.via, nonneg),
                                     Lift(self.via, shape, nonneg))  # fmt: skip
        else:
            self.g_s = (TaskDecoder(self.latent, self.hidden, shape, nonneg) if self.grid == 1
                        else GridDecoder(self.latent, self.grid, shape, nonneg))  # fmt: skip
        # rate point r: y * exp(gain[r]) is rounded; the decoder sees y_hat * exp(inv_gain[r])
        span = torch.linspace(-math.log(4.0), 0.0, self.rates) if self.rates > 1 else torch.zeros(1)
        self.gain = nn.Parameter(span[:, None].repeat(1, self.latent))
        self.inv_gain = nn.Parameter(-span[:, None].repeat(1, self.latent))
        self.entropy_bottlenecks = nn.ModuleList(
            entropy_bottleneck(self.latent, backend) for _ in range(self.rates))
        self.context = bool(context)
        if self.context:
            if not 1 <= int(context_hidden) <= 256:
                raise ConfigError(f"task codec: context_hidden must be in 1..256, "
                                  f"got {context_hidden}")  # fmt: skip
            self.context_hidden = int(context_hidden)
            self.contexts = nn.ModuleList(ChannelContext(self.n_sym, self.groups,
                                                         self.context_hidden)
                                          for _ in range(self.rates))  # fmt: skip

    # --- configuration --------------------------------------------------------------------
    def config(self) -> dict:
        return {**super().config(), "latent": self.latent, "hidden": self.hidden,
                "stem": [list(s) for s in self.stem_spec], "rates": self.rates,
                "packets": len(self.groups), "nonneg": self.nonneg, "grid": self.grid,
                **({"context": self.context_hidden} if self.context else {}),
                **({"views": self.views} if self.views > 1 else {}),
                **({"via": list(self.via)} if self.via is not None else {})}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return self.g_a

    def _merge_views(self, f: torch.Tensor) -> torch.Tensor:
        """Decoded features ``(B*V, C, H, W)`` -> their mean over views ``(B, C, H, W)``."""
        return f if self.views == 1 else f.reshape(-1, self.views, *f.shape[1:]).mean(1)

    def _synthesize(self, y_hat: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Dequantised latents ``(B*V, n_sym)`` -> features ``(B, C, H, W)``: the decoder,
        the mean over views (with ``via``: of the later point's features, before the lift).
        ``fast`` (eval mode: ``decompress`` and ``forward``): the same networks through
        :func:`~flowcodec.codecs.task_nets.run_fast` (channels-last memory, upsampling
        fused into the next convolution: equal up to float rounding)."""
        def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m.fast(x) if fast and hasattr(m, "fast") else m(x)

        if self.via is None:
            f = self._merge_views(run(self.g_s, y_hat))
        else:
            f = run(self.g_s[1], self._merge_views(run(self.g_s[0], y_hat)))
        return f.contiguous() if fast else f

    def at_rate(self, rate: int) -> RatePoint:
        """A view of this codec fixed to rate point ``rate`` (see :class:`RatePoint`)."""
        return RatePoint(self, rate)

    def rate_of(self, stream: Bitstream) -> int:
        """The rate point a stream was coded at (from its header); BitstreamError if bad."""
        return self.format_of(stream)[0]

    def format_of(self, stream: Bitstream) -> tuple[int, int]:
        """``(rate point, stream format)`` from a stream's meta byte: ``r`` is format 1
        (exact arithmetic coder), ``0x80 | r`` format 2 (range coder, fixed-point
        context model). BitstreamError for anything else."""
        meta = stream.header.meta
        if len(meta) == 1:
            b = meta[0]
            if b < self.rates:
                return b, 1
            if b & FORMAT2 and (b & ~FORMAT2) < self.rates <= 128:
                return b & ~FORMAT2, 2
        raise BitstreamError(f"task codec: header meta must be one byte naming a rate point in "
                             f"0..{self.rates - 1} (bit 7 set: format 2), got "
                             f"{meta.hex() or 'none'}")  # fmt: skip

    def _per_symbol(self, v: torch.Tensor) -> torch.Tensor:
        """A per-channel vector ``(latent,)`` spread over the positions ``(n_sym,)``."""
        return v if self.positions == 1 else v.repeat_interleave(self.positions)

    def _medians(self, r: int) -> torch.Tensor:
        return self._per_symbol(self.entropy_bottlenecks[r].quantiles[:, 0, 1].detach())

    def _gain(self, r: int) -> torch.Tensor:
        return self._per_symbol(self.gain[r].exp())

    def _inv_gain(self, r: int) -> torch.Tensor:
        return self._per_symbol(self.inv_gain[r].exp())

    # --- training -------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, rate: int | None = None, drop_prob: float = 0.0,
                flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        """Noisy (training) or rounded (eval) latents at rate point ``rate`` (default the
        highest); ``drop_prob`` replaces whole packets by the medians, i.i.d."""
        self.check_features(h)
        r = self._rate(rate)
        h = self._by_view(h)
        y = self.g_a(h).float() * self._gain(r)
        with torch.autocast(y.device.type, enabled=False):  # likelihoods in float32
            y_hat, lik = self.entropy_bottlenecks[r](y.view(len(y), self.latent, self.positions))
        y_hat = y_hat.reshape(len(y), self.n_sym)
        if drop_prob > 0:
            lost = torch.rand(len(h), len(self.groups), generator=generator) < drop_prob
            mask = torch.zeros(len(h), self.n_sym, dtype=torch.bool)
            for j, g in enumerate(self.groups):
                mask[:, g] = lost[:, j : j + 1]
            y_hat = torch.where(mask.to(h.device), self._medians(r).expand_as(y_hat), y_hat)
        # eval: the receiver's path, so that decompress gives these features exactly
        feats = self._synthesize(y_hat * self._inv_gain(r), fast=not self.training)
        bits = -torch.log2(lik).flatten(1).sum(1)
        if self.context and not self.training and self.entropy_bottlenecks[r]._offset.numel():
            lo, hi = (t.to(y.device) for t in self.support(r))
            k = torch.round(y_hat - self._medians(r)).clamp(lo, hi)
            bits = self.context_bits(k, r)  # what the context coder spends (estimate)
        return CodecOutput(feats, bits.reshape(-1, self.views).sum(1), {"y": lik})

    # --- coding ---------------------------------------------------------------------------
    def update(self, force: bool = False) -> bool:
        """Freeze every rate point's CDF tables; returns whether any changed."""
        changed = [bool(eb.update(force=force)) for eb in self.entropy_bottlenecks]
        self._tables_cache = self._ctx64_cache = self._coding_cache = None
        return any(changed)

    def _tables(self, r: int) -> tuple[list[list[int]], list[int]]:
        """(CDF rows cut to their lengths, offsets) of rate point ``r``."""
        cache = getattr(self, "_tables_cache", None)
        if cache is None:
            cache = self._tables_cache = {}
        if r not in cache:
            eb = self.entropy_bottlenecks[r]
            if eb._quantized_cdf.numel() == 0:
                raise ConfigError("task codec has no CDF tables: call codec.update() first")
            cdf = eb._quantized_cdf.tolist()
            lengths = eb._cdf_length.reshape(-1).tolist()
            offsets = eb._offset.reshape(-1).tolist()
            rows = [row[: int(n)] for row, n in zip(cdf, lengths)]
            for row in rows:
                arith.check_cdf(row)
            n = self.positions  # one table per channel, used at each of its positions
            cache[r] = ([row for row in rows for _ in range(n)],
                        [int(o) for o in offsets for _ in range(n)])  # fmt: skip
        return cache[r]

    def support(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest symbol ``(latent,)`` each channel can send at rate point ``r``
        (the frozen factorized tables' range; symbols are clamped to it)."""
        rows, offsets = self._tables(r)
        return (torch.tensor(offsets),
                torch.tensor([o + len(row) - 3 for o, row in zip(offsets, rows)]))  # fmt: skip

    def symbols(self, h: torch.Tensor, r: int) -> torch.Tensor:
        """Integer symbols ``(B * views, n_sym)`` (int64, around the medians, clamped to
        the support; sample-major) that ``compress`` sends at rate point ``r``."""
        h = self._by_view(h.to(self._device()))
        y = (self.g_a(h) * self._gain(r)).clamp(-_CLAMP, _CLAMP)
        sym = torch.round(y - self._medians(r)).long().cpu()
        lo, hi = self.support(r)
        return torch.maximum(torch.minimum(sym, hi), lo)

    def context_bits(self, k: torch.Tensor, r: int) -> torch.Tensor:
        """Bits ``(B,)`` the context model gives symbols ``k`` at rate point ``r``
        (differentiable in the context model; an estimate of what ``compress`` sends)."""
        lo, hi = (t.to(k.device) for t in self.support(r))
        mu, sigma = self.contexts[r](k.float())
        lik = discrete_gaussian_likelihood(k.float(), mu, sigma, lo, hi)
        return -torch.log2(lik).sum(1)

    def _ctx64(self, r: int) -> ChannelContext:
        import copy

        cache = getattr(self, "_ctx64_cache", None)
        if cache is None:
            cache = self._ctx64_cache = {}
        if r not in cache:
            cache[r] = copy.deepcopy(self.contexts[r]).to("cpu", torch.float64).eval()
        return cache[r]

    def _context_rows(self, r: int, k_row: torch.Tensor, lo: list, hi: list) -> list:
        """Per-channel CDF rows for one sample's symbols (float64, batch of one, snapped
        to a grid: the same on encoder and decoder)."""
        mu, sigma = self._ctx64(r)(k_row.to(torch.float64).view(1, -1))
        return [grid_cdf(lo[i], hi[i], *snap_cell(float(mu[0, i]), float(sigma[0, i]), lo[i],
                                                hi[i])) for i in range(self.n_sym)]  # fmt: skip

    # --- format 2 tables ---------------------------------------------------------------------
    def _coding(self, r: int) -> dict:
        """Format-2 tables of rate point ``r``: supports ``lo``/``hi`` ``(n_sym,)`` int64,
        row width ``width``, the factorized rows as probabilities ``probs`` ``(n_sym,
        width)`` with ``last`` the highest codable index per symbol (the escape bin is
        never sent), ``groups`` (per packet: its rows, ``last`` and ``lo``, views tiled),
        and (context codecs) the fixed-point model, rebuilt when its weights change."""
        cache = getattr(self, "_coding_cache", None)
        if cache is None:
            cache = self._coding_cache = {}
        entry = cache.get(r)
        if entry is None:
            rows, offsets = self._tables(r)
            lo = np.asarray(offsets, dtype=np.int64)
            last = np.asarray([len(row) - 3 for row in rows], dtype=np.int64)
            width = max(len(row) - 1 for row in rows)
            probs = arith.dyadic_probs(rows, width)
            v_n = self.views  # per packet: its rows, ``last`` and ``lo``, views in order
            groups = [(np.tile(probs[g], (v_n, 1)), np.tile(last[g], v_n), np.tile(lo[g], v_n))
                      for g in self.groups]  # fmt: skip
            entry = cache[r] = {"lo": lo, "hi": lo + last, "last": last, "width": width,
                                "probs": probs, "groups": groups}  # fmt: skip
        if self.context:
            ctx = self.contexts[r]
            key = tuple((p.data_ptr(), p._version) for p in ctx.parameters())
            if entry.get("ctx_key") != key:
                entry["ctx"] = FixedContext(ctx, entry["lo"], entry["hi"])
                entry["ctx_key"] = key
        return entry

    def _context_probs(self, r: int, k: np.ndarray, start: int, stop: int,
                       c: dict | None = None) -> np.ndarray:  # fmt: skip
        """Format-2 probability rows ``(B, stop - start, width)`` of channels
        ``start..stop-1`` given the symbols ``k`` ``(B, n_sym)`` (around the medians);
        ``c``: :meth:`_coding` of ``r``, when the caller has it already."""
        c = self._coding(r) if c is None else c
        m, si = c["ctx"].cells(k, start, stop)
        lo, hi = c["lo"][start:stop], c["hi"][start:stop]
        return grid_probs(m, si, lo, hi - lo + 1, c["width"])

    def _stream_format(self) -> int:
        if self.stream_format not in (1, 2):
            raise ConfigError(f"task codec: stream_format must be 1 or 2, got "
                              f"{self.stream_format!r}")  # fmt: skip
        return 2 if self.stream_format == 2 and self.rates <= 128 else 1

    @torch.no_grad()
    def compress(self, h: torch.Tensor, rate: int | None = None) -> list[Bitstream]:
        """One stream per sample at rate point ``rate`` (default the highest), in
        :attr:`stream_format`."""
        self.check_features(h)
        r = self._rate(rate)
        k = self.symbols(h, r)
        fmt = self._stream_format()
        header = self.make_header(meta=bytes([r | FORMAT2 if fmt == 2 else r]),
                                  tensors=[TensorSpec("float32", self.feature_shape)])
        # packet j carries group j of every view, views in order (so a sample has as many
        # packets as groups, whatever its views; a lost packet loses that group of each)
        if fmt == 1:
            return self._compress_format1(k, r, header)
        return self._compress_format2(k, r, header)

    def _compress_format2(self, k: torch.Tensor, r: int, header) -> list[Bitstream]:
        c = self._coding(r)
        kn = k.numpy().astype(np.int64)
        idx = kn - c["lo"]
        v_n, w = self.views, c["width"]
        b_n = len(kn) // v_n
        if self.context:  # every channel's table at once: the symbols are known here
            probs = self._context_probs(r, kn, 0, self.n_sym).reshape(b_n, v_n, self.n_sym, w)
        else:
            probs = c["probs"]
        idx = idx.reshape(b_n, v_n, self.n_sym)
        payloads = []
        for g, tiled in zip(self.groups, c["groups"]):  # packet g: group g of each view
            p = probs[:, :, g].reshape(b_n, -1, w) if self.context else tiled[0]
            # factorized rows: the interval code decodes by construction (see
            # arith.encode_batch), so only the context codecs' payloads are decoded again
            payloads.append(arith.encode_batch(idx[:, :, g].reshape(b_n, -1), p,
                                               verify=self.context))  # fmt: skip
        return [Bitstream(header, [pk[b] for pk in payloads]) for b in range(b_n)]

    def _compress_format1(self, k: torch.Tensor, r: int, header) -> list[Bitstream]:
        rows, _ = self._tables(r)
        lo_t, hi_t = self.support(r)
        lo, hi = lo_t.tolist(), hi_t.tolist()
        out = []
        for b in range(len(k) // self.views):
            ks = k[b * self.views : (b + 1) * self.views]
            syms = [(kv - lo_t).tolist() for kv in ks]
            tabs = [self._context_rows(r, kv, lo, hi) for kv in ks] if self.context \
                else [rows] * self.views
            out.append(Bitstream(header, [
                arith.encode([x for v in range(self.views) for x in syms[v][g]],
                             [row for v in range(self.views) for row in tabs[v][g]])
                for g in self.groups]))  # fmt: skip
        return out

    def _decode_context(self, packets: Sequence[bytes | None], r: int) -> torch.Tensor:
        """Format 1: symbols ``(views, n_sym)`` of one sample; each symbol's table comes
        from the context model given its view's symbols decoded so far."""
        lo_t, hi_t = self.support(r)
        lo, hi = lo_t.tolist(), hi_t.tolist()
        # a lost group: symbol 0, the median
        k = torch.zeros(self.views, self.n_sym, dtype=torch.float64)
        for g, p in zip(self.groups, packets):
            if p is None:
                continue
            dec = arith.Decoder(p, self.views * (g.stop - g.start))
            for v in range(self.views):
                for i in range(g.start, g.stop):
                    mu, sigma = self._ctx64(r)(k[v].view(1, -1))
                    row = grid_cdf(lo[i], hi[i], *snap_cell(float(mu[0, i]), float(sigma[0, i]),
                                                         lo[i], hi[i]))  # fmt: skip
                    k[v, i] = lo[i] + dec.next(row)
        return k.float()

    def _decode_format1(self, packets: Sequence[bytes | None], r: int) -> torch.Tensor:
        """Format 1: symbols ``(views, n_sym)`` of one sample (a lost group: 0, the median)."""
        if self.context:
            return self._decode_context(packets, r)
        rows, offsets = self._tables(r)
        v_n = self.views
        sym = torch.zeros(v_n, self.n_sym)
        for g, p in zip(self.groups, packets):
            if p is None:
                continue
            got = arith.decode(p, rows[g] * v_n)
            vals = [min(i, len(row) - 3) + o for i, row, o
                    in zip(got, rows[g] * v_n, offsets[g] * v_n)]  # fmt: skip
            sym[:, g] = torch.tensor(vals, dtype=torch.float32).view(v_n, -1)
        return sym

    def _decode_format2(self, packets: list[list[bytes | None]], r: int) -> np.ndarray:
        """Format 2: symbols ``(B * views, n_sym)`` (int64, around the medians,
        sample-major) of ``B`` samples at rate point ``r`` (``packets[b]``: sample ``b``'s
        packets; a lost group: 0, the median). The context model runs for the whole batch,
        one channel at a time."""
        c = self._coding(r)
        v_n = self.views
        k = np.zeros((len(packets) * v_n, self.n_sym), dtype=np.int64)
        for j, g in enumerate(self.groups):
            have = [b for b, ps in enumerate(packets) if ps[j] is not None]
            if not have:
                continue
            if not self.context:
                probs, last, lo = c["groups"][j]
                idx = arith.decode_batch([packets[b][j] for b in have], probs)
                if bool((idx > last).any()):
                    raise BitstreamError("task codec: a payload decodes to the escape "
                                         "symbol, which no encoder sends")  # fmt: skip
                got = (idx + lo).reshape(-1, g.stop - g.start)
                if len(have) == len(packets):
                    k[:, g] = got
                else:
                    rows = (np.asarray(have)[:, None] * v_n + np.arange(v_n)).reshape(-1)
                    k[rows, g] = got
                continue
            if len(have) <= SMALL_BATCH:  # per sample, per channel: fewer numpy calls
                for b in have:
                    self._decode_context_one(packets[b][j], g, k[b * v_n : (b + 1) * v_n], c)
                continue
            dec = arith.RowDecoders([packets[b][j] for b in have], v_n * (g.stop - g.start))
            at = np.asarray(have, dtype=np.int64) * v_n
            for v in range(v_n):
                rows = at + v
                for i in range(g.start, g.stop):
                    probs = self._context_probs(r, k[rows], i, i + 1, c)[:, 0]
                    k[rows, i] = c["lo"][i] + dec.next(probs)
        return k

    def _decode_context_one(self, data: bytes, g: slice, k: np.ndarray, c: dict) -> None:
        """Format 2, one sample's packet ``g`` of a context codec into its symbols ``k``
        ``(views, n_sym)``: the batched path's integers (:meth:`FixedContext.cell`,
        :func:`grid_row`), channel by channel."""
        dec = arith.RowDecoders([data], self.views * (g.stop - g.start))
        ctx, lo, hi, w = c["ctx"], c["lo"].tolist(), c["hi"].tolist(), c["width"]
        for kv in k:
            for i in range(g.start, g.stop):
                m, si = ctx.cell(kv, i)
                kv[i] = lo[i] + dec.next_one(grid_row(m, si, lo[i], hi[i] - lo[i] + 1, w))

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, len(self.groups))
        dev = self._device()
        v_n = self.views
        y_hat = torch.zeros(len(streams) * v_n, self.n_sym, device=dev)
        kinds = [self.format_of(s) for s in streams]
        for r, fmt in sorted(set(kinds)):
            at = [b for b, kind in enumerate(kinds) if kind == (r, fmt)]
            if fmt == 1:
                sym = torch.cat([self._decode_format1(streams[b].packets, r) for b in at])
            else:
                sym = torch.from_numpy(self._decode_format2([streams[b].packets for b in at], r)
                                       .astype(np.float32))  # fmt: skip
            rows = torch.as_tensor(at)[:, None] * v_n + torch.arange(v_n)
            y_hat[rows.reshape(-1)] = (sym.to(dev) + self._medians(r)) * self._inv_gain(r)
        return self._synthesize(y_hat, fast=True).float().cpu()

