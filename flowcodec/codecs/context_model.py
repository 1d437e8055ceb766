"""The task codec's context model and its coding tables.

:class:`ChannelContext` predicts each latent symbol's (mean, scale) from the symbols before it
in its packet group. Two codings of its predictions exist:

- **format 1** (what the codec wrote first): the model in float64, one sample at a time, each
  cell's table from :func:`grid_cdf` (libm's erf), cells from :func:`snap_cell`;
- **format 2** (the default): the model in integer fixed point (:class:`FixedContext`), the
  tables from integer normal-CDF tables (:func:`grid_probs`), the same on every machine.

:func:`discrete_gaussian_likelihood` is the training-time likelihood of the same model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from flowcodec.codecs import arith
from flowcodec.errors import ConfigError

__all__ = ["ChannelContext", "FixedContext", "grid_probs", "grid_row",
           "discrete_gaussian_likelihood", "snap_cell", "grid_cdf"]

_SIGMA_MIN, _SIGMA_MAX, _SIGMA_LEVELS, _MU_STEP = 0.08, 64.0, 96, 1 / 32


class ChannelContext(nn.Module):
    """Channel-wise autoregressive model of the latent symbols: for channel ``i``, a mean and
    a scale predicted from the symbols of the channels before it *in its own packet group*
    (so a lost packet never stops another from decoding).

    ``forward(k)`` with ``k`` float ``(B, latent)`` (integer symbols) returns
    ``(mu, sigma)``, each ``(B, latent)``; output ``i`` depends only on ``k[:, j]`` for
    earlier ``j`` of the same group (masked weights, as in MADE). For a grid latent the
    "channels" here are all its symbols, channel-major (a channel's positions in a row,
    so each position also sees the earlier positions of its own channel).
    """

    def __init__(self, latent: int, groups: Sequence[slice], hidden: int = 16) -> None:
        super().__init__()
        self.latent, self.hidden = latent, hidden
        group_of = torch.zeros(latent, dtype=torch.long)
        for j, g in enumerate(groups):
            group_of[g] = j
        i = torch.arange(latent)
        # unit block i (hidden units) sees input j < i of the same group
        see = (i[None, :] < i[:, None]) & (group_of[None, :] == group_of[:, None])
        self.register_buffer("mask1", see.repeat_interleave(hidden, 0).float(), persistent=False)
        self.l1 = nn.Linear(latent, latent * hidden)
        # the layers after the first are block-diagonal: one small MLP per channel
        self.l2 = nn.Conv1d(latent * hidden, latent * hidden, 1, groups=latent)
        self.l3 = nn.Conv1d(latent * hidden, 2 * latent, 1, groups=latent)
        with torch.no_grad():
            self.l3.weight.mul_(0.1)
            self.l3.bias.zero_()

    def forward(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = nn.functional
        a = f.relu(f.linear(k, self.l1.weight * self.mask1, self.l1.bias))
        a = f.relu(self.l2(a.unsqueeze(-1)))
        out = self.l3(a).view(len(k), self.latent, 2)
        mu = out[..., 0]
        sigma = (out[..., 1] + 1.0).exp().clamp(_SIGMA_MIN, _SIGMA_MAX)
        return mu, sigma


def snap_cell(mu: float, sigma: float, lo: int, hi: int) -> tuple[int, int]:
    """Grid indices of a predicted (mean, scale): what the coder's tables depend on."""
    m = round(min(max(mu, lo - 1.0), hi + 1.0) / _MU_STEP)
    span = math.log(_SIGMA_MAX / _SIGMA_MIN)
    t = (math.log(min(max(sigma, _SIGMA_MIN), _SIGMA_MAX)) - math.log(_SIGMA_MIN)) / span
    return m, round(t * (_SIGMA_LEVELS - 1))


@lru_cache(maxsize=65536)
def grid_cdf(lo: int, hi: int, m: int, si: int) -> tuple[int, ...]:
    sigma = _SIGMA_MIN * (_SIGMA_MAX / _SIGMA_MIN) ** (si / (_SIGMA_LEVELS - 1))
    return tuple(arith.gaussian_cdf(lo, hi, m * _MU_STEP, sigma))


# --- format 2: the context model in fixed point, integer tables -----------------------------
# Format 1 ran the context model in float64 on one sample at a time and built each table with
# libm's erf: the same on one machine, but a float evaluation can change with the batch (BLAS
# kernels), the thread count or the platform, and a table that moves by one unit breaks the
# decode. Format 2 is integers from the model's weights to the coder's tables:
#
# - the weights are rounded once to multiples of 2**-16 (int64); the model runs on the integer
#   symbols with integer matrix products (exact in any order) and floor shifts, so a channel's
#   (mean, scale) cell is the same for the whole batch at once (encoder) and for one channel
#   at a time (decoder), on any machine;
# - a cell's table is integer: a standard normal CDF table per scale level (2**32 fixed point,
#   from :func:`arith.normal_cdf`, which uses IEEE basic operations only), read at the cell's
#   edges, turned into frequencies summing to 2**16 with integer arithmetic.

#: Fraction bits of the fixed-point context model (weights and activations).
_FRAC = 16
#: Scale-level index from the model's log-scale output ``o`` (fixed point, 2 * _FRAC fraction
#: bits): ``round((o + 1 - ln 0.08) * 95 / ln 800)``, as integers: ``_SI_OFFSET`` is
#: ``round((1 - ln 0.08) * 2**32)`` and ``_SI_GAIN`` is ``round(95 / ln 800 * 2**16)``.
_SI_OFFSET, _SI_GAIN, _SI_SHIFT = 15142889222, 931381, 2 * _FRAC + 16
#: ``ln(800) / 95``: scale level ``si`` is ``0.08 * exp(si * _LN_STEP)`` (0.08 .. 64).
_LN_STEP = 0.07036433397545186


class FixedContext:
    """A :class:`ChannelContext` in integer fixed point, for format-2 coding.

    ``FixedContext(ctx, lo, hi)`` rounds the weights (``2**-16`` steps) and checks that no
    intermediate can leave int64 for symbols in ``[lo, hi]`` (ConfigError otherwise).
    ``cells(k, start, stop)`` with integer symbols ``k`` (B, latent) returns the grid cells
    ``(m, si)`` (int64 ``(B, stop - start)``) of channels ``start..stop-1``: the mean
    ``m / 32`` (clamped to ``[lo - 1, hi + 1]``) and the scale level ``si`` in 0..95.
    Channel ``i`` reads only ``k[:, j]`` for the earlier ``j`` of its group (the mask), so
    the decoder may pass zeros for symbols not decoded yet.
    """

    def __init__(self, ctx: ChannelContext, lo: np.ndarray, hi: np.ndarray) -> None:
        n, h = ctx.latent, ctx.hidden
        self.latent, self.hidden = n, h
        self.lo, self.hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)

        def fixed(t: torch.Tensor, bits: int) -> np.ndarray:
            a = t.detach().to("cpu", torch.float64).numpy() * 2.0**bits
            if not np.isfinite(a).all() or np.abs(a).max(initial=0) >= 2.0**52:
                raise ConfigError("context model weights are not finite or too large for "
                                  "fixed-point coding")  # fmt: skip
            return np.rint(a).astype(np.int64)

        self.w1 = fixed(ctx.l1.weight * ctx.mask1, _FRAC)  # (n * h, n)
        self.b1 = fixed(ctx.l1.bias, _FRAC)
        self.w2 = fixed(ctx.l2.weight[:, :, 0], _FRAC).reshape(n, h, h)
        self.b2 = fixed(ctx.l2.bias, 2 * _FRAC).reshape(n, h)
        self.w3 = fixed(ctx.l3.weight[:, :, 0], _FRAC).reshape(n, 2, h)
        self.b3 = fixed(ctx.l3.bias, 2 * _FRAC).reshape(n, 2)
        # worst-case magnitudes (float, with a wide margin below 2**63)
        kmax = float(max(np.abs(self.lo).max(initial=0), np.abs(self.hi).max(initial=0)))
        a1 = np.abs(self.w1).astype(float).sum(1) * kmax + np.abs(self.b1)
        a2 = (np.abs(self.w2).astype(float) * a1.reshape(n, 1, h)).sum(2) + np.abs(self.b2)
        a3 = ((np.abs(self.w3).astype(float) * (a2.reshape(n, 1, h) / 2.0**_FRAC)).sum(2)
              + np.abs(self.b3))  # fmt: skip
        if max(a1.max(initial=0), a2.max(initial=0), a3.max(initial=0)) >= 2.0**60 \
                or kmax >= 2**24:  # fmt: skip
            raise ConfigError("context model too large for 64-bit fixed-point coding")
        self._channels = None

    def cell(self, k: np.ndarray, i: int) -> tuple[int, int]:
        """``cells(k[None], i, i + 1)`` for one sample's symbols ``k`` (int64 ``(latent,)``),
        as Python ints: the same integer arithmetic (every intermediate within int64, as
        checked above) in a few small products, for decoding small batches."""
        if self._channels is None:
            h = self.hidden
            self._channels = [(np.ascontiguousarray(self.w1[c * h : (c + 1) * h]),
                               self.b1[c * h : (c + 1) * h], self.w2[c], self.b2[c], self.w3[c],
                               self.b3[c], int(self.lo[c]), int(self.hi[c]))
                              for c in range(self.latent)]  # fmt: skip
        w1, b1, w2, b2, w3, b3, lo, hi = self._channels[i]
        a1 = np.maximum(w1 @ k + b1, 0)
        a2 = np.maximum(w2 @ a1 + b2, 0) >> _FRAC
        mu, ls = (w3 @ a2 + b3).tolist()
        one = 1 << (2 * _FRAC)
        mu = min(max(mu, (lo - 2) * one), (hi + 2) * one)
        m = min(max(((mu << 5) + (one >> 1)) >> (2 * _FRAC), 32 * (lo - 1)), 32 * (hi + 1))
        ls = min(max(ls, -8 * one), 8 * one)
        si = ((ls + _SI_OFFSET) * _SI_GAIN + (1 << (_SI_SHIFT - 1))) >> _SI_SHIFT
        return m, min(max(si, 0), _SIGMA_LEVELS - 1)

    def cells(self, k: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        h, c = self.hidden, stop - start
        units = slice(start * h, stop * h)
        a1 = k @ self.w1[units].T + self.b1[units]  # 2**-16 units
        a1 = np.maximum(a1, 0).reshape(len(k), c, h)
        a2 = np.einsum("bci,coi->bco", a1, self.w2[start:stop]) + self.b2[start:stop]
        a2 = np.maximum(a2, 0) >> _FRAC  # back to 2**-16 units (floor)
        out = np.einsum("bci,coi->bco", a2, self.w3[start:stop]) + self.b3[start:stop]
        lo, hi = self.lo[start:stop], self.hi[start:stop]
        one = 1 << (2 * _FRAC)
        mu = np.clip(out[..., 0], (lo - 2) * one, (hi + 2) * one)
        m = np.clip(((mu << 5) + (one >> 1)) >> (2 * _FRAC), 32 * (lo - 1), 32 * (hi + 1))
        ls = np.clip(out[..., 1], -8 * one, 8 * one)
        si = ((ls + _SI_OFFSET) * _SI_GAIN + (1 << (_SI_SHIFT - 1))) >> _SI_SHIFT
        return m, np.clip(si, 0, _SIGMA_LEVELS - 1)


class _NormalTables:
    """``floor(2**32 * Phi(q / (32 sigma_si)))`` for integers ``q`` (clamped to
    ``+-ceil(7 * 32 * sigma_si)``, beyond which Phi is 0 or 1) and each scale level ``si``,
    one flat int64 array; a level is computed the first time a cell needs it.

    :meth:`padded` gives the same tables laid out for :func:`grid_probs`: each level's
    values for every ``q`` in ``-span..span`` (the clamp already applied), levels one after
    another, and one last entry ``2**32`` (the top edge of every row)."""

    def __init__(self) -> None:
        sig = 0.08 * arith._exp(np.arange(_SIGMA_LEVELS, dtype=np.float64) * _LN_STEP)
        self.sigma = sig
        self.reach = np.ceil(arith.NORMAL_CUT * 32.0 * sig).astype(np.int64)
        self.base = np.concatenate([[0], np.cumsum(2 * self.reach + 1)[:-1]]) + self.reach
        self.flat = np.zeros(int((2 * self.reach + 1).sum()), dtype=np.int64)
        self.ready = np.zeros(_SIGMA_LEVELS, dtype=bool)
        self.span = 0
        self.wide = np.full(1, np.int64(1) << 32)
        self.wide_ready = np.zeros(_SIGMA_LEVELS, dtype=bool)

    def _fill(self, si: int) -> None:
        r = int(self.reach[si])
        q = np.arange(-r, r + 1, dtype=np.float64)
        phi = arith.normal_cdf(q / (32.0 * self.sigma[si]))
        t = np.floor(np.ldexp(phi, 32)).astype(np.int64)
        b = int(self.base[si])
        self.flat[b - r : b + r + 1] = np.maximum.accumulate(t)
        self.ready[si] = True

    def at(self, si: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Table values at scale levels ``si`` (broadcast against ``q``) and offsets ``q``."""
        for level in np.unique(si[~self.ready[si]]):
            self._fill(int(level))
        r = self.reach[si]
        return self.flat[self.base[si] + np.clip(q, -r, r)]

    def padded(self, si: np.ndarray, span: int) -> tuple[np.ndarray, int]:
        """``(wide, length)``: level ``l``'s value at ``q`` (``|q| <= span``) is
        ``wide[l * length + length // 2 + q]`` (the levels in ``si`` filled; ``length //
        2`` is at least ``span``); ``wide[-1]`` is ``2**32``. Grows (and refills) when a
        larger ``span`` is asked for."""
        if span > self.span:
            self.span = max(int(span), 2 * self.span)
            self.wide = np.full(_SIGMA_LEVELS * (2 * self.span + 1) + 1, np.int64(1) << 32)
            self.wide_ready[:] = False
        length = 2 * self.span + 1
        todo = np.unique(si[~self.wide_ready[si]])
        if len(todo):
            q = np.arange(-self.span, self.span + 1, dtype=np.int64)
            for level in todo:
                self.wide[level * length : (level + 1) * length] = self.at(np.int64(level), q)
                self.wide_ready[level] = True
        return self.wide, length


_NORMAL = _NormalTables()


def grid_probs(m: np.ndarray, si: np.ndarray, lo: np.ndarray, n: np.ndarray,
               width: int) -> np.ndarray:  # fmt: skip
    """Format-2 tables of grid cells ``(m, si)`` (any shape ``S``) of channels with supports
    ``lo .. lo + n - 1`` (broadcast to ``S``): float64 ``(*S, width)`` probabilities, each
    row integer frequencies (at least 1 per symbol, summing to 2**16) over ``2**16``, zero
    beyond ``n``. Integer arithmetic from the normal tables on: the same on every machine.

    Symbol ``j``'s upper edge is ``Phi`` at offset ``32 j + 16 - (m - 32 lo)`` (the last
    symbol's is ``2**32``); its frequency is ``1 + floor(p (2**16 - n) / 2**32)`` for its
    mass ``p`` between the edges, the remainder to 2**16 going to the first most likely
    symbol."""
    m = np.asarray(m, dtype=np.int64)
    si = np.asarray(si, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), m.shape)
    j = np.arange(width, dtype=np.int64)
    d = m - 32 * np.asarray(lo, dtype=np.int64)
    last = j < (n - 1)[..., None]  # symbols below the last (whose upper edge is 2**32)
    # the offsets are 32 j + 16 - d for j < width: |offset| <= 32 * (width + 2) for the
    # cells FixedContext gives (the mean clamped to [lo - 1, hi + 1]); other cells take
    # the clamped lookup
    span = 32 * (int(width) + 2)
    if d.size and (int(d.max()) - 16 > span or 32 * int(width) - 16 - int(d.min()) > span):
        edge = np.where(last, _NORMAL.at(si[..., None], 32 * j + 16 - d[..., None]),
                        np.int64(1) << 32)  # fmt: skip
    else:
        wide, length = _NORMAL.padded(si, span)
        start = si * length + (length // 2 + 16) - d
        edge = wide[np.where(last, start[..., None] + 32 * j, len(wide) - 1)]
    p = edge
    p[..., 1:] = edge[..., 1:] - edge[..., :-1]  # the mass of each symbol (in place)
    spare = ((1 << 16) - n)[..., None]
    freq = (p * spare) >> 32
    freq += j < n[..., None]
    top = np.argmax(p, axis=-1)[..., None]  # beyond n, p is 0 < the support's largest
    rest = (1 << 16) - freq.sum(-1, keepdims=True)
    np.put_along_axis(freq, top, np.take_along_axis(freq, top, -1) + rest, -1)
    return freq * (1.0 / (1 << 16))


def discrete_gaussian_likelihood(k: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                                 lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """P(k) for integer ``k`` in ``[lo, hi]`` under ``N(mu, sigma^2)`` rounded to the integers,
    tails folded into ``lo`` and ``hi`` (what :func:`arith.gaussian_cdf` quantises)."""
    upper = torch.special.ndtr((k + 0.5 - mu) / sigma)
    lower = torch.special.ndtr((k - 0.5 - mu) / sigma)
    upper = torch.where(k >= hi, torch.ones_like(upper), upper)
    lower = torch.where(k <= lo, torch.zeros_like(lower), lower)
    return (upper - lower).clamp_min(1e-9)


def grid_row(m: int, si: int, lo: int, n: int, width: int) -> np.ndarray:
    """``grid_probs`` of one cell (Python ints), ``(width,)``: the same values, from a
    strided slice of the normal tables instead of a gather."""
    d = m - 32 * lo
    span = 32 * (width + 2)
    if d - 16 > span or 32 * width - 16 - d > span:
        return grid_probs(np.int64(m), np.int64(si), lo, n, width)
    if span > _NORMAL.span or not _NORMAL.wide_ready[si]:
        _NORMAL.padded(np.asarray([si], dtype=np.int64), span)
    length = 2 * _NORMAL.span + 1
    start = si * length + length // 2 + 16 - d
    edge = np.full(width, np.int64(1) << 32)
    edge[: n - 1] = _NORMAL.wide[start : start + 32 * (n - 1) : 32]
    p = edge.copy()
    p[1:] -= edge[:-1]  # the mass of each symbol
    freq = (p * ((1 << 16) - n)) >> 32
    freq[:n] += 1
    freq[int(p.argmax())] += (1 << 16) - int(freq.sum())
    return freq * (1.0 / (1 << 16))
