"""Which tokens were sent: a set of positions as a short, self-delimiting code.

:func:`encode_positions` codes ``k`` distinct positions among ``n`` in
``bit_length(n) + bit_length(C(n, k) - 1)`` bits (the count, then the set's rank), packed
into whole bytes by :func:`pack_bits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowcodec.bitstream import BitstreamError
from flowcodec.errors import ConfigError

__all__ = ["MAX_TOKENS", "pack_bits", "unpack_bits", "position_bits", "encode_positions",
           "decode_positions"]


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
    if not 1 <= n <= MAX_TOKENS:
        raise ConfigError(f"position range n must be in 1..{MAX_TOKENS}, got {n}")
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
    if not 1 <= n <= MAX_TOKENS:
        raise ConfigError(f"position range n must be in 1..{MAX_TOKENS}, got {n}")
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
