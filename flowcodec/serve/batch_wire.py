"""Several samples in one call: the batch framing of the serving wire format.

A batch body is ``"FCB1" | count u16 | count x (length u32 | envelope)`` (each envelope a
:func:`~flowcodec.serve.wire.encode_request`'s bytes); a batch answer is ``"FCA1" | count u16 |
count x (kind u8 | length u32 | bytes)``, each entry a sample's answer or its
:class:`SampleError`. Every count and length is checked against the bytes left before it is
used; a fault is a :class:`WireError`, the error every parser of the wire format raises.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WireError", "SampleError", "encode_batch", "parse_batch", "encode_batch_answer",
           "parse_batch_answer", "MAX_BATCH_SAMPLES", "MAX_BATCH_ANSWER_BYTES", "BATCH_MAGIC",
           "BATCH_ANSWER_MAGIC"]

#: At most this many samples in one batch call, whatever a server allows (the count is a
#: u16; servers default to 64, ``ServeConfig.max_samples_per_request``).
MAX_BATCH_SAMPLES = 4096
#: A batch answer larger than this is refused by the client (and never sent by a server).
MAX_BATCH_ANSWER_BYTES = 16 << 20
BATCH_MAGIC = b"FCB1"
BATCH_ANSWER_MAGIC = b"FCA1"
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A request or answer that is not well formed (the message says what is wrong)."""


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
