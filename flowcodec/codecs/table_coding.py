"""Coding integer symbols with an entropy model's frozen CDF tables, outliers included.

The token codecs code their latents with a model's frozen 16-bit CDF rows (CompressAI's
``_quantized_cdf``, ``_cdf_length``, ``_offset``) and code a symbol outside its row's support
from the escape bin's mass, up to :data:`ESCAPE_RANGE` beyond it:

- format 1, :func:`arith_encode` / :func:`arith_decode`: the exact pure-Python arithmetic
  coder (:mod:`flowcodec.codecs.arith`) on :data:`ARITH_PRECISION`-bit rows whose escape bin
  is split into outlier symbols;
- format 2, :func:`range_encode` / :func:`range_decode`: the same model through the compiled
  range coder, made byte-tight (header flag :data:`FLAG_RANGE` of a token stream).
"""

from __future__ import annotations

from collections.abc import Sequence

import constriction
import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs import arith
from flowcodec.codecs.rans import frozen_tables
from flowcodec.errors import ConfigError

__all__ = ["ARITH_PRECISION", "ESCAPE_RANGE", "FLAG_RANGE", "arith_encode", "arith_decode",
           "range_encode", "range_decode", "range_encode_batch", "range_decode_batch",
           "arith_tables", "to_index"]


#: Precision (bits) of the arithmetic coder's tables in the token codecs: CompressAI's
#: 16-bit rows scaled up by 2**24, which leaves room to split each row's escape bin into
#: ``2 * ESCAPE_RANGE`` outlier symbols (see :class:`_EscapedRow`).
ARITH_PRECISION = 40


#: How far outside its row's support a symbol can be coded exactly (further is clamped).
ESCAPE_RANGE = 1 << 20


class _EscapedRow(Sequence):
    """A CompressAI CDF row (``L`` entries at 16 bits: symbols ``0 .. L - 3`` and an escape
    bin) as an :data:`ARITH_PRECISION`-bit row in which the escape bin is split evenly into
    ``2 * ESCAPE_RANGE`` outlier symbols: index ``L - 2 + 2 * (d - 1)`` is ``d`` below the
    support, the next one ``d`` above. The in-range symbols keep their exact probabilities.
    Entries are computed on demand (the row is never materialised)."""

    __slots__ = ("base", "start", "step", "n")

    def __init__(self, row: Sequence[int]) -> None:
        shift = ARITH_PRECISION - 16
        self.base = [int(c) << shift for c in row[:-1]]
        self.start = self.base[-1]  # the escape bin's start
        self.step = ((1 << ARITH_PRECISION) - self.start) // (2 * ESCAPE_RANGE)
        self.n = len(self.base) + 2 * ESCAPE_RANGE  # entries

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        k = len(self.base) - 1
        if i <= k:
            return self.base[i]
        if i == self.n - 1:
            return 1 << ARITH_PRECISION
        return self.start + (i - k) * self.step


def _per_version(model: nn.Module, key: str, build):
    """``build(rows, lengths, offsets)`` over ``model``'s frozen CDF rows (each cut to its
    length and checked by :func:`arith.check_cdf`), kept on the model under ``key`` per
    version of the tables (:func:`frozen_tables` validates them, ConfigError)."""
    t = frozen_tables(model)
    cached = model.__dict__.get(key)
    if cached is not None and cached[0] is t:
        return cached[1]
    cdf, lengths, offsets = t
    rows = []
    for row, n in zip(cdf, lengths):
        row = row[: int(n)]
        arith.check_cdf(row)
        rows.append(row)
    out = build(rows, lengths, offsets)
    model.__dict__[key] = (t, out)
    return out


def arith_tables(model: nn.Module) -> tuple[list[_EscapedRow], list[int]]:
    """``model``'s frozen CDF rows for the exact arithmetic coder (each cut to its length,
    checked by :func:`arith.check_cdf`, escape bin split into outliers) and their offsets,
    cached per version of the tables. A row of ``L`` entries codes the symbols ``offset ..
    offset + L - 3`` at their table probabilities and up to :data:`ESCAPE_RANGE` beyond
    either end from the escape bin's mass.

    Step ``((1 << 40) - start) // 2**21 >= 2**3`` because every escape bin holds at least
    one 16-bit unit, so every outlier symbol has a non-zero frequency."""
    return _per_version(model, "_flowcodec_arith", lambda rows, lengths, offsets: (
        [_EscapedRow(row) for row in rows], [int(o) for o in offsets]))


def to_index(s: int, off: int, top: int) -> int:
    if s < off:
        return top - off + 1 + 2 * (min(off - s, ESCAPE_RANGE) - 1)
    if s > top:
        return top - off + 2 + 2 * (min(s - top, ESCAPE_RANGE) - 1)
    return s - off


def _from_index(v: int, off: int, top: int) -> int:
    k = v - (top - off + 1)
    if k < 0:
        return v + off
    return off - (k // 2 + 1) if k % 2 == 0 else top + k // 2 + 1


def arith_encode(model: nn.Module, symbols: torch.Tensor, indexes: torch.Tensor) -> bytes:
    """Arithmetic-code integer ``symbols`` with CDF rows ``indexes`` of ``model``'s frozen
    tables. At most one byte above the information content; no state flush, so a few
    likely symbols take a byte or two. A symbol outside its row's support is coded from
    the escape bin's mass (clamped :data:`ESCAPE_RANGE` beyond it)."""
    rows, offs = arith_tables(model)
    idx = indexes.reshape(-1).tolist()
    sym = symbols.reshape(-1).tolist()
    if len(sym) != len(idx):
        raise ConfigError(f"{len(sym)} symbols but {len(idx)} indexes")
    vals = [to_index(int(s), offs[i], offs[i] + len(rows[i].base) - 2)
            for s, i in zip(sym, idx)]  # fmt: skip
    return arith.encode(vals, [rows[i] for i in idx], ARITH_PRECISION)


def arith_decode(model: nn.Module, data: bytes, indexes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`arith_encode`: int32 symbols shaped like ``indexes``. Any payload
    up to ``arith.max_bytes(n, ARITH_PRECISION)`` bytes decodes to in-range symbols;
    a longer one raises :class:`BitstreamError`."""
    if not isinstance(data, bytes | bytearray):
        raise BitstreamError(f"packet payload must be bytes, got {type(data).__name__}")
    rows, offs = arith_tables(model)
    idx = indexes.reshape(-1).tolist()
    vals = arith.decode(bytes(data), [rows[i] for i in idx], ARITH_PRECISION)
    out = [_from_index(v, offs[i], offs[i] + len(rows[i].base) - 2) for v, i in zip(vals, idx)]
    return torch.tensor(out, dtype=torch.int32).reshape(indexes.shape)


#: Bit 0 of a token stream's header flags: its arithmetic-coded payloads (``coder="arith"``
#: token latents, the hyperprior's ``z`` packet) are range-coded (format 2, :func:`range_encode`);
#: without it they are in format 1 (:func:`arith_encode`).
FLAG_RANGE = 0x01


#: The outlier code after an escape: ``2 * (d - 1)`` for ``d`` below the support, plus one
#: for ``d`` above, uniform over ``2 * ESCAPE_RANGE`` values (what format 1's split escape
#: bin gives each outlier).
_OUTLIERS = constriction.stream.model.Uniform(2 * ESCAPE_RANGE)


#: Bits a format-2 symbol can take at most: 16 for its row (CompressAI's 16-bit frequencies)
#: and 21 for an outlier code.
_RANGE_BITS = 16 + 21


def _range_rows(model: nn.Module) -> tuple[list, np.ndarray, np.ndarray]:
    """``model``'s frozen rows as the range coder's categorical models (each row's 16-bit
    frequencies over ``2**16``, escape bin included, exact), with the rows' offsets and
    highest in-support symbols (int64), cached per version of the tables.

    The models are built once (``perfect=False``, not lazy): constriction quantizes them
    exactly as the lazy ones (with ``perfect=False`` the laziness only changes run time,
    not the coded bytes), and then codes and decodes without requantizing per call."""
    def build(rows, lengths, offsets):
        models = []
        for row in rows:
            freq = np.diff(np.asarray(row, dtype=np.int64)).astype(np.float64)
            models.append(constriction.stream.model.Categorical(np.ldexp(freq, -16),
                                                                perfect=False))  # fmt: skip
        offs = np.asarray(offsets, dtype=np.int64)
        return models, offs, offs + np.asarray(lengths, dtype=np.int64) - 3

    return _per_version(model, "_flowcodec_range", build)


class _Plan:
    """The coding order of ``B`` payloads of ``n`` symbols with CDF rows ``idx`` (int64
    ``(B, n)``, checked to be in range): each payload's symbols of each row used, rows
    ascending, each row's symbols in their own order (one coder call per row), found for
    the whole batch at once. ``order`` ``(B, n)`` (or ``(n,)`` when every payload uses the
    same rows, the usual case) is the permutation into that order; ``groups[b]`` lists
    ``(row, start, stop)`` slices of the permuted payload ``b`` (one list shared by all
    payloads when the rows are)."""

    __slots__ = ("shared", "order", "groups", "inverse")

    def __init__(self, idx: np.ndarray) -> None:
        n = idx.shape[1]
        self.shared = len(idx) <= 1 or bool((idx == idx[:1]).all())
        if self.shared:
            one = idx[0] if len(idx) else np.zeros(0, np.int64)
            self.order = np.argsort(one, kind="stable")
            self.inverse = np.empty_like(self.order)
            self.inverse[self.order] = np.arange(n)
            self.groups = [self._slices(one[self.order], n)] * len(idx)
        else:
            self.order = np.argsort(idx, axis=1, kind="stable")
            srt = np.take_along_axis(idx, self.order, axis=1)
            self.groups = [self._slices(row, n) for row in srt]

    @staticmethod
    def _slices(srt: np.ndarray, n: int) -> list[tuple[int, int, int]]:
        if n == 0:
            return []
        cut = (np.flatnonzero(srt[1:] != srt[:-1]) + 1).tolist()
        starts, stops = [0, *cut], [*cut, n]
        rows = srt[starts].tolist()
        return list(zip(rows, starts, stops))

    def permute(self, a: np.ndarray) -> np.ndarray:
        """``a`` ``(B, n)`` in coding order (C-contiguous; with shared rows ``a`` may also be
        one row ``(1, n)`` for all)."""
        if self.shared:
            return np.take(a, self.order, axis=1)
        return np.ascontiguousarray(np.take_along_axis(a, self.order, axis=1))

    def unpermute(self, a: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`permute`."""
        if self.shared:
            return np.take(a, self.inverse, axis=1)
        out = np.empty_like(a)
        np.put_along_axis(out, self.order, a, axis=1)
        return out


def _rows_of(plan: _Plan, idx: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """``per_row[idx]``: ``(B, n)``, or ``(1, n)`` when the payloads share their rows."""
    if plan.shared and len(idx):
        return per_row[idx[:1]]
    return per_row[idx]


def _read_one(models, dec, groups, top_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One payload's row symbols (in coding order) and outlier codes."""
    v = np.empty(len(top_sorted), dtype=np.int64)
    for r, a, z in groups:
        v[a:z] = dec.decode(models[r], z - a)
    esc = int(np.count_nonzero(v == top_sorted))
    u = dec.decode(_OUTLIERS, esc) if esc else np.zeros(0, np.int64)
    return v, np.asarray(u, dtype=np.int64)


def _batch_of(indexes: torch.Tensor | np.ndarray, rows: int, batch: int | None) -> np.ndarray:
    """CDF indexes as int64 ``(B, n)`` (a 1-d ``indexes`` is one payload's, shared by the
    batch when ``batch`` is given), checked to be in ``0 .. rows - 1`` (ConfigError)."""
    if isinstance(indexes, torch.Tensor):
        indexes = indexes.detach().cpu().numpy()
    idx = np.asarray(indexes).astype(np.int64, copy=False)
    if batch is None:
        idx = idx.reshape(1, -1)
    else:
        if idx.ndim == 1:
            idx = idx[None]
        idx = idx.reshape(idx.shape[0], int(np.prod(idx.shape[1:])))
        if len(idx) == 1 and batch != 1:
            idx = np.broadcast_to(idx, (batch, idx.shape[1]))
    if idx.size and (idx.min() < 0 or idx.max() >= rows):
        raise ConfigError(f"CDF indexes must be in 0..{rows - 1}, got {idx.min()}..{idx.max()}")
    return idx


def range_encode_batch(model: nn.Module, symbols, indexes, verify: bool = False) -> list[bytes]:
    """:func:`range_encode` for ``B`` payloads at once: ``symbols`` ``(B, ...)`` (tensor or
    array), payload ``b`` its ``symbols[b]`` flattened, with CDF rows ``indexes`` of the
    same shape, or one payload's ``(n,)`` (or ``(1, n)``) shared by all. Returns the ``B``
    payloads, each byte for byte what :func:`range_encode` writes for it. The escapes, the
    outlier codes and the coding order are worked out for the whole batch with array
    operations; what remains per payload is one coder call per row used and one for the
    outliers.

    ``verify``: decode every payload before returning it. Without it (the default) the
    payload is :func:`arith.interval_code` of the coder's final interval, which decodes to
    the message by construction, as for the factorized task payloads
    (``arith.encode_batch(verify=False)``): the decoder makes the same calls in the same
    order (the rows ascending from the same indexes, then as many outlier codes as it read
    escape bins, which is the encoder's count since it read the encoder's symbols so far),
    each with the same fixed model, repeating the encoder's integer updates, and each
    symbol's interval lies inside the one before it, so any point of the final interval
    decodes to the message (and a row symbol or outlier code is always in its model's
    support: ``v`` is ``0 .. L - 2`` of a row of ``L - 1`` symbols, ``u`` is ``0 .. 2 *
    ESCAPE_RANGE - 1``). What that rests on, reading the final interval off the coder's
    state, is checked on every payload by :func:`arith.interval_code` against the point
    the coder itself seals with; a mismatch falls back to :func:`arith.shortest_code`,
    whose every candidate is decoded. The bytes are the same either way."""
    models, offs, tops = _range_rows(model)
    if isinstance(symbols, torch.Tensor):
        symbols = symbols.detach().cpu().numpy()
    sym = np.asarray(symbols).astype(np.int64, copy=False)
    sym = sym.reshape(sym.shape[0], int(np.prod(sym.shape[1:])))
    idx = _batch_of(indexes, len(models), len(sym))
    if idx.shape != sym.shape:
        raise ConfigError(f"{sym.shape[1]} symbols but {idx.shape[1]} indexes per payload"
                          if len(sym) == len(idx) else
                          f"{len(sym)} payloads but indexes for {len(idx)}")  # fmt: skip
    plan = _Plan(idx)
    off, top = _rows_of(plan, idx, offs), _rows_of(plan, idx, tops)  # (B, n) or (1, n)
    below, above = sym < off, sym > top
    esc = below | above
    v = np.where(esc, top - off + 1, sym - off)
    d = np.minimum(np.where(below, off - sym, sym - top), ESCAPE_RANGE)
    u_all = (2 * (d - 1) + above).astype(np.int32)
    # each payload's outlier codes, in its order (row-major), from one flat array
    n_esc = np.count_nonzero(esc, axis=1)
    u_flat = u_all[esc]
    u_end = np.cumsum(n_esc).tolist()
    n_esc = n_esc.tolist()
    vs = plan.permute(v).astype(np.int32)
    tops_sorted = None  # the escape bins in coding order, for payloads that are decoded
    out = []
    Encoder = constriction.stream.queue.RangeEncoder
    for b in range(len(sym)):
        enc = Encoder()
        row = vs[b]
        for r, a, z in plan.groups[b]:
            enc.encode(row[a:z], models[r])
        u = u_flat[u_end[b] - n_esc[b]:u_end[b]] if n_esc[b] else None
        if u is not None:
            enc.encode(u, _OUTLIERS)
        code = arith.interval_code(enc)
        if code is None or verify:
            if tops_sorted is None:
                tops_sorted = plan.permute(top - off + 1)
            top_b = tops_sorted[min(b, len(tops_sorted) - 1)]  # one row when shared

            def decodes(c: bytes, b=b, top_b=top_b, u=u) -> bool:
                try:
                    dec = constriction.stream.queue.RangeDecoder(arith.payload_words(c, len(c)))
                    gv, gu = _read_one(models, dec, plan.groups[b], top_b)
                except Exception:  # an invalid point for the coder: not a code of the message
                    return False
                want = np.zeros(0, np.int64) if u is None else u
                return bool(np.array_equal(gv, vs[b]) and np.array_equal(gu, want))

            if code is None or not decodes(code):
                code = arith.shortest_code(enc.get_compressed(), decodes, 0)
        out.append(code)
    return out


def range_encode(model: nn.Module, symbols: torch.Tensor, indexes: torch.Tensor,
                 verify: bool = False) -> bytes:  # fmt: skip
    """Format 2 of :func:`arith_encode`: the same model (CompressAI's 16-bit rows, an
    outlier coded from the escape bin's mass and clamped :data:`ESCAPE_RANGE` beyond the
    support), range-coded (:mod:`flowcodec.codecs.arith`): each row's symbols in one call,
    rows ascending, then the outlier codes. At most one byte above the shortest code of
    the coder's interval. ``verify``: decode the payload before returning it (it decodes
    by construction; see :func:`range_encode_batch`, which this is for one payload)."""
    sym = symbols.detach().reshape(1, -1) if isinstance(symbols, torch.Tensor) \
        else np.asarray(symbols).reshape(1, -1)  # fmt: skip
    n = indexes.numel() if isinstance(indexes, torch.Tensor) else np.size(indexes)
    if sym.shape[1] != n:
        raise ConfigError(f"{sym.shape[1]} symbols but {n} indexes")
    return range_encode_batch(model, sym, indexes.reshape(1, -1), verify)[0]


def range_decode_batch(model: nn.Module, payloads, indexes) -> np.ndarray:
    """Inverse of :func:`range_encode_batch`: int64 symbols ``(B, n)`` of ``B`` payloads
    with CDF rows ``indexes`` ``(B, n)`` or one payload's ``(n,)`` shared by all; the checks
    of :func:`range_decode` on every payload (BitstreamError)."""
    models, offs, tops = _range_rows(model)
    idx = _batch_of(indexes, len(models), len(payloads))
    if len(idx) != len(payloads):
        raise ConfigError(f"{len(payloads)} payloads but indexes for {len(idx)}")
    n = idx.shape[1]
    limit = arith.range_max_bytes(n, _RANGE_BITS)
    plan = _Plan(idx)
    off, top = _rows_of(plan, idx, offs), _rows_of(plan, idx, tops)  # (B, n) or (1, n)
    esc_at = top - off + 1
    tops_sorted = plan.permute(esc_at)
    count = len(payloads)
    # every payload's words from one buffer (each zero-padded to whole words); a payload
    # arith.payload_error refuses raises its error in its turn below
    errors = [arith.payload_error(d, limit) for d in payloads]
    good = [e is None for e in errors]
    lens = [-(-len(d) // 4) if ok else 0 for d, ok in zip(payloads, good)]
    buf = b"".join(bytes(d) + bytes(-len(d) % 4) for d, ok in zip(payloads, good) if ok)
    words = np.frombuffer(buf, dtype=">u4").astype(np.uint32)
    ends = np.cumsum(lens).tolist()
    parts = []  # every payload's row symbols, in coding order, payload after payload
    decs = []  # each payload's decoder after its row symbols: the outliers come last

    def rows_read(upto: int) -> np.ndarray:
        """The row symbols ``(upto, n)`` of the first ``upto`` payloads (in coding order)."""
        if not n or not upto:
            return np.zeros((upto, n), dtype=np.int64)
        return np.concatenate(parts).astype(np.int64).reshape(upto, n)

    def outliers(vs: np.ndarray) -> list[np.ndarray]:
        """The outlier codes of the payloads of ``vs`` (the first ones), read in payload
        order (as many as each read escape bins): an error here comes before any of a
        later payload."""
        esc = np.count_nonzero(vs == tops_sorted[:len(vs)], axis=1).tolist()
        us = []
        for b, e in enumerate(esc):
            if not e:
                continue
            try:
                us.append(np.asarray(decs[b].decode(_OUTLIERS, e), dtype=np.int64))
            except Exception as err:
                raise BitstreamError(f"range-coded payload is not a code: {err}") from err
        return us

    decoder = constriction.stream.queue.RangeDecoder
    for b in range(count):
        if not good[b]:
            outliers(rows_read(b))
            raise errors[b]
        mark = len(parts)
        try:
            dec = decoder(words[ends[b] - lens[b]:ends[b]])
            for r, a, z in plan.groups[b]:
                parts.append(dec.decode(models[r], z - a))
        except Exception as e:
            del parts[mark:]
            outliers(rows_read(b))
            raise BitstreamError(f"range-coded payload is not a code: {e}") from e
        decs.append(dec)
    vs = rows_read(count)
    us = outliers(vs)
    v = plan.unpermute(vs)
    sym = off + v
    esc = v == esc_at
    if esc.any():
        u = np.concatenate(us)  # row-major order of the escapes: each payload's in its order
        d = u // 2 + 1
        top, off = np.broadcast_to(top, v.shape)[esc], np.broadcast_to(off, v.shape)[esc]
        sym[esc] = np.where(u % 2 == 1, top + d, off - d)
    return sym


def range_decode(model: nn.Module, data: bytes, indexes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`range_encode`: int32 symbols shaped like ``indexes``.
    BitstreamError for a payload longer than ``arith.range_max_bytes(n, 37)`` bytes, one
    ending in a zero byte, or one the coder finds impossible."""
    sym = range_decode_batch(model, [data], indexes.reshape(1, -1))[0]
    return torch.from_numpy(sym.astype(np.int32)).reshape(indexes.shape)
