"""The token-merge codec's side codes: which cluster each sent position joins
(:func:`encode_assignment`, canonical labels in a mixed radix) and, with
``order="sizes"``, the clusters' sizes (:func:`encode_sizes`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs.positions import MAX_TOKENS, pack_bits, unpack_bits
from flowcodec.errors import ConfigError

__all__ = ["encode_assignment", "decode_assignment", "assignment_bits", "encode_sizes",
           "decode_sizes", "size_bits"]


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

