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
           "range_encode", "range_decode", "arith_tables", "to_index"]


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
    highest in-support symbols (int64), cached per version of the tables."""
    def build(rows, lengths, offsets):
        models = []
        for row in rows:
            freq = np.diff(np.asarray(row, dtype=np.int64)).astype(np.float64)
            models.append(constriction.stream.model.Categorical(np.ldexp(freq, -16), lazy=True))
        offs = np.asarray(offsets, dtype=np.int64)
        return models, offs, offs + np.asarray(lengths, dtype=np.int64) - 3

    return _per_version(model, "_flowcodec_range", build)


def _row_groups(idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The coding order of a payload: the symbols of each row used, rows ascending, each
    row's symbols in their own order (one coder call per row)."""
    return [(int(r), np.flatnonzero(idx == r)) for r in np.unique(idx)]


def _range_read(models, dec, idx: np.ndarray, top_index: np.ndarray) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    v = np.empty(len(idx), dtype=np.int64)
    for r, at in _row_groups(idx):
        v[at] = dec.decode(models[r], len(at))
    esc = v == top_index
    u = dec.decode(_OUTLIERS, int(esc.sum())) if esc.any() else np.zeros(0, np.int64)
    return v, np.asarray(u, dtype=np.int64)


def _index_of(indexes: torch.Tensor, rows: int) -> np.ndarray:
    idx = indexes.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= rows):
        raise ConfigError(f"CDF indexes must be in 0..{rows - 1}, got {idx.min()}..{idx.max()}")
    return idx


def range_encode(model: nn.Module, symbols: torch.Tensor, indexes: torch.Tensor) -> bytes:
    """Format 2 of :func:`arith_encode`: the same model (CompressAI's 16-bit rows, an
    outlier coded from the escape bin's mass and clamped :data:`ESCAPE_RANGE` beyond the
    support), range-coded (:mod:`flowcodec.codecs.arith`): each row's symbols in one call,
    rows ascending, then the outlier codes. At most one byte above the shortest code of
    the coder's interval; every payload is checked to decode back."""
    models, offs, tops = _range_rows(model)
    idx = _index_of(indexes, len(models))
    sym = symbols.detach().reshape(-1).cpu().long().numpy()
    if len(sym) != len(idx):
        raise ConfigError(f"{len(sym)} symbols but {len(idx)} indexes")
    off, top = offs[idx], tops[idx]
    below, above = sym < off, sym > top
    esc = below | above
    v = np.where(esc, top - off + 1, sym - off)
    d = np.minimum(np.where(below, off - sym, sym - top), ESCAPE_RANGE)
    u = (2 * (d - 1) + above)[esc]
    enc = constriction.stream.queue.RangeEncoder()
    for r, at in _row_groups(idx):
        enc.encode(v[at].astype(np.int32), models[r])
    if len(u):
        enc.encode(u.astype(np.int32), _OUTLIERS)

    def decodes(c: bytes) -> bool:
        try:
            dec = constriction.stream.queue.RangeDecoder(arith.payload_words(c, len(c)))
            gv, gu = _range_read(models, dec, idx, top - off + 1)
        except Exception:  # an invalid point for the coder: not a code of the message
            return False
        return bool(np.array_equal(gv, v) and np.array_equal(gu, u))

    def start() -> int:
        return 0

    return arith.finish(enc, decodes, start)


def range_decode(model: nn.Module, data: bytes, indexes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`range_encode`: int32 symbols shaped like ``indexes``.
    BitstreamError for a payload longer than ``arith.range_max_bytes(n, 37)`` bytes, one
    ending in a zero byte, or one the coder finds impossible."""
    models, offs, tops = _range_rows(model)
    idx = _index_of(indexes, len(models))
    words = arith.payload_words(data, arith.range_max_bytes(len(idx), _RANGE_BITS))
    off, top = offs[idx], tops[idx]
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        v, u = _range_read(models, dec, idx, top - off + 1)
    except Exception as e:
        raise BitstreamError(f"range-coded payload is not a code: {e}") from e
    sym = off + v
    esc = np.flatnonzero(v == top - off + 1)
    d = u // 2 + 1
    sym[esc] = np.where(u % 2 == 1, top[esc] + d, off[esc] - d)
    return torch.from_numpy(sym.astype(np.int32)).reshape(indexes.shape)
