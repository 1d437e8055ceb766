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

__all__ = ["encode", "decode", "Decoder", "max_bytes", "check_cdf", "gaussian_cdf"]


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


class Decoder:
    """Incremental form of :func:`decode`, for tables that depend on earlier symbols.

    ``Decoder(data, n)`` then ``n`` calls of ``next(cdf)``; the same bounds hold.
    """

    def __init__(self, data: bytes, n: int, precision: int = 16) -> None:
        if len(data) > max_bytes(n, precision):
            raise BitstreamError(f"arithmetic-coded payload of {len(data)} bytes is longer "
                                 f"than the {max_bytes(n, precision)} bytes {n} symbols take")
        total = precision * n
        shift = total - 8 * len(data)
        value = int.from_bytes(bytes(data), "big")
        self._value = value << shift if shift >= 0 else value >> -shift
        self._low, self._width = 0, 1 << total
        self._left, self._precision = n, precision

    def next(self, cdf: Sequence[int]) -> int:
        if self._left <= 0:
            raise ConfigError("all symbols of this payload were decoded already")
        self._left -= 1
        unit = self._width >> self._precision
        t = (self._value - self._low) // unit
        s = min(bisect_right(cdf, t) - 1, len(cdf) - 2)
        self._low += unit * cdf[s]
        self._width = unit * (cdf[s + 1] - cdf[s])
        return s


def decode(data: bytes, cdfs: Sequence[Sequence[int]], precision: int = 16) -> list[int]:
    """Invert :func:`encode`: exactly ``len(cdfs)`` symbols, each in range of its table.

    Raises BitstreamError if ``data`` is longer than any code for that many symbols.
    """
    dec = Decoder(data, len(cdfs), precision)
    return [dec.next(cdf) for cdf in cdfs]


def gaussian_cdf(lo: int, hi: int, mu: float, sigma: float, precision: int = 16) -> list[int]:
    """Quantised CDF row of a Gaussian ``N(mu, sigma^2)`` discretised to the integers
    ``lo..hi`` (the tails folded into the end symbols), every symbol at least 1/2**precision.

    Pure float64 arithmetic (``math.erf``), so the same arguments give the same row on any
    machine: the coder's tables never depend on a BLAS kernel.
    """
    import math

    n = hi - lo + 1
    if n < 1 or n >= 1 << precision or not sigma > 0:
        raise ConfigError(f"bad discrete Gaussian: {n} symbols, sigma {sigma}")
    scale = 1 / (sigma * math.sqrt(2))
    edges = [0.5 * (1 + math.erf((k + 0.5 - mu) * scale)) for k in range(lo, hi)]
    probs = [b - a for a, b in zip([0.0, *edges], [*edges, 1.0])]
    spare = (1 << precision) - n
    freq = [1 + int(p * spare) for p in probs]
    freq[max(range(n), key=lambda i: probs[i])] += (1 << precision) - sum(freq)
    cdf = [0]
    for f in freq:
        cdf.append(cdf[-1] + f)
    return cdf
