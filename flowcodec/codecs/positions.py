"""Which tokens were sent: a set of positions as a short, self-delimiting code.

:func:`encode_positions` codes ``k`` distinct positions among ``n`` in
``bit_length(n) + bit_length(C(n, k) - 1)`` bits (the count, then the set's rank), packed
into whole bytes by :func:`pack_bits`. :func:`encode_positions_batch` and
:func:`decode_positions_batch` do the same for a batch of sets, byte for byte, with the
arithmetic in numpy (:func:`encode_positions_mask` for sets given as the rows of a mask).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from flowcodec.bitstream import BitstreamError
from flowcodec.errors import ConfigError

__all__ = ["MAX_TOKENS", "pack_bits", "unpack_bits", "position_bits", "encode_positions",
           "decode_positions", "encode_positions_batch", "decode_positions_batch",
           "encode_positions_mask"]


#: Largest token count a token codec takes (bounds every position code).
MAX_TOKENS = 1 << 14


def pack_bits(value: int, total: int) -> bytes:
    """A ``total``-bit non-negative ``value``, big-endian, zero-padded to whole bytes."""
    nbytes = -(-total // 8)
    return (value << (8 * nbytes - total)).to_bytes(nbytes, "big")


def unpack_bits(data: bytes, total: int, what: str) -> int:
    """Inverse of :func:`pack_bits` on the first bytes of ``data``; BitstreamError naming
    ``what`` when ``data`` is too short or the padding bits are not zero."""
    nbytes = -(-total // 8)
    if len(data) < nbytes:
        raise BitstreamError(f"{what} needs {nbytes} bytes, got {len(data)}")
    word = int.from_bytes(data[:nbytes], "big")
    pad = 8 * nbytes - total
    if word & ((1 << pad) - 1):
        raise BitstreamError(f"{what} has nonzero padding bits")
    return word >> pad


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_TOKENS:
        raise ConfigError(f"position range n must be in 1..{MAX_TOKENS}, got {n}")


def _count_bits(n: int) -> int:
    return n.bit_length()  # k in 0..n


def position_bits(k: int, n: int) -> int:
    """Bits of the position code of ``k`` kept positions among ``n`` (before byte padding)."""
    return _count_bits(n) + (math.comb(n, k) - 1).bit_length()


def encode_positions(positions: Sequence[int], n: int) -> bytes:
    """Code a set of distinct positions in ``0..n-1`` as bytes.

    The count ``k`` takes ``bit_length(n)`` bits, then the set's rank among the
    ``C(n, k)`` sets of that size (combinatorial number system) takes
    ``bit_length(C(n, k) - 1)`` bits, packed big-endian into whole bytes. The code is
    self-delimiting: :func:`decode_positions` returns how many bytes it used.
    """
    _check_n(n)
    pos = sorted(int(p) for p in positions)
    if len(set(pos)) != len(pos) or (pos and (pos[0] < 0 or pos[-1] >= n)):
        raise ConfigError(f"positions must be distinct values in 0..{n - 1}, got {positions}")
    k = len(pos)
    rank = sum(math.comb(p, j + 1) for j, p in enumerate(pos))
    rb = (math.comb(n, k) - 1).bit_length()
    return pack_bits((k << rb) | rank, _count_bits(n) + rb)


def decode_positions(data: bytes, n: int) -> tuple[list[int], int]:
    """Inverse of :func:`encode_positions`: ``(sorted positions, bytes used)``.

    Raises :class:`BitstreamError` when ``data`` is too short, holds a count above ``n``
    or a rank outside ``0..C(n, k) - 1``, or its padding bits are not zero (so every set
    has exactly one code).
    """
    _check_n(n)
    kb = _count_bits(n)
    head = -(-kb // 8)
    if len(data) < head:
        raise BitstreamError(f"position code needs {head} bytes, got {len(data)}")
    k = int.from_bytes(data[:head], "big") >> (8 * head - kb)
    if k > n:
        raise BitstreamError(f"position code says {k} tokens of {n}")
    rb = (math.comb(n, k) - 1).bit_length()
    total = kb + rb
    nbytes = -(-total // 8)
    rank = unpack_bits(data, total, "position code") & ((1 << rb) - 1)
    if rank >= math.comb(n, k):
        raise BitstreamError(f"position rank {rank} is out of range for {k} of {n}")
    out = []
    c = n
    for j in range(k, 0, -1):  # largest c with C(c, j) <= rank, then the next from below
        c -= 1
        while math.comb(c, j) > rank:
            c -= 1
        out.append(c)
        rank -= math.comb(c, j)
    return out[::-1], nbytes


# --- batches ---------------------------------------------------------------------------------
#: The batch forms do the arithmetic in numpy for ``n`` up to this (a ``(n + 1)^2`` table of
#: binomials) and sets whose rank fits 63 bits; other sets go through the per-sample code.
_FAST_N = 512
_FAST_RANK_BITS = 63
_SAT = np.uint64(2**64 - 1)


@functools.lru_cache(maxsize=16)
def _comb_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(C, rb)``: ``C[c, j] = C(c, j)`` for ``c, j`` in ``0..n`` as uint64, saturated at
    ``2^64 - 1`` (only values below ``2^63`` are ever used as exact), and ``rb[k]`` the rank
    bits ``bit_length(C(n, k) - 1)`` for ``k`` in ``0..n``."""
    table = np.zeros((n + 1, n + 1), dtype=np.uint64)
    table[:, 0] = 1
    for c in range(1, n + 1):  # Pascal's rule, saturating
        a, b = table[c - 1, :-1], table[c - 1, 1:]
        s = a + b
        table[c, 1:] = np.where(s < a, _SAT, s)
    table.flags.writeable = False
    rb = np.array([(math.comb(n, k) - 1).bit_length() for k in range(n + 1)], dtype=np.int64)
    rb.flags.writeable = False
    return table, rb


def _ragged(seqs) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(flat int64 values, lengths)`` of a sequence of integer sequences, or
    ``(None, None)`` when they are not plain integers (the caller then takes the
    per-sample path, which decides what they mean)."""
    try:
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    except TypeError:
        return None, None
    if lens.sum() == 0:
        return np.zeros(0, dtype=np.int64), lens
    if all(isinstance(s, np.ndarray) and s.ndim == 1 for s in seqs):
        flat = np.concatenate(seqs)
    else:
        try:
            flat = np.array(list(itertools.chain.from_iterable(seqs)))
        except (TypeError, ValueError, OverflowError):
            return None, None
    if flat.ndim != 1 or flat.dtype.kind not in "iub" or len(flat) != lens.sum():
        return None, None
    if flat.dtype == np.uint64 and flat.size and flat.max() > np.iinfo(np.int64).max:
        return None, None
    return flat.astype(np.int64, copy=False), lens


def _padded(flat: np.ndarray, lens: np.ndarray, fill: int) -> np.ndarray:
    """The ragged rows ``flat`` / ``lens`` as a ``(B, max len)`` matrix padded with
    ``fill``."""
    width = int(lens.max()) if len(lens) else 0
    out = np.full((len(lens), width), fill, dtype=np.int64)
    if flat.size:
        rows = np.repeat(np.arange(len(lens)), lens)
        starts = np.cumsum(lens) - lens
        out[rows, np.arange(flat.size) - np.repeat(starts, lens)] = flat
    return out


def _window(datas: Sequence, starts, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes (B, width) uint8, bytes available (B,))``: the first ``width`` bytes of each
    ``data[start:]``, zero-padded."""
    if starts is None:
        starts = itertools.repeat(0)
    chunks, avail = [], []
    for d, s in zip(datas, starts):
        piece = bytes(d[s:s + width])
        chunks.append(piece.ljust(width, b"\0"))
        avail.append(len(d) - s)
    mat = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(len(chunks), width)
    return mat, np.array(avail, dtype=np.int64)


def encode_positions_batch(positions: Sequence[Sequence[int]], n: int) -> list[bytes]:
    """:func:`encode_positions` of every set in ``positions`` (all in ``0..n-1``): the
    same bytes, with the ranks computed in numpy for the whole batch. Raises what
    :func:`encode_positions` raises for the first set it refuses."""
    _check_n(n)
    count = len(positions)
    flat, lens = _ragged(positions) if n <= _FAST_N else (None, None)
    if flat is None:
        return [encode_positions(p, n) for p in positions]
    if count == 0:
        return []
    table, rbt = _comb_table(n)
    kb = _count_bits(n)
    pos = np.sort(_padded(flat, lens, n), axis=1)  # padding n sorts last
    width = pos.shape[1]
    col = np.arange(width)
    real = col[None, :] < lens[:, None]
    bad = lens > n
    if width:
        bad |= (pos[:, 0] < 0) & (lens > 0)
        bad |= pos[np.arange(count), np.maximum(lens - 1, 0)] >= n
        bad |= ((pos[:, 1:] == pos[:, :-1]) & real[:, 1:]).any(1)
    k = np.where(bad, 0, lens)
    rb = rbt[k]
    slow = bad | (rb > _FAST_RANK_BITS)
    ok = real & ~slow[:, None]
    terms = table[np.where(ok, pos, 0), np.where(ok, col[None, :] + 1, 0)]
    rank = np.where(ok, terms, np.uint64(0)).sum(1, dtype=np.uint64)
    out = _pack_codes(kb, k, rb, rank)
    for i in np.flatnonzero(slow).tolist():  # in order: the first refused set raises
        out[i] = encode_positions(positions[i], n)
    return out


def _pack_codes(kb: int, k: np.ndarray, rb: np.ndarray, rank: np.ndarray) -> list[bytes]:
    """The codes ``k`` in ``kb`` bits, then ``rank`` (uint64) in ``rb <= 63`` bits, then
    zero padding to whole bytes, one per row."""
    count = len(k)
    total = kb + rb
    nbytes = -(-total // 8)
    wbytes = -(-(kb + _FAST_RANK_BITS) // 8)
    bits = np.zeros((count, 8 * wbytes), dtype=np.uint8)
    bits[:, :kb] = (k[:, None] >> np.arange(kb - 1, -1, -1)[None, :]) & 1
    shift = rb[:, None] - 1 - np.arange(_FAST_RANK_BITS)[None, :]
    rbits = (rank[:, None] >> np.maximum(shift, 0).astype(np.uint64)) & np.uint64(1)
    bits[:, kb:kb + _FAST_RANK_BITS] = np.where(shift >= 0, rbits, 0)
    raw = np.packbits(bits, axis=1).tobytes()
    return [raw[i * wbytes:i * wbytes + nb] for i, nb in enumerate(nbytes.tolist())]


def encode_positions_mask(mask) -> list[bytes]:
    """:func:`encode_positions` of each row's set ``np.flatnonzero(mask[b])`` of a boolean
    ``mask`` ``(B, n)`` (``n`` its width): the bytes of :func:`encode_positions_batch`
    without building the sets, the ranks summed over the mask in numpy. Rows outside the
    numpy path (``n`` above :data:`_FAST_N`, ranks above 63 bits) go through
    :func:`encode_positions`."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ConfigError(f"mask must be a 2-d bool array, got {mask.dtype} {mask.shape}")
    count, n = mask.shape
    _check_n(n)
    if n > _FAST_N:
        return [encode_positions(np.flatnonzero(row), n) for row in mask]
    if count == 0:
        return []
    table, rbt = _comb_table(n)
    k = mask.sum(1)
    rb = rbt[k]
    slow = rb > _FAST_RANK_BITS
    ok = mask & ~slow[:, None]
    # the j-th kept position p (j from 1) adds C(p, j)
    j = np.cumsum(mask, axis=1)
    terms = table[np.where(ok, np.arange(n)[None, :], 0), np.where(ok, j, 0)]
    rank = np.where(ok, terms, np.uint64(0)).sum(1, dtype=np.uint64)
    out = _pack_codes(_count_bits(n), k, rb, rank)
    for i in np.flatnonzero(slow).tolist():
        out[i] = encode_positions(np.flatnonzero(mask[i]), n)
    return out


def _unrank_rows(rank: np.ndarray, count: np.ndarray, by_j: np.ndarray) -> np.ndarray:
    """Row ``i``'s first ``count[i]`` columns: the increasing values ``c_1 < c_2 < ...``
    whose combinatorial rank ``sum_j C(c_j, j)`` is ``rank[i]`` (uint64, consumed), given
    ``by_j[j, c] = C(c, j)`` as uint64, nondecreasing in ``c``; later columns are
    meaningless. The rows are unranked together, from the largest value down."""
    width = int(count.max()) if len(count) else 0
    # rank 0 leaves j values 0..j-1: start from that, and unrank while any rank is left
    out = np.broadcast_to(np.arange(width), (len(rank), width)).copy()
    rows = np.arange(len(rank))
    for step in range(width):
        j = count - step
        live = (j > 0) & (rank > 0)
        if not live.any():
            break
        r, jl, rk = rows[live], j[live], rank[live]
        c = (by_j[jl] <= rk[:, None]).sum(1) - 1  # the largest c with C(c, j) <= rank
        out[r, jl - 1] = c
        rank[r] = rk - by_j[jl, c]
    return out


def decode_positions_batch(datas: Sequence[bytes], n: int,
                           start: Sequence[int] | None = None
                           ) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """:func:`decode_positions` of every ``data[start:]`` in ``datas`` (``start`` 0 when not
    given): ``(sorted positions per item, bytes used per item)``, the same as the per-sample
    calls, with the rank arithmetic in numpy for the whole batch. Raises what
    :func:`decode_positions` raises for the first item it refuses (BitstreamError)."""
    _check_n(n)
    count = len(datas)
    starts = None if start is None else [int(s) for s in start]
    if n > _FAST_N:
        got = [decode_positions(d if starts is None else d[s:], n)
               for d, s in zip(datas, starts or itertools.repeat(0))]  # fmt: skip
        return [g[0] for g in got], [g[1] for g in got]
    if count == 0:
        return [], []
    table, rbt = _comb_table(n)
    kb = _count_bits(n)
    head = -(-kb // 8)
    wbytes = -(-(kb + _FAST_RANK_BITS) // 8)
    mat, avail = _window(datas, starts, wbytes)
    bits = np.unpackbits(mat, axis=1)
    k = (bits[:, :kb].astype(np.int64) << np.arange(kb - 1, -1, -1)[None, :]).sum(1)
    bad = (avail < head) | (k > n)
    k = np.where(bad, 0, k)
    rb = rbt[k]
    slow = bad | (rb > _FAST_RANK_BITS)
    total = kb + rb
    nbytes = -(-total // 8)
    col = np.arange(8 * wbytes)[None, :]
    pad = (col >= total[:, None]) & (col < 8 * nbytes[:, None])
    bad |= (avail < nbytes) | (bits.astype(bool) & pad).any(1)
    shift = rb[:, None] - 1 - np.arange(_FAST_RANK_BITS)[None, :]
    rbits = bits[:, kb:kb + _FAST_RANK_BITS].astype(np.uint64)
    rank = np.where(shift >= 0, rbits << np.maximum(shift, 0).astype(np.uint64),
                    np.uint64(0)).sum(1, dtype=np.uint64)  # fmt: skip
    bad |= rank >= table[n, k]
    slow |= bad
    good = np.flatnonzero(~slow)
    kg = k[good]
    pos = _unrank_rows(rank[good], kg, np.ascontiguousarray(table[:n].T))
    members = [None] * count
    used = nbytes.tolist()
    for i, row, kk in zip(good.tolist(), pos.tolist(), kg.tolist()):
        members[i] = row[:kk]
    for i in np.flatnonzero(slow).tolist():  # in order: the first refused item raises
        d = datas[i] if starts is None else datas[i][starts[i]:]
        members[i], used[i] = decode_positions(d, n)
    return members, used
