"""The token-merge codec's side codes: which cluster each sent position joins
(:func:`encode_assignment`, canonical labels in a mixed radix) and, with
``order="sizes"``, the clusters' sizes (:func:`encode_sizes`).
:func:`encode_assignment_batch` and :func:`decode_assignment_batch` code a batch of
assignments, and :func:`encode_sizes_batch` and :func:`decode_sizes_batch` a batch of
sizes, byte for byte as the per-sample functions, with the arithmetic in numpy."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs.positions import (
    _FAST_N,
    MAX_TOKENS,
    _comb_table,
    _padded,
    _ragged,
    _unrank_rows,
    pack_bits,
    unpack_bits,
)
from flowcodec.errors import ConfigError

__all__ = ["encode_assignment", "decode_assignment", "assignment_bits", "encode_sizes",
           "decode_sizes", "size_bits", "encode_assignment_batch", "decode_assignment_batch",
           "encode_sizes_batch", "decode_sizes_batch"]


def _radix_bound(m: int, k: int) -> int:
    """Largest product of radices over ``m`` labels with ``k`` clusters: prod min(t+1, k)."""
    if k <= 1:
        return 1
    return math.factorial(min(m, k)) * k ** max(0, m - k)


def assignment_bits(m: int, k: int) -> int:
    """Bits of the assignment code of ``m`` members to ``k`` clusters (before padding)."""
    return (_radix_bound(m, k) - 1).bit_length()


def _check_mk(m: int, k: int) -> None:
    if not 1 <= k <= m <= MAX_TOKENS:
        raise ConfigError(f"assignment of m members to k clusters needs 1 <= k <= m <= "
                          f"{MAX_TOKENS}, got m={m}, k={k}")  # fmt: skip


def encode_assignment(labels: Sequence[int], k: int) -> bytes:
    """Code a canonical assignment of ``m = len(labels)`` members to ``k`` clusters.

    ``labels`` must be a restricted growth string: clusters numbered by first appearance
    (``labels[0] == 0``, each label at most one above the largest before it) using every
    label ``0..k-1``. Member ``t`` can then only take ``r_t = min(opened + 1, k)`` values
    (``opened``: clusters seen before it), so the labels are one mixed-radix integer
    ``sum_t label_t * prod_{s<t} r_s``, written big-endian in
    ``bit_length(prod_t min(t + 1, k) - 1)`` bits and zero-padded to whole bytes. That is
    ``log2(k!) + (m - k) log2(k)`` bits at most, against ``m * ceil(log2 k)`` for plain
    fixed-width labels. ``(m, k)`` are known to the decoder, so the code is
    self-delimiting.
    """
    labels = [int(v) for v in labels]
    m = len(labels)
    _check_mk(m, k)
    value, mult, opened = 0, 1, 0
    for t, v in enumerate(labels):
        r = min(opened + 1, k)
        if not 0 <= v < r:
            raise ConfigError(f"labels must be a restricted growth string over {k} clusters; "
                              f"label {v} at member {t} (allowed 0..{r - 1})")  # fmt: skip
        value += v * mult
        mult *= r
        opened += v == opened
    if opened != k:
        raise ConfigError(f"labels use {opened} clusters, not {k}")
    return pack_bits(value, assignment_bits(m, k))


def decode_assignment(data: bytes, m: int, k: int) -> tuple[list[int], int]:
    """Inverse of :func:`encode_assignment`: ``(labels, bytes used)``.

    Raises :class:`BitstreamError` when ``data`` is too short, its padding bits are not
    zero, the value does not fit the radices its own labels imply, or it uses fewer than
    ``k`` clusters (so every assignment has exactly one code).
    """
    _check_mk(m, k)
    total = assignment_bits(m, k)
    nbytes = -(-total // 8)
    value = unpack_bits(data, total, "assignment code")
    labels, opened = [], 0
    for _ in range(m):
        r = min(opened + 1, k)
        value, v = divmod(value, r)
        labels.append(v)
        opened += v == opened
    if value:
        raise BitstreamError("assignment code is out of range for its labels")
    if opened != k:
        raise BitstreamError(f"assignment code uses {opened} clusters, not {k}")
    return labels, nbytes


# --- batches ---------------------------------------------------------------------------------
#: The batch forms do the arithmetic in numpy (32-bit limbs) for codes up to this many bits;
#: longer ones go through the per-sample code.
_FAST_BITS = 1024
_LIMB = 32
_MASK = np.uint64((1 << _LIMB) - 1)


@functools.lru_cache(maxsize=4096)
def _bits(m: int, k: int) -> int:
    return assignment_bits(m, k)


def _per_item(values, count: int) -> list | None:
    """``values`` (one int or one per item) as ``count`` Python ints, or None when one is not
    an integer (the per-sample path then decides)."""
    if isinstance(values, numbers.Integral):
        return [int(values)] * count
    values = list(values)
    if len(values) != count:
        raise ConfigError(f"expected {count} values (one per item), got {len(values)}")
    if not all(isinstance(v, numbers.Integral) for v in values):
        return None
    return [int(v) for v in values]


def _fast_rows(ms: list[int], ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows the numpy path takes, their code bits)``: valid ``(m, k)`` whose code has at
    most :data:`_FAST_BITS` bits."""
    bits = np.array([_bits(m, k) if 1 <= k <= m <= MAX_TOKENS else -1
                     for m, k in zip(ms, ks)], dtype=np.int64)  # fmt: skip
    fast = (bits >= 0) & (bits <= _FAST_BITS)
    return fast, bits


def _to_bytes(limbs: np.ndarray, nbytes: np.ndarray) -> list[bytes]:
    """Little-endian 32-bit limbs ``(B, L)`` -> each row's low ``nbytes`` bytes, big-endian."""
    width = 4 * limbs.shape[1]
    raw = limbs[:, ::-1].astype(">u4").tobytes()
    return [raw[(i + 1) * width - nb:(i + 1) * width] for i, nb in enumerate(nbytes.tolist())]


def encode_assignment_batch(labels: Sequence[Sequence[int]],
                            k: int | Sequence[int]) -> list[bytes]:  # fmt: skip
    """:func:`encode_assignment` of every label string in ``labels`` (``k``: one cluster
    count for all, or one per string): the same bytes, with the mixed-radix arithmetic in
    numpy for the whole batch. Raises what :func:`encode_assignment` raises for the first
    string it refuses."""
    count = len(labels)
    ks = _per_item(k, count)
    flat, lens = _ragged(labels) if ks is not None else (None, None)
    if flat is None:
        kk = ks if ks is not None else list(k)
        return [encode_assignment(v, q) for v, q in zip(labels, kk)]
    if count == 0:
        return []
    ms = lens.tolist()
    fast, bits = _fast_rows(ms, ks)
    karr = np.array(ks, dtype=np.int64)
    lab = _padded(flat, lens, 0)
    width = lab.shape[1]
    real = np.arange(width)[None, :] < lens[:, None]
    # clusters opened before each member (a valid string numbers them by first appearance)
    seen = np.maximum.accumulate(np.where(real, lab, -1), axis=1)
    opened = np.concatenate([np.zeros((count, 1), np.int64), seen[:, :-1] + 1], axis=1)
    radix = np.where(real, np.minimum(opened + 1, karr[:, None]), 1)
    bad = ((lab < 0) | (lab >= radix)).any(1) | (seen[:, -1] + 1 != karr)
    fast &= ~bad
    rows = np.flatnonzero(fast)
    out: list = [None] * count
    if len(rows):
        out_rows = _encode_limbs(lab[rows], radix[rows], karr[rows], bits[rows])
        for i, data in zip(rows.tolist(), out_rows):
            out[i] = data
    for i in np.flatnonzero(~fast).tolist():  # in order: the first refused string raises
        out[i] = encode_assignment(labels[i], ks[i])
    return out


def _encode_limbs(lab: np.ndarray, radix: np.ndarray, karr: np.ndarray,
                  bits: np.ndarray) -> list[bytes]:  # fmt: skip
    """The codes of valid label strings ``lab`` ``(B, width)`` with radices ``radix``
    (1 past each string's end): ``sum_t lab_t prod_{s<t} r_s``, shifted left by the
    padding, as big-endian bytes."""
    count, width = lab.shape
    nbytes = -(-bits // 8)
    limbs = max(1, -(-int(8 * nbytes.max()) // _LIMB))
    # chunks of members whose radices (at most min(t + 1, k)) multiply to at most 2^32:
    # within a chunk the digit and the radix product fit uint64 exactly
    kmax = int(karr.max())
    bounds, prod, start = [], 1, 0
    for t in range(width):
        r = min(t + 1, kmax)
        if prod * r > 1 << _LIMB:
            bounds.append((start, t))
            start, prod = t, 1
        prod *= r
    bounds.append((start, width))
    lab, radix = lab.astype(np.uint64), radix.astype(np.uint64)
    value = np.zeros((count, limbs), dtype=np.uint64)
    bound = 1  # value < bound: the limbs that can be nonzero
    steps = [(a, b) for a, b in bounds if b > a][::-1]
    pad = (8 * nbytes - bits).astype(np.uint64)
    for a, b in steps + [(None, None)]:  # Horner from the last chunk: value = value * R + D
        if a is None:  # then the padding: value << pad
            mult, digit = np.uint64(1) << pad, np.zeros(count, np.uint64)
        else:
            cum = np.cumprod(radix[:, a:b], axis=1)
            mult = cum[:, -1]
            digit = lab[:, a] + (lab[:, a + 1:b] * cum[:, :-1]).sum(1, dtype=np.uint64)
        bound *= int(mult.max())
        _multiply_add(value.T, min(limbs, -(-bound.bit_length() // _LIMB)), mult, digit)
    return _to_bytes(value, nbytes)


def decode_assignment_batch(datas: Sequence[bytes], m: int | Sequence[int],
                            k: int | Sequence[int], start: Sequence[int] | None = None
                            ) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """:func:`decode_assignment` of every ``data[start:]`` in ``datas`` (``start`` 0 when
    not given; ``m`` and ``k`` one for all or one per item): ``(labels per item, bytes used
    per item)``, the same as the per-sample calls, with the mixed-radix arithmetic in numpy
    for the whole batch. Raises what :func:`decode_assignment` raises for the first item it
    refuses."""
    count = len(datas)
    ms, ks = _per_item(m, count), _per_item(k, count)
    starts = [0] * count if start is None else [int(s) for s in start]
    if len(starts) != count:
        raise ConfigError(f"expected {count} starts (one per item), got {len(starts)}")
    if ms is None or ks is None:
        mm = ms if ms is not None else list(m)
        kk = ks if ks is not None else list(k)
        got = [decode_assignment(d[s:], a, b) for d, s, a, b in zip(datas, starts, mm, kk)]
        return [g[0] for g in got], [g[1] for g in got]
    if count == 0:
        return [], []
    fast, bits = _fast_rows(ms, ks)
    nbytes = -(-bits // 8)
    avail = np.array([len(d) - s for d, s in zip(datas, starts)], dtype=np.int64)
    fast &= avail >= nbytes
    rows = np.flatnonzero(fast)
    labels: list = [None] * count
    used = np.maximum(nbytes, 0).tolist()
    if len(rows):
        good, got = _decode_limbs([datas[i] for i in rows], [starts[i] for i in rows],
                                  np.array(ms)[rows], np.array(ks)[rows], bits[rows])
        for i, ok, lab in zip(rows.tolist(), good.tolist(), got):
            labels[i] = lab
            fast[i] = ok
    for i in np.flatnonzero(~fast).tolist():  # in order: the first refused item raises
        labels[i], used[i] = decode_assignment(datas[i][starts[i]:], ms[i], ks[i])
    return labels, used


@functools.lru_cache(maxsize=1)
def _block_lengths(kmax: int) -> np.ndarray:
    """``c[r]``: the most members with radix ``r`` whose product fits 32 bits (``r`` in
    ``0..kmax``; huge for ``r <= 1``)."""
    out = np.full(kmax + 1, 1 << 40, dtype=np.int64)
    for r in range(2, kmax + 1):
        c = 1
        while r ** (c + 1) <= 1 << _LIMB:
            c += 1
        out[r] = c
    return out


def _multiply_add(value: np.ndarray, top: int, mult: np.ndarray, add: np.ndarray) -> None:
    """``value = value * mult + add`` in place on limb-major limbs ``(L, B)`` (the first
    ``top`` of them can be nonzero, and so can the result's); ``mult <= 2^32``,
    ``add < 2^32``."""
    carry = add
    for j in range(top):
        x = value[j] * mult + carry
        value[j] = x & _MASK
        carry = x >> np.uint64(_LIMB)


def _decode_limbs(datas: list, starts: list, ms: np.ndarray, ks: np.ndarray,
                  bits: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:  # fmt: skip
    """``(valid (B,), labels)`` of codes of ``bits`` bits (each long enough): the padding
    must be zero, the value must fit the radices its labels imply and use all ``k``
    clusters (else not valid).

    The labels come out in blocks: with ``o`` clusters open every next member has radix
    ``r = min(o + 1, k)`` until one opens cluster ``o``, so one long division by ``r^c``
    (at most ``2^32``) gives the next ``c`` labels as base-``r`` digits. They hold up to
    and including the first that opens a cluster; the rest are put back (``value = q *
    r^(c - a) + rem // r^a`` for ``a`` labels kept).
    """
    count = len(datas)
    nbytes = -(-bits // 8)
    limbs = max(1, -(-int(8 * nbytes.max()) // _LIMB))
    width = 4 * limbs
    buf = b"".join(bytes(width - nb) + bytes(d[s:s + nb])
                   for d, s, nb in zip(datas, starts, nbytes.tolist()))  # fmt: skip
    # limb-major (limbs, B), least significant limb first
    value = np.frombuffer(buf, dtype=">u4").reshape(count, limbs).T[::-1].astype(np.uint64)
    pad = (8 * nbytes - bits).astype(np.uint64)
    good = (value[0] & ((np.uint64(1) << pad) - np.uint64(1))) == 0
    high = np.concatenate([value[1:], np.zeros((1, count), np.uint64)])
    value = (value >> pad) | ((high << (np.uint64(_LIMB) - pad)) & _MASK)  # value >> pad
    mmax = int(ms.max())
    lab = np.zeros((count, mmax + 1), dtype=np.int64)  # the last column takes no label
    blocks = _block_lengths(int(ks.max()))
    wmax = int(blocks[2]) if len(blocks) > 2 else 1
    # member 0 has radix 1: label 0, which opens cluster 0
    t = np.ones(count, dtype=np.int64)
    opened = np.ones(count, dtype=np.int64)
    rem, cur = np.empty(count, np.uint64), np.empty(count, np.uint64)
    top = limbs
    while True:
        left = ms - t
        if not (left > 0).any():
            break
        while top > 1 and not value[top - 1].any():
            top -= 1
        r = np.minimum(opened + 1, ks)
        c = np.minimum(blocks[r], left)  # 0 for a finished string
        ru = r.astype(np.uint64)
        rem.fill(0)
        divisor = ru ** c.astype(np.uint64)
        for j in range(top - 1, -1, -1):  # value //= r^c, from the top limb
            np.left_shift(rem, np.uint64(_LIMB), out=cur)
            np.bitwise_or(cur, value[j], out=cur)
            np.divmod(cur, divisor, out=(value[j], rem))
        w = min(int(c.max()), wmax)
        i = np.arange(w)[None, :]
        inside = i < c[:, None]
        powers = ru[:, None] ** np.minimum(i, c[:, None]).astype(np.uint64)
        digits = ((rem[:, None] // powers) % ru[:, None]).astype(np.int64)
        opens = inside & (digits == opened[:, None]) & (opened < ks)[:, None]
        hit = opens.any(1)
        keep = np.where(hit, opens.argmax(1) + 1, c)
        np.put_along_axis(lab, np.where(i < keep[:, None], t[:, None] + i, mmax), digits, 1)
        back = keep < c
        if back.any():
            _multiply_add(value, top, np.where(back, ru ** (c - keep).astype(np.uint64), 1),
                          np.where(back, rem // ru ** keep.astype(np.uint64), 0))
        t += keep
        opened += hit
    good &= ~value.any(0) & (opened == ks)
    return good, [row[:mm] for row, mm in zip(lab.tolist(), ms.tolist())]


def size_bits(m: int, k: int, n: int | None = None) -> int:
    """Bits of the size code of ``k`` cluster sizes summing to ``m`` (before padding);
    with ``n`` the total ``m`` is written too (``bit_length(n)`` bits)."""
    return (0 if n is None else n.bit_length()) + (math.comb(m - 1, k - 1) - 1).bit_length()


def encode_sizes(sizes: Sequence[int], n: int | None = None) -> bytes:
    """Code ``k = len(sizes)`` positive cluster sizes (their order kept) as bytes.

    The sizes are a composition of ``m = sum(sizes)`` into ``k`` parts, that is the
    ``k - 1`` cut points ``s_1, s_1 + s_2, ...`` in ``1..m-1``; their rank among the
    ``C(m - 1, k - 1)`` such sets (combinatorial number system) takes
    ``bit_length(C(m - 1, k - 1) - 1)`` bits. The decoder knows ``k``. With ``n`` (an
    upper bound it also knows), ``m`` is written first in ``bit_length(n)`` bits; without
    it the decoder must know ``m``. Big-endian, zero-padded to whole bytes. For example 7
    sizes summing to 64 take 27 bits (4 bytes), where the assignment of 64 positions to 7
    clusters takes 173 bits.
    """
    sizes = [int(v) for v in sizes]
    k, m = len(sizes), sum(sizes)
    if k < 1 or min(sizes) < 1:
        raise ConfigError(f"sizes must be one or more positive ints, got {sizes}")
    if n is not None and not m <= n <= MAX_TOKENS:
        raise ConfigError(f"sizes sum to {m}, above their bound {n}")
    cuts = [sum(sizes[: j + 1]) - 1 for j in range(k - 1)]  # distinct, in 0..m-2
    rank = sum(math.comb(c, j + 1) for j, c in enumerate(cuts))
    rb = (math.comb(m - 1, k - 1) - 1).bit_length()
    value = rank if n is None else (m << rb) | rank
    return pack_bits(value, size_bits(m, k, n))


def decode_sizes(data: bytes, k: int, m: int | None = None,
                 n: int | None = None) -> tuple[list[int], int]:  # fmt: skip
    """Inverse of :func:`encode_sizes`: ``(sizes, bytes used)``. Give the total ``m``
    when it was not written, else its bound ``n``. Raises :class:`BitstreamError` for a
    short code, nonzero padding, a total below ``k`` or above ``n``, or a rank out of
    range (so every composition has exactly one code)."""
    if (m is None) == (n is None):
        raise ConfigError("decode_sizes needs exactly one of m (the total) and n (its bound)")
    if not 1 <= k <= MAX_TOKENS:
        raise ConfigError(f"k must be in 1..{MAX_TOKENS}, got {k}")
    if m is None:
        nb = n.bit_length()
        head = -(-nb // 8)
        if len(data) < head:
            raise BitstreamError(f"size code needs {head} bytes, got {len(data)}")
        m = int.from_bytes(data[:head], "big") >> (8 * head - nb)
        if not k <= m <= n:
            raise BitstreamError(f"size code says {m} tokens in {k} clusters (at most {n})")
    elif not k <= m <= MAX_TOKENS:
        raise ConfigError(f"{k} clusters cannot hold {m} tokens")
    total = size_bits(m, k, n)
    rb = (math.comb(m - 1, k - 1) - 1).bit_length()
    rank = unpack_bits(data, total, "size code") & ((1 << rb) - 1)
    if rank >= math.comb(m - 1, k - 1):
        raise BitstreamError(f"size rank {rank} is out of range for {k} clusters of {m}")
    cuts, c = [], m - 1
    for j in range(k - 1, 0, -1):  # the largest c with C(c, j) <= rank, from above
        c -= 1
        while math.comb(c, j) > rank:
            c -= 1
        cuts.append(c + 1)
        rank -= math.comb(c, j)
    ends = cuts[::-1] + [m]
    return [e - b for b, e in zip([0] + ends[:-1], ends)], -(-total // 8)



# --- sizes, batches --------------------------------------------------------------------------
#: The sizes' batch forms do the arithmetic in numpy for totals up to ``_FAST_N + 1`` (the
#: cuts are positions among ``m - 1``) and codes of at most 64 bits; other items go through
#: the per-sample code.
_WORD = 64
#: Batches of fewer items than this go through the per-sample code, which is faster there
#: (the numpy path costs a fixed ~0.1-0.3 ms, the per-sample code ~5 us an item).
_BATCH_MIN = 32
_POW2 = np.uint64(1) << np.arange(_WORD, dtype=np.uint64)
_ONE = np.uint64(1)
_EXACT = np.uint64(1 << 63)  # the binomial table's values up to this are exact


def _rank_bits(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bit_length(count - 1), exact)`` of binomials ``count >= 1`` from the saturated
    table; where not exact (above ``2^63``) the bits are meaningless and the item goes
    through the per-sample code."""
    exact = count <= _EXACT
    rb = np.searchsorted(_POW2, np.where(exact, count - _ONE, 0), side="right")
    return rb.astype(np.int64), exact


def _size_table(top: int) -> np.ndarray:
    """Binomials ``C(c, j)`` for ``c, j`` in ``0..top`` (``top`` at most :data:`_FAST_N`),
    uint64, saturated."""
    return _comb_table(max(1, top))[0]


def _shl(value: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``value << shift`` for shifts in ``0..64`` (64 gives 0)."""
    big = shift >= _WORD
    return np.where(big, np.uint64(0), value << np.where(big, 0, shift).astype(np.uint64))


def encode_sizes_batch(sizes: Sequence[Sequence[int]], n: int | None = None) -> list[bytes]:
    """:func:`encode_sizes` of every size list in ``sizes`` (``n``: the one bound of all, or
    None; a 2-d integer array is one list per row): the same bytes, with the ranks computed
    in numpy for the whole batch. Lists outside the numpy path (totals above ``_FAST_N + 1`` of
    :mod:`~flowcodec.codecs.positions`, codes above 64 bits, values that are not plain
    integers), batches of fewer than ``_BATCH_MIN`` lists and the lists it refuses go
    through :func:`encode_sizes`, so it raises what that raises for the first list it
    refuses."""
    count = len(sizes)
    if isinstance(sizes, np.ndarray) and sizes.ndim == 2 and sizes.dtype.kind == "i":
        flat, lens = sizes.astype(np.int64).ravel(), np.full(count, sizes.shape[1], np.int64)
    else:
        flat, lens = _ragged(sizes)
    if (flat is None or count < _BATCH_MIN
            or (n is not None and not isinstance(n, numbers.Integral))):  # fmt: skip
        return [encode_sizes(s, n) for s in sizes]
    if count == 0:
        return []
    val = _padded(flat, lens, 1)
    width = val.shape[1]
    # the numpy path: k >= 1 positive sizes, total at most _FAST_N + 1 (and at most n)
    slow = (lens < 1) | (val < 1).any(1) | (val > _FAST_N + 1).any(1)
    val = np.where(slow[:, None], 1, val)
    ends = np.cumsum(np.where(np.arange(width)[None, :] < lens[:, None], val, 0), axis=1)
    m = ends[:, -1] if width else np.zeros(count, np.int64)
    slow |= m > _FAST_N + 1
    hb = 0
    if n is not None:
        hb = int(n).bit_length()
        slow |= (m > n) | (n > MAX_TOKENS)
    k = np.where(slow, 1, lens)
    m = np.where(slow, 1, m)
    table = _size_table(int(m.max()) - 1)
    rb, exact = _rank_bits(table[m - 1, k - 1])
    total = hb + rb
    slow |= ~exact | (total > _WORD)
    # the cuts s_1 - 1, s_1 + s_2 - 1, ...: the first k - 1 ends, less one
    col = np.arange(max(width - 1, 0))[None, :]
    real = (col < (k - 1)[:, None]) & ~slow[:, None]
    terms = table[np.where(real, ends[:, :-1] - 1, 0), np.where(real, col + 1, 0)]
    rank = np.where(real, terms, np.uint64(0)).sum(1, dtype=np.uint64)
    value = rank if n is None else _shl(m.astype(np.uint64), rb) | rank
    total = np.where(slow, 0, total)
    word = _shl(value, _WORD - total)  # left-aligned: the code is its first bytes
    raw = word.astype(">u8").tobytes()
    nbytes = -(-total // 8)
    out = [raw[8 * i:8 * i + nb] for i, nb in enumerate(nbytes.tolist())]
    for i in np.flatnonzero(slow).tolist():  # in order: the first refused list raises
        out[i] = encode_sizes(sizes[i], n)
    return out


def _words(datas: Sequence, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(first 8 bytes of each data[start:] as a big-endian uint64, zero-padded; bytes
    available)``."""
    pad = bytes(8)
    buf = b"".join((bytes(d[s:s + 8]) + pad)[:8] for d, s in zip(datas, starts))
    word = np.frombuffer(buf, dtype=">u8").astype(np.uint64)
    avail = np.fromiter((len(d) - s for d, s in zip(datas, starts)), np.int64, len(datas))
    return word, avail


def decode_sizes_batch(datas: Sequence[bytes], k: int | Sequence[int],
                       m: int | Sequence[int] | None = None, n: int | None = None,
                       start: Sequence[int] | None = None
                       ) -> tuple[list[list[int]], list[int]]:  # fmt: skip
    """:func:`decode_sizes` of every ``data[start:]`` in ``datas`` (``start`` 0 when not
    given; ``k`` one for all or one per item; ``m`` likewise, or None when the codes carry
    it under the bound ``n``): ``(sizes per item, bytes used per item)``, the same as the
    per-sample calls, with the rank arithmetic in numpy for the whole batch. Items outside
    the numpy path (totals above ``_FAST_N + 1`` of :mod:`~flowcodec.codecs.positions`,
    codes above 64 bits), batches of fewer than ``_BATCH_MIN`` items and the items it
    refuses go through :func:`decode_sizes`, so it raises what that raises for the first
    item it refuses."""
    count = len(datas)
    starts = [0] * count if start is None else [int(s) for s in start]
    if len(starts) != count:
        raise ConfigError(f"expected {count} starts (one per item), got {len(starts)}")
    ks = _per_item(k, count)
    ms = None if m is None else _per_item(m, count)

    def one(i: int) -> tuple[list[int], int]:
        kk = ks[i] if ks is not None else list(k)[i]
        mm = None if m is None else ms[i] if ms is not None else list(m)[i]
        return decode_sizes(datas[i][starts[i]:], kk, m=mm, n=n)

    if (ks is None or (m is not None and ms is None) or (m is None) == (n is None)
            or count < _BATCH_MIN
            or (n is not None and not isinstance(n, numbers.Integral))):  # fmt: skip
        got = [one(i) for i in range(count)]
        return [g[0] for g in got], [g[1] for g in got]
    if count == 0:
        return [], []
    karr = np.array(ks, dtype=np.int64)
    slow = (karr < 1) | (karr > MAX_TOKENS)
    word, avail = _words(datas, starts)
    if n is None:
        hb = 0
        marr = np.array(ms, dtype=np.int64)
        slow |= (marr < karr) | (marr > MAX_TOKENS)
    else:
        hb = int(n).bit_length()
        marr = (word >> np.uint64(_WORD - hb)).astype(np.int64) if hb else np.zeros(count, int)
        slow |= (avail < -(-hb // 8)) | (marr < karr) | (marr > n)
    slow |= marr > _FAST_N + 1
    karr, marr = np.where(slow, 1, karr), np.where(slow, 1, marr)
    table = _size_table(int(marr.max()) - 1)
    bound = table[marr - 1, karr - 1]  # C(m - 1, k - 1): ranks are below it
    rb, exact = _rank_bits(bound)
    total = hb + rb
    slow |= ~exact | (total > _WORD)
    total = np.where(slow, 0, total)
    nbytes = -(-total // 8)
    slow |= avail < nbytes
    # the code's bits, right-aligned: word >> (64 - 8 nbytes); padding below, rank above
    code = np.where(nbytes > 0, word >> (_WORD - 8 * np.maximum(nbytes, 1)).astype(np.uint64),
                    np.uint64(0))  # fmt: skip
    pad = (8 * nbytes - total).astype(np.uint64)
    slow |= (code & ((_ONE << pad) - _ONE)) != 0
    code >>= pad
    rank = code & ((_ONE << rb.astype(np.uint64)) - _ONE)  # rb <= 63
    slow |= rank >= bound
    good = np.flatnonzero(~slow)
    jg, mg = karr[good] - 1, marr[good]
    # the k - 1 cuts, unranked as positions among m - 1
    top = max(1, int(mg.max()) - 1) if len(good) else 1
    cut = _unrank_rows(rank[good], jg, np.ascontiguousarray(table[:top].T))
    rows = np.arange(len(good))
    # the sizes: differences of the ends (each cut + 1, then m), from 0
    ends = np.concatenate([cut + 1, np.zeros((len(good), 1), np.int64)], axis=1)
    ends[rows, jg] = mg
    sizes_g = np.diff(ends, axis=1, prepend=0)
    out: list = [None] * count
    used = nbytes.tolist()
    for i, row, kk in zip(good.tolist(), sizes_g.tolist(), (jg + 1).tolist()):
        out[i] = row[:kk]
    for i in np.flatnonzero(slow).tolist():  # in order: the first refused item raises
        out[i], used[i] = one(i)
    return out, used
