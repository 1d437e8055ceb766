"""The request envelope a device (or proxy, or tier) sends to a tier server, and the answer.

A request carries one sample: the link units its bitstream was sent as
(:meth:`~flowcodec.bitstream.Bitstream.units`), each delivered or lost, plus what the
receiver needs to rebuild the stream. The units are the bytes that crossed the wireless
hop; the rest of the envelope is the session state a receiver keeps (codec header, framing,
``seq``) carried along so that servers hold no per-client state and a restarted server
answers at once.

Layout (little-endian)::

    magic "FCQ1" (4) | flags u8 | request id u64 | seq u32 |
    header length u16 | header bytes (Header.to_bytes(n_packets, seq)) |
    unit count u16 | per unit: length u32 (0xFFFFFFFF: lost) | bytes |
    [flags bit 1] link report: bits u32, channel uses u64, packets u16, lost u16,
                  header lost u8, tx time f64

``flags`` bit 0: session framing (else per-sample framing); bit 1: a link report follows
(written by :class:`~flowcodec.serve.proxy.LinkProxy`). Every length is checked against
the bytes that remain before anything is allocated, and the counts have hard caps
(:data:`MAX_UNITS`); anything malformed raises :class:`WireError`.

The answer is UTF-8 JSON (:func:`encode_answer` / :func:`parse_answer`): logits, exit
tier and point, confidence, and the trace of every tier and hop the sample went through.

Several samples in one call (``InferBatch``: a device or gateway with several frames or
cameras) are framed around the same envelopes and answers (:func:`encode_batch` /
:func:`parse_batch`, :func:`encode_batch_answer` / :func:`parse_batch_answer`)::

    request: magic "FCB1" (4) | count u16 | per sample: length u32 | envelope bytes
    answer:  magic "FCA1" (4) | count u16 | per sample: kind u8 | length u32 | bytes

An answer entry of kind 0 is the sample's JSON answer; kind 1 is a :class:`SampleError`
(JSON ``{"reason": ..., "detail": ...}``) for a sample that was not answered. The count
is capped (:data:`MAX_BATCH_SAMPLES`, and a server's own lower limit) and checked against
the bytes that remain before the per-sample loop; no trailing bytes are accepted.

Example
-------
>>> req = Request(rid=7, seq=3, header=b"H" * 10, units=[b"ab", None], framing="session")
>>> parse_request(encode_request(req)) == req
True
>>> body = encode_batch([encode_request(req), encode_request(req)])
>>> [parse_request(b) for b in parse_batch(body)] == [req, req]
True
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "WireError",
    "Request",
    "LinkReport",
    "encode_request",
    "parse_request",
    "encode_answer",
    "parse_answer",
    "MAX_UNITS",
    "MAX_ANSWER_BYTES",
    "SampleError",
    "encode_batch",
    "parse_batch",
    "encode_batch_answer",
    "parse_batch_answer",
    "MAX_BATCH_SAMPLES",
    "MAX_BATCH_ANSWER_BYTES",
]

MAGIC = b"FCQ1"
#: At most this many link units per request (the bitstream's own packet cap + header).
MAX_UNITS = 65536
#: An answer larger than this is refused by the client (logits + trace are far smaller).
MAX_ANSWER_BYTES = 1 << 20
#: At most this many samples in one batch call, whatever a server allows (the count is a
#: u16; servers default to 64, ``ServeConfig.max_samples_per_request``).
MAX_BATCH_SAMPLES = 4096
#: A batch answer larger than this is refused by the client (and never sent by a server).
MAX_BATCH_ANSWER_BYTES = 16 << 20
BATCH_MAGIC = b"FCB1"
BATCH_ANSWER_MAGIC = b"FCA1"
_LOST = 0xFFFFFFFF
_FIXED = struct.Struct("<4sBQI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_REPORT = struct.Struct("<IQHHBd")
_SESSION, _HAS_REPORT = 1, 2


class WireError(ValueError):
    """A request or answer that is not well formed (the message says what is wrong)."""


@dataclass(frozen=True)
class LinkReport:
    """What the emulated wireless hop did to one sample (filled in by the proxy)."""

    bits: int
    channel_uses: int
    packets: int
    packets_lost: int
    header_lost: bool
    tx_time_s: float


@dataclass(frozen=True)
class Request:
    """One sample on its way to a tier: ``units[i]`` is a link unit's bytes or ``None``
    (lost); ``header`` is the codec header's bytes; ``framing`` is ``"sample"`` or
    ``"session"``; ``link`` is the emulated hop's report, when a proxy carried it."""

    rid: int
    seq: int
    header: bytes
    units: list = field(default_factory=list)
    framing: str = "sample"
    link: LinkReport | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", list(self.units))


def encode_request(req: Request) -> bytes:
    """The envelope's bytes (raises :class:`WireError` on values out of range)."""
    if req.framing not in ("sample", "session"):
        raise WireError(f"framing must be 'sample' or 'session', got {req.framing!r}")
    if not 0 <= req.rid < 1 << 64 or not 0 <= req.seq < 1 << 32:
        raise WireError("request id must fit in 64 bits and seq in 32 bits")
    if len(req.header) > 0xFFFF or len(req.units) > MAX_UNITS - 1:
        raise WireError("header or unit count too large")
    flags = (_SESSION if req.framing == "session" else 0) | (_HAS_REPORT if req.link else 0)
    parts = [_FIXED.pack(MAGIC, flags, req.rid, req.seq), _U16.pack(len(req.header)),
             bytes(req.header), _U16.pack(len(req.units))]  # fmt: skip
    for u in req.units:
        if u is None:
            parts.append(_U32.pack(_LOST))
        else:
            if len(u) >= _LOST:
                raise WireError("unit too long")
            parts += [_U32.pack(len(u)), bytes(u)]
    if req.link is not None:
        r = req.link
        parts.append(_REPORT.pack(r.bits, r.channel_uses, r.packets, r.packets_lost,
                                  int(r.header_lost), r.tx_time_s))  # fmt: skip
    return b"".join(parts)


def parse_request(data: bytes) -> Request:
    """Parse an envelope; :class:`WireError` names the field at fault."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > len(buf):
            raise WireError(f"truncated: {what} needs {n} bytes at offset {pos}, "
                            f"{len(buf) - pos} left")  # fmt: skip
        out = buf[pos : pos + n]
        pos += n
        return out

    magic, flags, rid, seq = _FIXED.unpack(take(_FIXED.size, "fixed part"))
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if flags & ~(_SESSION | _HAS_REPORT):
        raise WireError(f"unknown flags 0x{flags:02x}")
    (hlen,) = _U16.unpack(take(2, "header length"))
    header = bytes(take(hlen, "header"))
    (n,) = _U16.unpack(take(2, "unit count"))
    if 4 * n > len(buf) - pos:  # every unit takes 4 bytes at least: check before a loop
        raise WireError(f"{n} units declared, only {len(buf) - pos} bytes follow")
    units: list[bytes | None] = []
    for i in range(n):
        (length,) = _U32.unpack(take(4, f"unit {i} length"))
        units.append(None if length == _LOST else bytes(take(length, f"unit {i}")))
    link = None
    if flags & _HAS_REPORT:
        bits, uses, packets, lost, hl, tx = _REPORT.unpack(take(_REPORT.size, "link report"))
        if hl > 1 or not math.isfinite(tx) or tx < 0:
            raise WireError("link report out of range")
        link = LinkReport(bits, uses, packets, lost, bool(hl), tx)
    if pos != len(buf):
        raise WireError(f"{len(buf) - pos} trailing bytes")
    framing = "session" if flags & _SESSION else "sample"
    return Request(rid, seq, header, units, framing, link)


def with_link(data: bytes, link: LinkReport, delivered: list) -> bytes:
    """The request ``data`` with its units replaced by ``delivered`` and ``link`` set."""
    req = parse_request(data)
    if len(delivered) != len(req.units):
        raise WireError("delivered units do not match the request's units")
    return encode_request(Request(req.rid, req.seq, req.header, delivered, req.framing, link))


# --- answers -----------------------------------------------------------------------------
_ANSWER_KEYS = {"rid": int, "exit_tier": str, "exit_point": int, "confidence": float,
                "logits": list, "compute_s": dict, "flops": dict, "queue_s": dict,
                "batch": dict, "hops": list, "fallback": (str, type(None))}  # fmt: skip
_HOP_KEYS = ("bits", "channel_uses", "packets", "packets_lost", "header_lost", "tx_time_s")


def encode_answer(answer: dict) -> bytes:
    """Serialise an answer dict (keys as :func:`parse_answer` checks them)."""
    return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()


def parse_answer(data: bytes) -> dict:
    """Parse and check an answer: every key present with its type, logits finite numbers,
    each hop with its six fields (and ``concealed``, the fraction of the sample's packets
    concealed at that hop, when present). Raises :class:`WireError`."""
    if len(data) > MAX_ANSWER_BYTES:
        raise WireError(f"answer of {len(data)} bytes, over {MAX_ANSWER_BYTES}")
    try:
        ans = json.loads(bytes(data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"answer is not JSON: {e}") from e
    if not isinstance(ans, dict):
        raise WireError("answer is not a JSON object")
    for k, t in _ANSWER_KEYS.items():
        v = ans.get(k)
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = ans[k] = float(v)
        if k not in ans or not isinstance(v, t) or isinstance(v, bool):
            raise WireError(f"answer field {k!r} missing or not {t}")
    if not ans["logits"] or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                    and math.isfinite(v) for v in ans["logits"]):  # fmt: skip
        raise WireError("answer logits must be finite numbers")
    for h in ans["hops"]:
        if not isinstance(h, dict) or any(k not in h for k in _HOP_KEYS):
            raise WireError(f"answer hop trace needs {_HOP_KEYS}")
        c = h.get("concealed", 0.0)  # optional: servers before concealment checks omit it
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c <= 1.0:
            raise WireError("answer hop field 'concealed' must be a fraction in [0, 1]")
    for key in ("compute_s", "flops", "queue_s", "batch"):
        if not all(isinstance(v, int | float) for v in ans[key].values()):
            raise WireError(f"answer field {key!r} must map tier names to numbers")
    return ans


# --- several samples in one call --------------------------------------------------------
_BATCH_HEAD = struct.Struct("<4sH")
_ANSWER_ENTRY = struct.Struct("<BI")
_KIND_ANSWER, _KIND_ERROR = 0, 1


@dataclass(frozen=True)
class SampleError:
    """One sample of a batch call that got no answer.

    ``reason`` is one of :class:`~flowcodec.serve.client.RemoteError`'s reasons
    (``"rejected"``: its envelope or stream was refused; ``"deadline"``: the call's deadline
    passed before its answer; ``"error"``: the server failed on it); ``detail`` says more.
    """

    reason: str
    detail: str = ""


def encode_batch(envelopes: Sequence[bytes]) -> bytes:
    """One batch call's body: the envelopes (:func:`encode_request`'s bytes, not parsed
    again here), in order. Raises :class:`WireError` for an empty batch, more than
    :data:`MAX_BATCH_SAMPLES`, or an entry that is not bytes."""
    n = len(envelopes)
    if not 1 <= n <= MAX_BATCH_SAMPLES:
        raise WireError(f"batch count {n}: need 1..{MAX_BATCH_SAMPLES} samples")
    parts = [_BATCH_HEAD.pack(BATCH_MAGIC, n)]
    for i, env in enumerate(envelopes):
        if not isinstance(env, bytes | bytearray | memoryview):
            raise WireError(f"batch sample {i}: expected bytes, got {type(env).__name__}")
        env = bytes(env)
        if len(env) >= 1 << 32:
            raise WireError(f"batch sample {i}: envelope too long")
        parts += [_U32.pack(len(env)), env]
    return b"".join(parts)


def parse_batch(data: bytes, max_count: int = MAX_BATCH_SAMPLES) -> list[bytes]:
    """The envelopes of a batch body, in order (each still to be checked with
    :func:`parse_request`). :class:`WireError` names the field at fault: the magic, a
    count outside ``1..max_count`` (``max_count`` is capped at :data:`MAX_BATCH_SAMPLES`),
    a count the remaining bytes cannot hold, a truncated entry, trailing bytes."""
    frames = _read_frames(data, BATCH_MAGIC, _U32, min(max_count, MAX_BATCH_SAMPLES), "batch")
    return [bytes(body) for _, body in frames]


def encode_batch_answer(entries: Sequence[bytes | SampleError]) -> bytes:
    """A batch call's answer: per sample, in request order, its JSON answer
    (:func:`encode_answer`'s bytes) or a :class:`SampleError`. Raises :class:`WireError`
    when the result would be over :data:`MAX_BATCH_ANSWER_BYTES`."""
    n = len(entries)
    if not 1 <= n <= MAX_BATCH_SAMPLES:
        raise WireError(f"batch answer count {n}: need 1..{MAX_BATCH_SAMPLES}")
    parts = [_BATCH_HEAD.pack(BATCH_ANSWER_MAGIC, n)]
    size = _BATCH_HEAD.size
    for i, e in enumerate(entries):
        if isinstance(e, SampleError):
            kind = _KIND_ERROR
            body = json.dumps({"reason": str(e.reason), "detail": str(e.detail)[:200]},
                              separators=(",", ":")).encode()  # fmt: skip
        elif isinstance(e, bytes | bytearray | memoryview):
            kind, body = _KIND_ANSWER, bytes(e)
        else:
            raise WireError(f"batch answer {i}: expected bytes or SampleError, "
                            f"got {type(e).__name__}")  # fmt: skip
        size += _ANSWER_ENTRY.size + len(body)
        if size > MAX_BATCH_ANSWER_BYTES:
            raise WireError(f"batch answer over {MAX_BATCH_ANSWER_BYTES} bytes at sample {i}")
        parts += [_ANSWER_ENTRY.pack(kind, len(body)), body]
    return b"".join(parts)


def parse_batch_answer(data: bytes, count: int | None = None) -> list[bytes | SampleError]:
    """A batch answer's entries, in request order: a sample's answer bytes (to check with
    :func:`parse_answer`) or its :class:`SampleError`. ``count``: the number of samples
    sent; an answer with another number is a :class:`WireError`, as is any framing fault."""
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_BATCH_ANSWER_BYTES:
        raise WireError(f"batch answer of {len(data)} bytes, over {MAX_BATCH_ANSWER_BYTES}")
    frames = _read_frames(data, BATCH_ANSWER_MAGIC, _ANSWER_ENTRY, MAX_BATCH_SAMPLES,
                          "batch answer")  # fmt: skip
    if count is not None and len(frames) != count:
        raise WireError(f"batch answer count {len(frames)} for {count} samples sent")
    out: list[bytes | SampleError] = []
    for i, ((kind,), body) in enumerate(frames):
        if kind == _KIND_ANSWER:
            out.append(bytes(body))
        elif kind == _KIND_ERROR:
            try:
                err = json.loads(bytes(body).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WireError(f"batch answer {i}: error entry is not JSON: {e}") from e
            if (not isinstance(err, dict) or not isinstance(err.get("reason"), str)
                    or not isinstance(err.get("detail"), str)):  # fmt: skip
                raise WireError(f"batch answer {i}: error entry needs 'reason' and 'detail'")
            out.append(SampleError(err["reason"], err["detail"]))
        else:
            raise WireError(f"batch answer {i}: unknown entry kind {kind}")
    return out


def _read_frames(data, magic: bytes, entry: struct.Struct, max_count: int,
                 what: str) -> list[tuple[tuple, memoryview]]:  # fmt: skip
    """``magic | count u16 | count x (entry fields..., length u32 | bytes)``, read with
    every count and length checked against the bytes left before it is used."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(data)
    if len(buf) < _BATCH_HEAD.size:
        raise WireError(f"truncated: {what} head needs {_BATCH_HEAD.size} bytes, "
                        f"{len(buf)} given")  # fmt: skip
    magic_got, n = _BATCH_HEAD.unpack_from(buf, 0)
    if magic_got != magic:
        raise WireError(f"bad {what} magic {bytes(magic_got)!r}, expected {magic!r}")
    if not 1 <= n <= max_count:
        raise WireError(f"{what} count {n} not in 1..{max_count}")
    pos = _BATCH_HEAD.size
    if n * entry.size > len(buf) - pos:  # every entry takes entry.size bytes at least
        raise WireError(f"{what} count {n} declared, only {len(buf) - pos} bytes follow")
    out = []
    for i in range(n):
        if entry.size > len(buf) - pos:
            raise WireError(f"truncated: {what} entry {i} length needs {entry.size} bytes "
                            f"at offset {pos}, {len(buf) - pos} left")  # fmt: skip
        *fields, length = entry.unpack_from(buf, pos)
        pos += entry.size
        if length > len(buf) - pos:
            raise WireError(f"truncated: {what} entry {i} declares {length} bytes at offset "
                            f"{pos}, {len(buf) - pos} left")  # fmt: skip
        out.append((tuple(fields), buf[pos : pos + length]))
        pos += length
    if pos != len(buf):
        raise WireError(f"{len(buf) - pos} trailing bytes after the {what}")
    return out
