"""Packet framing and the byte-level pieces of the bitstream container.

:func:`frame_packet` / :func:`parse_packet` frame one packet (index, length, payload,
CRC-32 bound to its stream); :func:`varint` / :func:`read_varint` are the unsigned LEB128
counts of the header and the session framing; :func:`crc16` is the session framing's
per-packet check; :class:`Reader` is the bounds-checked cursor every parser reads with.
Anything malformed raises :class:`BitstreamError`. The container itself:
:mod:`flowcodec.bitstream`.
"""

from __future__ import annotations

import binascii
import struct
import zlib

__all__ = ["BitstreamError", "MAX_PACKETS", "PACKET_FRAME", "CRC32", "PACKET_OVERHEAD",
           "MAX_VARINT", "Reader", "frame_packet", "parse_packet", "varint", "read_varint",
           "crc16"]

MAX_PACKETS = 65535
PACKET_FRAME = struct.Struct("<HI")  # index, payload length
CRC32 = struct.Struct("<I")
PACKET_OVERHEAD = PACKET_FRAME.size + CRC32.size  # bytes added to each payload
MAX_VARINT = 5  # bytes of an unsigned LEB128 value below 2^35


class BitstreamError(ValueError):
    """Malformed bitstream bytes, header or packets (the message says what is wrong)."""


class Reader:
    """Bounds-checked cursor over bytes: every read checks the remaining length first."""

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise BitstreamError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.buf) - self.pos} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))


def frame_packet(index: int, payload: bytes, bind: bytes = b"") -> bytes:
    """Frame one packet: ``index (u16) | length (u32) | payload | CRC-32 (u32)``.

    The CRC-32 covers ``bind`` (not sent: the receiver knows it; a stream binds its
    packets with its header's CRC, see :meth:`Bitstream.binding`), then index, length
    and payload.
    """
    if not 0 <= index < MAX_PACKETS:
        raise BitstreamError(f"packet index {index} outside 0..{MAX_PACKETS - 1}")
    if len(payload) >= 1 << 32:
        raise BitstreamError("packet payload too long")
    head = PACKET_FRAME.pack(index, len(payload))
    return head + payload + CRC32.pack(zlib.crc32(head + payload, zlib.crc32(bind)))


def parse_packet(data: bytes, pos: int = 0, bind: bytes = b"") -> tuple[int, bytes | None, int]:
    """Parse one framed packet at ``pos`` (framed with :func:`frame_packet` and ``bind``).

    Returns ``(index, payload_or_None, next_pos)``; the payload is ``None`` when the CRC
    fails. Raises :class:`BitstreamError` when the framing itself is truncated.
    """
    r = Reader(data, pos)
    index, length = r.unpack(PACKET_FRAME, "packet frame")
    payload = r.take(length, f"packet {index} payload")
    (crc,) = r.unpack(CRC32, f"packet {index} CRC")
    body = data[pos : pos + PACKET_FRAME.size + length]
    ok = zlib.crc32(body, zlib.crc32(bind)) == crc
    return index, (payload if ok else None), r.pos


def varint(n: int) -> bytes:
    """``n >= 0`` as an unsigned LEB128 varint (how the header writes counts and sample
    numbers; the one writer of it in flowcodec)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(r: Reader, what: str) -> int:
    value = 0
    for i in range(MAX_VARINT):
        (b,) = r.take(1, what)
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise BitstreamError(f"{what}: over-long varint")
            return value
    raise BitstreamError(f"{what}: varint longer than {MAX_VARINT} bytes")


# Bit reversal of each byte: with the bytes also taken in reverse order, CRC-CCITT runs over
# the bit sequence backwards, which is a CRC with the reciprocal generator
# x^16 + x^11 + x^4 + 1 (see docs/bitstream.md for why not the plain CCITT polynomial).
_BITREV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def crc16(data: bytes) -> bytes:
    """CRC-16 with generator x^16 + x^11 + x^4 + 1 (the reciprocal of CRC-CCITT's), initial
    value 0xFFFF, computed as CRC-CCITT over the bits of ``data`` in reverse order."""
    return struct.pack("<H", binascii.crc_hqx(bytes(data)[::-1].translate(_BITREV), 0xFFFF))
