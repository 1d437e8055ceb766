"""Exact arithmetic coding for short symbol vectors (pure Python, bounded, deterministic).

A low-rate task codec sends a few dozen symbols per sample. CompressAI's rANS coder
flushes a 32-bit state (4 bytes) per stream, which at 6-10 bytes of payload is a large
share of the rate, and its C++ decoder trusts its input. Here the whole message is one
interval computed with Python's exact integers: with ``n`` symbols and ``precision``-bit
frequency tables the interval lives on a grid of ``2**(precision * n)`` points, and the
code is the shortest whole number of bytes naming a point inside it. That is within one
byte of the information content ``-log2 P(symbols)``, with no flush and no state.

Decoding is bounded by construction: it yields exactly ``n`` symbols, each an index
into its own table (so always in range), reads at most ``ceil(precision * n / 8)`` bytes
(longer input is refused), and costs ``O(n)`` big-integer operations on numbers of
``precision * n`` bits. Any byte string decodes to the same symbols every time; a
corrupted payload gives wrong but in-range symbols, which is why packets carry a CRC.

Tables are CompressAI-style quantised CDFs: row ``cdf[0] = 0``, non-decreasing,
``cdf[length - 1] = 2**precision``, with every used symbol given a non-zero frequency.

Example
-------
>>> from flowcodec.codecs.arith import encode, decode
>>> cdf = [0, 40000, 60000, 65536]          # three symbols
>>> data = encode([0, 0, 1, 2], [cdf] * 4)
>>> decode(data, [cdf] * 4)
[0, 0, 1, 2]
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from flowcodec.bitstream import BitstreamError
from flowcodec.errors import ConfigError

__all__ = ["encode", "decode", "max_bytes", "check_cdf"]


def max_bytes(n: int, precision: int = 16) -> int:
    """The longest code for ``n`` symbols: ``ceil(precision * n / 8)`` bytes."""
    return -(-precision * n // 8)


def check_cdf(cdf: Sequence[int], precision: int = 16) -> None:
    """Raise ConfigError unless ``cdf`` is a usable quantised CDF row."""
    if len(cdf) < 2 or cdf[0] != 0 or cdf[-1] != 1 << precision:
        raise ConfigError(f"a CDF row must start at 0 and end at 2**{precision}")
    if any(b <= a for a, b in zip(cdf, cdf[1:])):
        raise ConfigError("a CDF row must be strictly increasing (every symbol codable)")


def encode(symbols: Sequence[int], cdfs: Sequence[Sequence[int]], precision: int = 16) -> bytes:
    """Code ``symbols[i]`` with table ``cdfs[i]``; returns the shortest code in whole bytes.

    Each symbol must be an index ``0 <= s < len(cdfs[i]) - 1``.
    """
    if len(symbols) != len(cdfs):
        raise ConfigError(f"{len(symbols)} symbols but {len(cdfs)} tables")
    low, width = 0, 1  # the interval [low, low + width) on the grid of 2**(precision * k)
    for s, cdf in zip(symbols, cdfs):
        s = int(s)
        if not 0 <= s < len(cdf) - 1:
            raise ConfigError(f"symbol {s} outside its table (0..{len(cdf) - 2})")
        low = (low << precision) + width * cdf[s]
        width *= cdf[s + 1] - cdf[s]
    total = precision * len(symbols)
    nbytes = max(0, (total - width.bit_length()) // 8)
    while True:
        shift = total - 8 * nbytes
        if shift <= 0:
            return (low << -shift).to_bytes(nbytes, "big")
        m = -((-low) >> shift)  # ceil(low / 2**shift): the first grid point at this length
        if (m << shift) < low + width:
            return m.to_bytes(nbytes, "big")
        nbytes += 1


def decode(data: bytes, cdfs: Sequence[Sequence[int]], precision: int = 16) -> list[int]:
    """Invert :func:`encode`: exactly ``len(cdfs)`` symbols, each in range of its table.

    Raises BitstreamError if ``data`` is longer than any code for that many symbols.
    """
    n = len(cdfs)
    total = precision * n
    if len(data) > max_bytes(n, precision):
        raise BitstreamError(f"arithmetic-coded payload of {len(data)} bytes is longer "
                             f"than the {max_bytes(n, precision)} bytes {n} symbols take")
    value = int.from_bytes(bytes(data), "big")
    shift = total - 8 * len(data)
    value = value << shift if shift >= 0 else value >> -shift
    low, width = 0, 1 << total
    out = []
    for cdf in cdfs:
        unit = width >> precision
        t = (value - low) // unit
        s = min(bisect_right(cdf, t) - 1, len(cdf) - 2)
        out.append(s)
        low += unit * cdf[s]
        width = unit * (cdf[s + 1] - cdf[s])
    return out
