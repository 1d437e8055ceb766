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
(written by :class:`~flowcodec.serve.proxy.LinkProxy`); bit 2: answer in the binary form
(else JSON). Every length is checked against the bytes that remain before anything is
allocated, and the counts have hard caps (:data:`MAX_UNITS`); anything malformed raises
:class:`WireError`. :func:`parse_requests` parses the envelopes of a whole call (or of
everything a connection delivered at once) in one pass, one result per envelope.

The answer (:func:`encode_answer` / :func:`parse_answer`) holds logits, exit tier and
point, confidence, and the trace of every tier and hop the sample went through. It comes
in two forms, and :func:`parse_answer` reads both into the same dict:

- JSON (UTF-8), what every server sent before the binary form, and still the answer to a
  request that does not ask for the binary one;
- binary (``encode_answer(answer, binary=True)``), about a third of the size and several
  times cheaper to write and to read (little-endian; ``name`` is ``length u8 | UTF-8``)::

      magic "FCR1" (4) | rid u64 | exit point u16 | confidence f64 | flags u8 |
      tier names: count u8 | name x count | exit tier: name index u8 |
      logits: count u16 | f32 x count |
      compute_s, queue_s (f64), batch (u32), flops (u64), each:
          count u8 | (name index u8 | value) x count |
      hops: count u8 | per hop: bits u64, channel uses u64, packets u32, packets lost u32,
          header lost u8, tx time f64, concealed f64 |
      [flags bit 0] fallback: name

  Logits are float32, as the models compute them, so a round trip keeps them exactly.
  The magic's last byte is the form's version: a reader refuses one it does not know.

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
>>> ans = {"rid": 7, "exit_tier": "edge", "exit_point": 3, "confidence": 0.5,
...        "logits": [0.25, -1.0], "compute_s": {"edge": 0.001}, "flops": {"edge": 10},
...        "queue_s": {"edge": 0.0}, "batch": {"edge": 1}, "fallback": None,
...        "hops": [{"bits": 8, "channel_uses": 0, "packets": 1, "packets_lost": 0,
...                  "header_lost": False, "tx_time_s": 0.0, "concealed": 0.0}]}
>>> parse_answer(encode_answer(ans, binary=True)) == parse_answer(encode_answer(ans)) == ans
True
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowcodec.serve.batch_wire import (
    BATCH_ANSWER_MAGIC,
    BATCH_MAGIC,
    MAX_BATCH_ANSWER_BYTES,
    MAX_BATCH_SAMPLES,
    SampleError,
    WireError,
    encode_batch,
    encode_batch_answer,
    parse_batch,
    parse_batch_answer,
)

__all__ = [
    "WireError",
    "Request",
    "LinkReport",
    "encode_request",
    "parse_request",
    "parse_requests",
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
    "ANSWER_FORMS",
    "BATCH_MAGIC",
    "BATCH_ANSWER_MAGIC",
]

MAGIC = b"FCQ1"
#: At most this many link units per request (the bitstream's own packet cap + header).
MAX_UNITS = 65536
#: An answer larger than this is refused by the client (logits + trace are far smaller).
MAX_ANSWER_BYTES = 1 << 20
_LOST = 0xFFFFFFFF
_FIXED = struct.Struct("<4sBQI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_REPORT = struct.Struct("<IQHHBd")
_SESSION, _HAS_REPORT, _BINARY_ANSWER = 1, 2, 4
_ALL_FLAGS = _SESSION | _HAS_REPORT | _BINARY_ANSWER
#: The forms an answer can take (``Request.answer``).
ANSWER_FORMS = ("json", "binary")


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
    ``"session"``; ``link`` is the emulated hop's report, when a proxy carried it;
    ``answer`` is the form the caller wants its answer in, ``"json"`` or ``"binary"``."""

    rid: int
    seq: int
    header: bytes
    units: list = field(default_factory=list)
    framing: str = "sample"
    link: LinkReport | None = None
    answer: str = "json"

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", list(self.units))


def encode_request(req: Request) -> bytes:
    """The envelope's bytes (raises :class:`WireError` on values out of range)."""
    if req.framing not in ("sample", "session"):
        raise WireError(f"framing must be 'sample' or 'session', got {req.framing!r}")
    if req.answer not in ANSWER_FORMS:
        raise WireError(f"answer must be one of {ANSWER_FORMS}, got {req.answer!r}")
    if not 0 <= req.rid < 1 << 64 or not 0 <= req.seq < 1 << 32:
        raise WireError("request id must fit in 64 bits and seq in 32 bits")
    if len(req.header) > 0xFFFF or len(req.units) > MAX_UNITS - 1:
        raise WireError("header or unit count too large")
    flags = ((_SESSION if req.framing == "session" else 0) | (_HAS_REPORT if req.link else 0)
             | (_BINARY_ANSWER if req.answer == "binary" else 0))  # fmt: skip
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
    buf = bytes(data)
    size = len(buf)
    # Each read is checked against the bytes left before it is made (struct's unpack_from
    # would raise its own error; the checks name the field instead).
    if size < _FIXED.size:
        _truncated("fixed part", _FIXED.size, 0, size)
    magic, flags, rid, seq = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if flags & ~_ALL_FLAGS:
        raise WireError(f"unknown flags 0x{flags:02x}")
    pos = _FIXED.size
    if pos + 2 > size:
        _truncated("header length", 2, pos, size)
    (hlen,) = _U16.unpack_from(buf, pos)
    pos += 2
    if pos + hlen > size:
        _truncated("header", hlen, pos, size)
    header = buf[pos : pos + hlen]
    pos += hlen
    if pos + 2 > size:
        _truncated("unit count", 2, pos, size)
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    if 4 * n > size - pos:  # every unit takes 4 bytes at least: check before a loop
        raise WireError(f"{n} units declared, only {size - pos} bytes follow")
    units: list[bytes | None] = []
    for i in range(n):
        if pos + 4 > size:
            _truncated(f"unit {i} length", 4, pos, size)
        (length,) = _U32.unpack_from(buf, pos)
        pos += 4
        if length == _LOST:
            units.append(None)
            continue
        if pos + length > size:
            _truncated(f"unit {i}", length, pos, size)
        units.append(buf[pos : pos + length])
        pos += length
    link = None
    if flags & _HAS_REPORT:
        if pos + _REPORT.size > size:
            _truncated("link report", _REPORT.size, pos, size)
        bits, uses, packets, lost, hl, tx = _REPORT.unpack_from(buf, pos)
        pos += _REPORT.size
        if hl > 1 or not math.isfinite(tx) or tx < 0:
            raise WireError("link report out of range")
        link = LinkReport(bits, uses, packets, lost, bool(hl), tx)
    if pos != size:
        raise WireError(f"{size - pos} trailing bytes")
    framing = "session" if flags & _SESSION else "sample"
    answer = "binary" if flags & _BINARY_ANSWER else "json"
    return Request(rid, seq, header, units, framing, link, answer)


def _truncated(what: str, n: int, pos: int, size: int):
    raise WireError(f"truncated: {what} needs {n} bytes at offset {pos}, {size - pos} left")


def parse_requests(envelopes: Sequence[bytes]) -> list[Request | WireError]:
    """The envelopes of one call (or of everything a connection delivered at once) parsed
    in one pass: per envelope, in order, its :class:`Request` or the :class:`WireError` it
    was refused with, so that one bad sample fails alone."""
    out: list[Request | WireError] = []
    for env in envelopes:
        try:
            out.append(parse_request(env))
        except WireError as e:
            out.append(e)
    return out


def with_link(data: bytes, link: LinkReport, delivered: list) -> bytes:
    """The request ``data`` with its units replaced by ``delivered`` and ``link`` set."""
    req = parse_request(data)
    if len(delivered) != len(req.units):
        raise WireError("delivered units do not match the request's units")
    return encode_request(Request(req.rid, req.seq, req.header, delivered, req.framing, link,
                                  req.answer))


# --- answers -----------------------------------------------------------------------------
_ANSWER_KEYS = {"rid": int, "exit_tier": str, "exit_point": int, "confidence": float,
                "logits": list, "compute_s": dict, "flops": dict, "queue_s": dict,
                "batch": dict, "hops": list, "fallback": (str, type(None))}  # fmt: skip
_HOP_KEYS = ("bits", "channel_uses", "packets", "packets_lost", "header_lost", "tx_time_s")


#: The binary answer's magic; its last byte is the form's version.
ANSWER_MAGIC = b"FCR1"
_BIN_HEAD = struct.Struct("<4sQHdB")  # magic, rid, exit point, confidence, flags
_BIN_HOP = struct.Struct("<QQIIBdd")  # bits, uses, packets, lost, header lost, tx, concealed
_BIN_MAPS = (("compute_s", struct.Struct("<Bd")), ("queue_s", struct.Struct("<Bd")),
             ("batch", struct.Struct("<BI")), ("flops", struct.Struct("<BQ")))  # fmt: skip
_HAS_FALLBACK = 1


def encode_answer(answer: dict, binary: bool = False) -> bytes:
    """Serialise an answer dict (keys as :func:`parse_answer` checks them): JSON, or the
    binary form (see the module docstring) with ``binary=True``. Raises
    :class:`WireError` (binary form) or ``ValueError`` (JSON) for values either cannot
    hold (non-finite logits, counts over the form's limits)."""
    if binary:
        return _encode_binary(answer)
    return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise WireError(f"tier name of {len(raw)} bytes, at most 255 in the binary form")
    return bytes((len(raw),)) + raw


def _encode_binary(a: dict) -> bytes:
    names: dict[str, int] = {a["exit_tier"]: 0}
    for key, _ in _BIN_MAPS:
        for name in a[key]:
            names.setdefault(name, len(names))
    logits, hops, fallback = a["logits"], a["hops"], a["fallback"]
    if len(names) > 255 or len(hops) > 255 or not 0 < len(logits) <= 0xFFFF:
        raise WireError(f"answer with {len(names)} tiers, {len(hops)} hops, {len(logits)} "
                        "logits: over the binary form's limits (255, 255, 1..65535)")
    if not all(map(math.isfinite, logits)):
        raise WireError("answer logits must be finite numbers")
    try:
        parts = [_BIN_HEAD.pack(ANSWER_MAGIC, a["rid"], a["exit_point"], a["confidence"],
                                _HAS_FALLBACK if fallback is not None else 0),
                 bytes((len(names),)), *map(_name_bytes, names), bytes((0,)),
                 _U16.pack(len(logits)), struct.pack(f"<{len(logits)}f", *logits)]  # fmt: skip
        for key, entry in _BIN_MAPS:
            m = a[key]
            parts.append(bytes((len(m),)))
            parts += [entry.pack(names[k], v) for k, v in m.items()]
        parts.append(bytes((len(hops),)))
        parts += [_BIN_HOP.pack(h["bits"], h["channel_uses"], h["packets"], h["packets_lost"],
                                bool(h["header_lost"]), h["tx_time_s"],
                                h.get("concealed", 0.0)) for h in hops]  # fmt: skip
        if fallback is not None:
            parts.append(_name_bytes(fallback))
    except (struct.error, OverflowError, TypeError, KeyError, AttributeError) as e:
        raise WireError(f"answer cannot be written in the binary form: {e}") from e
    return b"".join(parts)


def parse_answer(data: bytes) -> dict:
    """Parse and check an answer, in either form: every key present with its type, logits
    finite numbers, each hop with its six fields (and ``concealed``, the fraction of the
    sample's packets concealed at that hop, when present; the binary form always has it).
    Raises :class:`WireError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ANSWER_BYTES:
        raise WireError(f"answer of {len(data)} bytes, over {MAX_ANSWER_BYTES}")
    buf = bytes(data)
    if buf[:3] == ANSWER_MAGIC[:3]:
        if buf[:4] != ANSWER_MAGIC:
            raise WireError(f"binary answer of form {buf[:4]!r}: this reads {ANSWER_MAGIC!r}")
        return _parse_binary(buf)
    try:
        ans = json.loads(buf.decode())
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


def _parse_binary(buf: bytes) -> dict:
    """The binary form (magic checked by the caller); every count and length is checked
    against the bytes left before it is used."""
    size = len(buf)
    if size < _BIN_HEAD.size:
        _truncated("binary answer head", _BIN_HEAD.size, 0, size)
    _, rid, point, conf, flags = _BIN_HEAD.unpack_from(buf, 0)
    if flags & ~_HAS_FALLBACK:
        raise WireError(f"binary answer: unknown flags 0x{flags:02x}")
    if not math.isfinite(conf):
        raise WireError("binary answer: confidence is not finite")
    pos = _BIN_HEAD.size

    def name(pos: int, what: str) -> tuple[str, int]:
        if pos >= size:
            _truncated(f"{what} length", 1, pos, size)
        n = buf[pos]
        if pos + 1 + n > size:
            _truncated(what, n, pos + 1, size)
        try:
            return buf[pos + 1 : pos + 1 + n].decode(), pos + 1 + n
        except UnicodeDecodeError as e:
            raise WireError(f"binary answer: {what} is not UTF-8") from e

    def count(pos: int, what: str, each: int) -> int:
        if pos >= size:
            _truncated(f"{what} count", 1, pos, size)
        n = buf[pos]
        if n * each > size - pos - 1:
            raise WireError(f"binary answer: {n} {what} declared, {size - pos - 1} bytes follow")
        return n

    names = []
    k = count(pos, "tier names", 1)
    pos += 1
    for i in range(k):
        nm, pos = name(pos, f"tier name {i}")
        names.append(nm)
    if not names:
        raise WireError("binary answer: no tier names")
    if pos >= size:
        _truncated("exit tier", 1, pos, size)
    if buf[pos] >= len(names):
        raise WireError(f"binary answer: exit tier index {buf[pos]} of {len(names)} names")
    exit_tier = names[buf[pos]]
    pos += 1
    if pos + 2 > size:
        _truncated("logit count", 2, pos, size)
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    if not n or pos + 4 * n > size:
        raise WireError(f"binary answer: {n} logits declared, {size - pos} bytes follow")
    logits = list(struct.unpack_from(f"<{n}f", buf, pos))
    pos += 4 * n
    if not all(map(math.isfinite, logits)):
        raise WireError("answer logits must be finite numbers")
    maps = {}
    for key, entry in _BIN_MAPS:
        k = count(pos, key, entry.size)
        pos += 1
        m = {}
        for _ in range(k):
            i, v = entry.unpack_from(buf, pos)
            pos += entry.size
            if i >= len(names) or not math.isfinite(v):
                raise WireError(f"binary answer: {key} entry names tier {i} of {len(names)}, "
                                f"or its value {v} is not finite")  # fmt: skip
            m[names[i]] = v
        maps[key] = m
    hops = []
    k = count(pos, "hops", _BIN_HOP.size)
    pos += 1
    for _ in range(k):
        bits, uses, packets, lost, hl, tx, conc = _BIN_HOP.unpack_from(buf, pos)
        pos += _BIN_HOP.size
        if hl > 1 or not math.isfinite(tx) or not 0.0 <= conc <= 1.0:
            raise WireError("binary answer: hop header_lost, tx_time_s or concealed out of "
                            "range")  # fmt: skip
        hops.append({"bits": bits, "channel_uses": uses, "packets": packets,
                     "packets_lost": lost, "header_lost": bool(hl), "tx_time_s": tx,
                     "concealed": conc})  # fmt: skip
    fallback = None
    if flags & _HAS_FALLBACK:
        fallback, pos = name(pos, "fallback")
    if pos != size:
        raise WireError(f"binary answer: {size - pos} trailing bytes")
    return {"rid": rid, "exit_tier": exit_tier, "exit_point": point, "confidence": conf,
            "logits": logits, **maps, "hops": hops, "fallback": fallback}
