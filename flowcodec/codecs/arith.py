"""Entropy coding for short symbol vectors: an exact reference coder and a compiled one.

Two coders live here, and a stream names the one it was written with (each codec keeps a
format mark in its header, see ``docs/task_codecs.md``, "Coding speed"):

**Format 1, the exact arithmetic coder** (:func:`encode`, :func:`decode`, :class:`Decoder`;
pure Python, the reference). A low-rate task codec sends a few dozen symbols per sample.
CompressAI's rANS coder flushes a 32-bit state (4 bytes) per stream, which at 6-10 bytes of
payload is a large share of the rate, and its C++ decoder trusts its input. Here the whole
message is one interval computed with Python's exact integers: with ``n`` symbols and
``precision``-bit frequency tables the interval lives on a grid of ``2**(precision * n)``
points, and the code is the shortest whole number of bytes naming a point inside it. That
is within one byte of the information content ``-log2 P(symbols)``, with no flush and no
state. Decoding is bounded by construction: it yields exactly ``n`` symbols, each an index
into its own table (so always in range), reads at most ``ceil(precision * n / 8)`` bytes
(longer input is refused), and costs ``O(n)`` big-integer operations on numbers of
``precision * n`` bits. Any byte string decodes to the same symbols every time; a
corrupted payload gives wrong but in-range symbols, which is why packets carry a CRC.

**Format 2, the compiled range coder** (:func:`encode_rows`, :func:`decode_rows`,
:class:`RowDecoders`, :func:`shortest_code`): ``constriction``'s range coder (Rust; 32-bit
words, 24-bit probabilities) with per-symbol categorical models, made byte-tight here:
the encoder keeps the shortest byte string (the coder's words, big-endian, cut and rounded
at a byte) that still decodes to the message, checked by decoding it, and the decoder pads
a payload with zero bytes (what the coder does past its input's end). So a payload is at
most one byte above the shortest code of the coder's own interval, itself a small fraction
of a bit above the information content. The models are exact: a table row is integer
frequencies ``f`` summing to ``2**16``, handed over as the dyadic floats ``f / 2**16``, on
which the coder's quantisation (``floor(c * (2**24 - W)) + s`` for cumulative ``c`` and
symbol ``s`` of a row of width ``W``) involves no rounding at all; the same integers give
the same bits on every machine and thread count. Decoding is bounded: exactly the
declared number of symbols, a payload over :func:`range_max_bytes` or ending in a zero
byte (no encoder writes one) is refused, a decoded symbol outside its row's support is
refused, and the coder never reads past the payload. Every refusal is a
:class:`~flowcodec.bitstream.BitstreamError`.

Tables are CompressAI-style quantised CDFs: row ``cdf[0] = 0``, non-decreasing,
``cdf[length - 1] = 2**precision``, with every used symbol given a non-zero frequency.

Example
-------
>>> from flowcodec.codecs.arith import encode, decode, dyadic_probs, encode_rows, decode_rows
>>> cdf = [0, 40000, 60000, 65536]          # three symbols
>>> data = encode([0, 0, 1, 2], [cdf] * 4)
>>> decode(data, [cdf] * 4)
[0, 0, 1, 2]
>>> probs = dyadic_probs([cdf] * 4)
>>> decode_rows(encode_rows([0, 0, 1, 2], probs), probs).tolist()
[0, 0, 1, 2]
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence

import constriction
import numpy as np

from flowcodec.bitstream import BitstreamError
from flowcodec.errors import ConfigError

__all__ = ["encode", "decode", "Decoder", "max_bytes", "check_cdf", "gaussian_cdf",
           "RANGE_PRECISION", "range_max_bytes", "dyadic_probs", "payload_words", "payload_error",
           "shortest_code", "interval_code", "finish", "encode_rows", "decode_rows",
           "encode_batch", "decode_batch", "RowDecoders", "normal_cdf"]  # fmt: skip


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


# --- format 2: the compiled range coder ------------------------------------------------------

#: Bits of probability precision of the range coder's models (constriction's Python coders).
RANGE_PRECISION = 24

#: The model family every format-2 row is coded with: a categorical distribution given per
#: symbol as a row of probabilities, quantised without rounding when the row is dyadic.
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def range_max_bytes(n: int, bits: int = 16) -> int:
    """Longest format-2 payload of ``n`` symbols whose table frequencies are at least
    ``2**-bits`` (``ceil(bits * n / 8) + 2`` bytes): a symbol of frequency ``f / 2**16``
    gets at least ``256 f - 1`` of the coder's ``2**24`` units, the coder's interval loses
    under ``2**-8`` of its width per symbol, and the shortest code naming a point of an
    interval is at most one byte longer than its information content."""
    return -(-bits * n // 8) + 2


def dyadic_probs(rows: Sequence[Sequence[int]], width: int | None = None,
                 precision: int = 16) -> np.ndarray:  # fmt: skip
    """CDF rows (integers, each ending at ``2**precision``) as a float64 matrix ``(n, W)`` of
    probabilities ``f / 2**precision`` (exact: dyadic), zero-padded to ``width`` (default
    the longest row's symbol count, at least 2: the coder's smallest row). The padding is
    never a codable symbol."""
    n = len(rows)
    sizes = [len(r) - 1 for r in rows]
    w = max(max(sizes, default=2), 2) if width is None else int(width)
    if any(s > w for s in sizes) or w < 2:
        raise ConfigError(f"a CDF row has more than {w} symbols, or the width is under 2")
    out = np.zeros((n, w), dtype=np.float64)
    for i, row in enumerate(rows):
        c = np.asarray(row, dtype=np.int64)
        out[i, : len(c) - 1] = np.diff(c)
    return np.ldexp(out, -precision)


def payload_error(data, limit: int) -> BitstreamError | None:
    """Why ``data`` cannot be a format-2 payload of at most ``limit`` bytes (not bytes,
    longer than ``limit``, or ending in a zero byte), or None when it can."""
    if not isinstance(data, bytes | bytearray):
        return BitstreamError(f"packet payload must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        return BitstreamError(f"range-coded payload of {len(data)} bytes is longer than the "
                              f"{limit} bytes its symbols can take")  # fmt: skip
    if data[-1:] == b"\0":
        return BitstreamError("range-coded payload ends in a zero byte: longer than its "
                              "shortest code, so no encoder wrote it")  # fmt: skip
    return None


def payload_words(data: bytes, limit: int) -> np.ndarray:
    """A format-2 payload as the coder's 32-bit words (big-endian, zero-padded to whole
    words); BitstreamError when :func:`payload_error` finds one."""
    err = payload_error(data, limit)
    if err is not None:
        raise err
    pad = -len(data) % 4
    return np.frombuffer(bytes(data) + bytes(pad), dtype=">u4").astype(np.uint32)


def _candidates(full: bytes, k: int) -> list[bytes]:
    """The byte strings of at most ``k`` bytes nearest below and above ``full`` (as
    fractions, zero-padded), trailing zero bytes dropped."""
    if k >= len(full):
        return [full]
    head = full[:k]
    out = [head.rstrip(b"\0")]
    up = int.from_bytes(head, "big") + 1
    if up < 1 << (8 * k):
        out.append(up.to_bytes(k, "big").rstrip(b"\0"))
    return out


def shortest_code(words: np.ndarray, decodes: Callable[[bytes], bool], start: int = 0) -> bytes:
    """The shortest byte string that ``decodes`` accepts, from the range coder's sealed
    ``words``: the words' bytes (big-endian) cut to ``k`` bytes and rounded down or up.

    The strings that decode to one message are the points of an interval (the coder's
    final one), so if some ``k``-byte string names a point of it, one of the two roundings
    at ``k`` bytes does, and lengths that work stay working as ``k`` grows: the search
    starts at ``start`` (the information content in bytes is a good guess) and walks down
    while shorter codes work, or up until one does. Every candidate is checked by
    decoding it, so the result always decodes to the message."""
    full = np.asarray(words, dtype=np.uint32).astype(">u4").tobytes().rstrip(b"\0")

    def works(k: int) -> bytes | None:
        for c in _candidates(full, k):
            if c is full or decodes(c):
                return c
        return None

    k = min(max(int(start), 0), len(full))
    best = works(k)
    if best is not None:
        while k > 0 and len(best) >= k:
            shorter = works(k - 1)
            if shorter is None:
                break
            best, k = shorter, k - 1
        return best
    while best is None:
        k += 1
        best = works(k)
    return best


def _entries(p: np.ndarray, sym: np.ndarray) -> np.ndarray:
    """``p[b, i, sym[b, i]]`` (``p`` ``(B, n, W)``, or ``(n, W)`` shared) as ``(B, n)``."""
    i = np.arange(sym.shape[1])
    if p.ndim == 2:
        return p[i, sym]
    return p[np.arange(len(sym))[:, None], i, sym]


def _check_rows(sym: np.ndarray, probs: np.ndarray, what: str) -> None:
    if not bool((probs[np.arange(len(sym)), sym] > 0).all()):
        raise BitstreamError(f"{what} decodes to a symbol outside its table's support")


def _info_bytes(sym: np.ndarray, probs: np.ndarray) -> int:
    """The information content of ``sym`` under ``probs``, in whole bytes (a start for
    :func:`shortest_code`; float, so only a guess)."""
    p = probs[np.arange(len(sym)), sym]
    return math.ceil(float(-np.log2(p).sum()) / 8)


def _as_rows(probs: np.ndarray) -> np.ndarray:
    p = np.ascontiguousarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ConfigError(f"probabilities must be a matrix (n, W) with W >= 2, got shape "
                          f"{p.shape}")  # fmt: skip
    return p


def _words(code: bytes) -> np.ndarray:
    return np.frombuffer(code + bytes(-len(code) % 4), dtype=">u4").astype(np.uint32)


def _decodes_to(code: bytes, probs: np.ndarray, sym: np.ndarray) -> bool:
    """Whether ``code`` decodes to the int32 symbols ``sym`` under ``probs``."""
    try:
        got = constriction.stream.queue.RangeDecoder(_words(code)).decode(CATEGORICAL, probs)
    except Exception:  # an invalid point for the coder: not a code of the message
        return False
    return got.astype(np.int32).tobytes() == sym.tobytes()


def encode_batch(symbols: np.ndarray, probs: np.ndarray, verify: bool = True) -> list[bytes]:
    """Format 2 for a batch: ``symbols`` ``(B, n)``, each sample's symbol ``i`` coded with
    row ``probs[b, i]`` (``probs`` ``(B, n, W)``, or ``(n, W)`` shared by every sample);
    one payload per sample, as :func:`encode_rows` writes it.

    ``verify``: decode every payload before returning it (the default). Without it the
    payload is the :func:`interval_code` of the coder's interval, which decodes to the
    message by construction (every point of the final interval does: the intervals are
    nested, and the decoder repeats the encoder's integer arithmetic on the same rows);
    :func:`interval_code` checks its reading of the coder's state against the coder's own
    sealed point, and the fallback (:func:`shortest_code`) always decodes. The bytes are
    the same either way."""
    sym = np.asarray(symbols, dtype=np.int64)
    p = np.ascontiguousarray(probs, dtype=np.float64)
    shared = p.ndim == 2
    if sym.ndim != 2 or p.ndim not in (2, 3) or p.shape[-1] < 2 \
            or p.shape[-2] != sym.shape[1] or (not shared and len(p) != len(sym)):  # fmt: skip
        raise ConfigError(f"symbols (B, n) need probabilities (B, n, W) or (n, W) with W >= 2, "
                          f"got {sym.shape} and {p.shape}")  # fmt: skip
    if sym.size:
        if sym.min() < 0 or sym.max() >= p.shape[-1]:
            raise ConfigError("a symbol outside its probability row's support")
        at = _entries(p, sym)
        if not bool((at > 0).all()):
            raise ConfigError("a symbol outside its probability row's support")
    s32 = sym.astype(np.int32)
    out = []
    for b in range(len(sym)):
        if sym.shape[1] == 0:
            out.append(b"")
            continue
        pb = p if shared else p[b]
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(s32[b], CATEGORICAL, pb)
        code = interval_code(enc)
        if code is None or (verify and not _decodes_to(code, pb, s32[b])):
            code = shortest_code(enc.get_compressed(),
                                 lambda c, pb=pb, sb=s32[b]: _decodes_to(c, pb, sb),
                                 _info_bytes(sym[b], pb))  # fmt: skip
        out.append(code)
    return out


def encode_rows(symbols: Sequence[int] | np.ndarray, probs: np.ndarray) -> bytes:
    """Format 2: code ``symbols[i]`` with the probability row ``probs[i]`` (``(n, W)``,
    e.g. :func:`dyadic_probs`); returns the shortest payload that decodes back (checked by
    decoding it).

    Each symbol must index a non-zero entry of its row (ConfigError otherwise)."""
    p = _as_rows(probs)
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if len(sym) != len(p):
        raise ConfigError(f"{len(sym)} symbols but {len(p)} probability rows")
    return encode_batch(sym[None], p)[0]


def decode_batch(payloads: Sequence[bytes], probs: np.ndarray,
                 limit: int | None = None) -> np.ndarray:  # fmt: skip
    """Invert :func:`encode_batch`: ``(B, n)`` int64 symbols from ``B`` payloads, with
    ``probs`` ``(B, n, W)`` or ``(n, W)``; the checks of :func:`decode_rows`."""
    p = np.ascontiguousarray(probs, dtype=np.float64)
    if p.ndim not in (2, 3) or p.shape[-1] < 2 or (p.ndim == 3 and len(p) != len(payloads)):
        raise ConfigError(f"probabilities must be (B, n, W) or (n, W) with W >= 2, got "
                          f"{p.shape} for {len(payloads)} payloads")  # fmt: skip
    n = p.shape[-2]
    cap = range_max_bytes(n) if limit is None else limit
    out = np.zeros((len(payloads), n), dtype=np.int64)
    if n == 0:
        for data in payloads:
            payload_words(data, cap)
        return out
    try:
        for b, data in enumerate(payloads):
            dec = constriction.stream.queue.RangeDecoder(payload_words(data, cap))
            out[b] = dec.decode(CATEGORICAL, p if p.ndim == 2 else p[b])
    except BitstreamError:
        raise
    except Exception as e:  # the coder's own check of an impossible point
        raise BitstreamError(f"range-coded payload is not a code: {e}") from e
    at = _entries(p, out)
    if not bool((at > 0).all()):
        raise BitstreamError("range-coded payload decodes to a symbol outside its table's "
                             "support")  # fmt: skip
    return out


def decode_rows(data: bytes, probs: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Invert :func:`encode_rows`: exactly ``len(probs)`` symbols (int64), each a non-zero
    entry of its row. BitstreamError when ``data`` is longer than ``limit`` bytes (default
    :func:`range_max_bytes`), ends in a zero byte, or decodes outside a row's support."""
    return decode_batch([data], _as_rows(probs), limit)[0]


def interval_code(enc: constriction.stream.queue.RangeEncoder) -> bytes | None:
    """The shortest byte string naming a point of the range encoder's current interval,
    trailing zero bytes dropped.

    The coder's position counts its words so far, including any it holds back for a
    pending carry (``lower + range`` past ``2**64``); the interval is those words, then
    ``[lower, lower + range)`` on the next 64 bits. Sealing writes the held-back words as
    they read with the carry taken or not (whichever the point it seals with needs: taken
    exactly when ``lower + 2**32 - 1`` passes ``2**64``), so the words up to the position
    are the sealed words' first ones, less that carry. ``None`` (the caller searches
    instead) unless the point the coder seals with lies in the interval so read: a check of
    that reading against the coder's own, at the cost of one comparison."""
    pos, (lower, width) = enc.pos()
    sealed = enc.get_compressed()
    if len(sealed) == 0:  # nothing encoded: the empty code
        return b"" if pos == 0 else None
    tail = len(sealed) - pos  # the seal's words after the held-back ones: 1 or 2
    if not 1 <= tail <= 2:
        return None
    whole = int.from_bytes(sealed.astype(">u4").tobytes(), "big")
    carry = 1 if lower + 0xFFFFFFFF >= 1 << 64 else 0
    head = (whole >> (32 * tail)) - carry
    if head < 0:
        return None
    low = (head << 64) + lower
    high = low + width
    # the coder's own sealed point must lie in the interval read off its state
    if not low <= (whole << (32 * (2 - tail))) < high:
        return None
    total = 32 * pos + 64
    nbytes = max(0, (total - width.bit_length()) // 8)
    while True:
        shift = total - 8 * nbytes
        if shift <= 0:
            return (low << -shift).to_bytes(nbytes, "big").rstrip(b"\0")
        m = -((-low) >> shift)  # the first point of the 8 * nbytes-bit grid at or above low
        if (m << shift) < high:
            return m.to_bytes(nbytes, "big").rstrip(b"\0")
        nbytes += 1


def finish(enc: constriction.stream.queue.RangeEncoder, decodes: Callable[[bytes], bool],
           start: Callable[[], int]) -> bytes:  # fmt: skip
    """The payload of a finished range encoder: :func:`interval_code`, checked by
    ``decodes``; should that fail, :func:`shortest_code` from ``start()``."""
    code = interval_code(enc)
    if code is not None and decodes(code):
        return code
    return shortest_code(enc.get_compressed(), decodes, start())


class RowDecoders:
    """Format-2 payloads of several samples decoded in lockstep, one symbol of each per
    :meth:`next` (for tables that depend on the symbols decoded so far, as in a context
    model, evaluated for the whole batch at once).

    ``RowDecoders(payloads, n)`` checks every payload as :func:`decode_rows` does for ``n``
    symbols; ``next(probs)`` with ``probs`` ``(B, W)`` (row ``b`` for payload ``b``)
    returns the next symbol of each, int64 ``(B,)``, and raises BitstreamError for a
    symbol outside its row's support; at most ``n`` calls.
    """

    def __init__(self, payloads: Sequence[bytes], n: int, limit: int | None = None) -> None:
        cap = range_max_bytes(n) if limit is None else limit
        self._dec = [constriction.stream.queue.RangeDecoder(payload_words(p, cap))
                     for p in payloads]  # fmt: skip
        self._left = n

    def __len__(self) -> int:
        return len(self._dec)

    def next(self, probs: np.ndarray) -> np.ndarray:
        if self._left <= 0:
            raise ConfigError("all symbols of these payloads were decoded already")
        self._left -= 1
        p = _as_rows(probs)
        if len(p) != len(self._dec):
            raise ConfigError(f"{len(p)} probability rows for {len(self._dec)} payloads")
        try:
            out = np.fromiter((dec.decode(CATEGORICAL, row)[0]
                               for dec, row in zip(self._dec, p[:, None, :])),
                              dtype=np.int64, count=len(p))  # fmt: skip
        except Exception as e:
            raise BitstreamError(f"range-coded payload is not a code: {e}") from e
        _check_rows(out, p, "range-coded payload")
        return out

    def next_one(self, row: np.ndarray) -> int:
        """:meth:`next` for a single payload, with its row ``(W,)`` (float64, contiguous):
        the symbol as an int, with the same checks."""
        if len(self._dec) != 1 or self._left <= 0:
            raise ConfigError("next_one: one payload with symbols left to decode")
        self._left -= 1
        try:
            s = int(self._dec[0].decode(CATEGORICAL, row[None])[0])
        except Exception as e:
            raise BitstreamError(f"range-coded payload is not a code: {e}") from e
        if not row[s] > 0:
            raise BitstreamError("range-coded payload decodes to a symbol outside its table's "
                                 "support")  # fmt: skip
        return s


# --- a Gaussian CDF from IEEE basic operations -----------------------------------------------
# libm's exp and erf may differ in the last bit between platforms; tables the coder depends on
# must not. These use only +, -, *, / (correctly rounded by IEEE 754 on every machine), numpy
# elementwise (one operation per call, so no fused multiply-add), in a fixed order.

_LN2 = 0.6931471805599453
_INV_LN2 = 1.4426950408889634
_INV_SQRT2 = 0.7071067811865475
_TWO_OVER_SQRT_PI = 1.1283791670955126
_EXP_TERMS = tuple(1 / math.factorial(k) for k in range(18))
#: |x| beyond which normal_cdf is 0 or 1 exactly (by definition: the tail is under 2**-40).
NORMAL_CUT = 7.0
_ERF_TERMS = 110


def _exp(y: np.ndarray) -> np.ndarray:
    """``exp(y)`` for float64 ``y`` in about [-50, 50]: ``2**k`` times a degree-17 Taylor
    polynomial of the remainder (under 1e-15 relative error)."""
    k = np.rint(y * _INV_LN2)
    r = y - k * _LN2
    p = np.full_like(r, _EXP_TERMS[-1])
    for c in reversed(_EXP_TERMS[:-1]):
        p = p * r
        p = p + c
    return np.ldexp(p, k.astype(np.int32))


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF of float64 ``x``, elementwise, the same bits on every
    machine (basic operations only; absolute error under 1e-14): ``erf`` from the series
    ``2/sqrt(pi) exp(-z^2) sum_n (2 z^2)^n z / (2n+1)!!`` (positive terms, no
    cancellation), exactly 0 or 1 beyond :data:`NORMAL_CUT`."""
    x = np.asarray(x, dtype=np.float64)
    z = np.minimum(np.abs(x), NORMAL_CUT) * _INV_SQRT2
    z2 = z * z
    t2 = z2 + z2
    term, total = z.copy(), z.copy()
    for n in range(1, _ERF_TERMS):
        term = term * t2
        term = term / (2 * n + 1)
        total = total + term
    erf = np.minimum(_exp(-z2) * total * _TWO_OVER_SQRT_PI, 1.0)
    phi = 0.5 + 0.5 * np.where(x < 0, -erf, erf)
    return np.where(np.abs(x) >= NORMAL_CUT, (x > 0).astype(np.float64), phi)
