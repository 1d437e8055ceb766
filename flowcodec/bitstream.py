"""The bitstream container: the unit that crosses a link, one per sample.

A :class:`Bitstream` is a :class:`Header` (what a receiver needs to decode), a sample
sequence number ``seq`` and a list of packets, each independently decodable by its codec.
Every packet is framed with its index, its length and a CRC-32, so a receiver can tell a
damaged packet from a good one and report it as lost instead of decoding wrong values.
A packet's CRC also covers what binds it to its sample: the header's CRC (codec,
configuration, meta, packet count and ``seq``) and its index, so a packet spliced in from
another stream or another sample, or delivered at another index, fails its CRC.

A stream also has a *session framing* (:meth:`Bitstream.to_compact`): when sender and
receiver have exchanged the header once for a session, each sample needs only a 5-byte
prefix and, per packet, a length and a CRC-16 (3 bytes for payloads under 128 bytes)
instead of the 48-odd header bytes and 10 bytes per packet of the self-contained form.
There the CRC-16 covers the session tag, ``seq`` and the packet index besides the packet.

The byte layout is documented in ``docs/bitstream.md``. Parsing checks every length and
count against the size of the input before it allocates anything; anything malformed
raises :class:`BitstreamError` (a ``ValueError``) with a message saying what is wrong.

Example
-------
>>> from flowcodec.bitstream import Bitstream, Header, TensorSpec
>>> h = Header(codec="raw-fp16", fingerprint=b"\\0" * 8,
...            tensors=(TensorSpec("float16", (4, 2, 2)),))
>>> bs = Bitstream(h, [b"abc", b"de"])
>>> Bitstream.from_bytes(bs.to_bytes()) == bs
True
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowcodec.framing import (
    CRC32,
    MAX_PACKETS,
    PACKET_OVERHEAD,
    BitstreamError,
    Reader,
    crc16,
    frame_packet,
    parse_packet,
    read_varint,
    varint,
)

__all__ = [
    "MAGIC",
    "VERSION",
    "DTYPES",
    "MAX_PACKETS",
    "MAX_ELEMENTS",
    "BitstreamError",
    "TensorSpec",
    "Header",
    "Bitstream",
    "fingerprint",
    "frame_packet",
    "parse_packet",
    "varint",
    "COMPACT_TAG",
    "session_tag",
    "MAX_SEQ",
    "PACKET_OVERHEAD",
]

MAGIC = b"FLWC"
VERSION = 2
MAX_NDIM = 8
MAX_TENSORS = 16
MAX_CODEC_NAME = 64
MAX_META = 65535
#: Upper bound on the elements a header may declare for one tensor (2**28 = 268 M), so
#: that a decoder never allocates a buffer sized by an untrusted header beyond this.
MAX_ELEMENTS = 1 << 28

#: dtype name <-> one-byte code in the header.
DTYPES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "uint8": 4,
    "int8": 5,
    "int16": 6,
    "int32": 7,
    "int64": 8,
    "bool": 9,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_HEAD_FIXED = struct.Struct("<4sBB")  # magic, version, flags
COMPACT_TAG = 0xC2  # first byte of a session-framed sample (a full stream starts with "F")
MAX_SEQ = (1 << 32) - 1  # sample sequence numbers are u32 (varint on the wire)


def fingerprint(config: object) -> bytes:
    """Eight bytes identifying a codec configuration (SHA-256 of its canonical JSON).

    A decoder compares the fingerprint in a header with its own before decoding, so a
    stream made by a differently configured codec is refused instead of misread.
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).digest()[:8]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor the decoder must produce (per sample, no batch dim)."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BitstreamError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPES)}")
        shape = tuple(self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) > MAX_NDIM:
            raise BitstreamError(f"tensor has {len(shape)} dims, at most {MAX_NDIM} allowed")
        n = 1
        for d in shape:
            if not isinstance(d, int) or d < 0 or d >= 1 << 32:
                raise BitstreamError(f"bad dimension {d!r} in shape {shape}")
            n *= d
        if n > MAX_ELEMENTS:
            raise BitstreamError(f"shape {shape} declares {n} elements, over {MAX_ELEMENTS}")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    """What a receiver needs to decode a sample's packets.

    Parameters
    ----------
    codec : str
        Registry name of the codec that wrote the stream (ASCII, at most 64 bytes).
    fingerprint : bytes
        8 bytes from :func:`fingerprint` of the codec's configuration.
    tensors : tuple of TensorSpec
        Shape and dtype of each tensor the decoder returns.
    meta : bytes
        Codec-specific side information (at most 65535 bytes), e.g. quantiser ranges.
    flags : int
        One byte of codec-specific flags.
    """

    codec: str
    fingerprint: bytes
    tensors: tuple[TensorSpec, ...] = ()
    meta: bytes = b""
    flags: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        try:
            name = self.codec.encode("ascii")
        except (UnicodeEncodeError, AttributeError) as e:
            raise BitstreamError(f"codec name must be an ASCII str, got {self.codec!r}") from e
        if not 0 < len(name) <= MAX_CODEC_NAME:
            raise BitstreamError(f"codec name must have 1..{MAX_CODEC_NAME} bytes")
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 8:
            raise BitstreamError("fingerprint must be exactly 8 bytes")
        if len(self.tensors) > MAX_TENSORS:
            raise BitstreamError(f"at most {MAX_TENSORS} tensors per stream")
        if not all(isinstance(t, TensorSpec) for t in self.tensors):
            raise BitstreamError("tensors must be TensorSpec instances")
        if not isinstance(self.meta, bytes) or len(self.meta) > MAX_META:
            raise BitstreamError(f"meta must be bytes of at most {MAX_META} bytes")
        if not isinstance(self.flags, int) or not 0 <= self.flags <= 255:
            raise BitstreamError("flags must be an int in 0..255")

    def to_bytes(self, n_packets: int, seq: int = 0) -> bytes:
        """Header bytes for sample ``seq`` of ``n_packets`` packets (CRC-32 at the end)."""
        if not 0 <= n_packets <= MAX_PACKETS:
            raise BitstreamError(f"packet count {n_packets} outside 0..{MAX_PACKETS}")
        _check_seq(seq)
        name = self.codec.encode("ascii")
        parts = [
            _HEAD_FIXED.pack(MAGIC, VERSION, self.flags),
            struct.pack("<B", len(name)),
            name,
            self.fingerprint,
            struct.pack("<B", len(self.tensors)),
        ]
        for t in self.tensors:
            parts.append(struct.pack("<BB", DTYPES[t.dtype], len(t.shape)))
            parts.append(struct.pack(f"<{len(t.shape)}I", *t.shape))
        parts.append(struct.pack("<H", len(self.meta)))
        parts.append(self.meta)
        parts.append(struct.pack("<H", n_packets))
        parts.append(varint(seq))
        body = b"".join(parts)
        return body + CRC32.pack(zlib.crc32(body))

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> tuple[Header, int, int]:
        """Parse a header at the start of ``data``.

        Returns ``(header, n_packets, header_size)``. Raises :class:`BitstreamError`
        naming the field at fault when the bytes are not a valid header.
        """
        header, n_packets, _, size = _parse_header(bytes(data))
        return header, n_packets, size


def _check_seq(seq: int) -> None:
    if not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise BitstreamError(f"sample sequence number must be an int in 0..{MAX_SEQ}, "
                             f"got {seq!r}")  # fmt: skip


def _parse_header(buf: bytes) -> tuple[Header, int, int, int]:
    """``(header, n_packets, seq, header_size)`` of the header at the start of ``buf``."""
    r = Reader(buf)
    magic, version, flags = r.unpack(_HEAD_FIXED, "fixed header")
    if magic != MAGIC:
        raise BitstreamError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise BitstreamError(f"unsupported format version {version}, this reads {VERSION}")
    (name_len,) = r.unpack(struct.Struct("<B"), "codec name length")
    if not 0 < name_len <= MAX_CODEC_NAME:
        raise BitstreamError(f"codec name length {name_len} outside 1..{MAX_CODEC_NAME}")
    raw_name = r.take(name_len, "codec name")
    try:
        codec = raw_name.decode("ascii")
    except UnicodeDecodeError as e:
        raise BitstreamError("codec name is not ASCII") from e
    fp = r.take(8, "fingerprint")
    (n_tensors,) = r.unpack(struct.Struct("<B"), "tensor count")
    if n_tensors > MAX_TENSORS:
        raise BitstreamError(f"tensor count {n_tensors} over {MAX_TENSORS}")
    tensors = []
    for i in range(n_tensors):
        code, ndim = r.unpack(struct.Struct("<BB"), f"tensor {i} dtype/ndim")
        if code not in _DTYPE_NAMES:
            raise BitstreamError(f"tensor {i}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise BitstreamError(f"tensor {i}: {ndim} dims, at most {MAX_NDIM}")
        shape = r.unpack(struct.Struct(f"<{ndim}I"), f"tensor {i} shape")
        tensors.append(TensorSpec(_DTYPE_NAMES[code], tuple(shape)))
    (meta_len,) = r.unpack(struct.Struct("<H"), "meta length")
    meta = r.take(meta_len, "meta")
    (n_packets,) = r.unpack(struct.Struct("<H"), "packet count")
    seq = read_varint(r, "sample sequence number")
    end = r.pos
    (crc,) = r.unpack(CRC32, "header CRC")
    if zlib.crc32(buf[:end]) != crc:
        raise BitstreamError("header CRC mismatch: the header is corrupted")
    if seq > MAX_SEQ:
        raise BitstreamError(f"sample sequence number {seq} over {MAX_SEQ}")
    header = Header(codec=codec, fingerprint=fp, tensors=tuple(tensors), meta=meta,
                    flags=flags)  # fmt: skip
    return header, n_packets, seq, r.pos


def session_tag(header: Header) -> bytes:
    """Two bytes tying session-framed samples to their session's header (its CRC-32's low
    16 bits): a sample decoded against another session's header is refused."""
    # Over the header without its own CRC: a CRC over data plus its CRC is a constant.
    return struct.pack("<H", zlib.crc32(header.to_bytes(0)[: -CRC32.size]) & 0xFFFF)


@dataclass
class Bitstream:
    """One sample's encoded features: a header, a sequence number and packets.

    ``packets[i]`` is the payload of packet ``i`` (bytes), or ``None`` when that packet
    was lost or failed its CRC. ``seq`` (0..2^32-1, default 0) numbers the samples of a
    sender: it travels in the header (varint) and every packet's CRC covers it, so a
    sender that numbers its samples gets packets that cannot be moved from one sample to
    another. Rate is ``8 * len(to_bytes())``: headers and packet framing included.
    """

    header: Header
    packets: list[bytes | None] = field(default_factory=list)
    seq: int = 0

    def __post_init__(self) -> None:
        self.packets = list(self.packets)
        if not isinstance(self.header, Header):
            raise BitstreamError(f"header must be a Header, got {type(self.header).__name__}")
        if len(self.packets) > MAX_PACKETS:
            raise BitstreamError(f"{len(self.packets)} packets, at most {MAX_PACKETS}")
        for i, p in enumerate(self.packets):
            if p is not None and not isinstance(p, bytes | bytearray):
                raise BitstreamError(f"packet {i} must be bytes or None, got {type(p).__name__}")
        _check_seq(self.seq)

    # --- whole-stream serialisation ---------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise header and all packets. Every packet must be present."""
        if any(p is None for p in self.packets):
            lost = [i for i, p in enumerate(self.packets) if p is None]
            raise BitstreamError(f"cannot serialise a stream with lost packets {lost}")
        return self.header_bytes() + b"".join(self.link_packets())

    @property
    def nbytes(self) -> int:
        """Size in bytes of :meth:`to_bytes` (header and framing included)."""
        return len(self.header_bytes()) + sum(
            len(p) + PACKET_OVERHEAD for p in self.packets if p is not None
        )

    def binding(self) -> bytes:
        """What every packet's CRC-32 covers besides the packet: the header's own CRC-32
        (over codec, fingerprint, tensors, meta, packet count and ``seq``)."""
        return self.header_bytes()[-CRC32.size :]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Bitstream:
        """Parse a whole stream.

        A packet whose CRC fails comes back as ``None`` (lost); that includes a packet
        written for another header, another ``seq`` or another index. Anything else
        malformed (bad magic, truncation, lengths or counts inconsistent with the input,
        trailing bytes, out-of-order packets) raises :class:`BitstreamError`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BitstreamError(f"expected bytes, got {type(data).__name__}")
        buf = bytes(data)
        header, n_packets, seq, pos = _parse_header(buf)
        bind = buf[pos - CRC32.size : pos]
        # Each packet takes at least PACKET_OVERHEAD bytes: check before building a list.
        if n_packets * PACKET_OVERHEAD > len(buf) - pos:
            raise BitstreamError(
                f"header declares {n_packets} packets but only {len(buf) - pos} bytes follow"
            )
        packets: list[bytes | None] = []
        for i in range(n_packets):
            index, payload, pos = parse_packet(buf, pos, bind)
            if index != i and payload is not None:
                raise BitstreamError(f"packet {i} carries index {index}")
            packets.append(payload)
        if pos != len(buf):
            raise BitstreamError(f"{len(buf) - pos} trailing bytes after the last packet")
        return cls(header, packets, seq)

    # --- session framing ---------------------------------------------------------------
    def _session_prefix(self) -> bytes:
        """What each session-framed CRC-16 covers before the packet: tag and ``seq``."""
        return session_tag(self.header) + varint(self.seq)

    def to_compact(self) -> bytes:
        """The sample in session framing, for a receiver that already holds the header.

        Layout: ``0xC2 | session tag (2) | seq (varint) | packet count (varint) |`` then
        per packet ``length (varint) | payload | CRC-16`` where the CRC-16 covers session
        tag, seq, packet index (varint), length and payload. The header itself travels
        once per session (:meth:`header_bytes`).
        """
        if any(p is None for p in self.packets):
            raise BitstreamError(f"cannot serialise a stream with lost packets {self.lost}")
        prefix = self._session_prefix()
        parts = [bytes((COMPACT_TAG,)), prefix, varint(len(self.packets))]
        for i, p in enumerate(self.packets):
            framed = varint(len(p)) + bytes(p)
            parts += [framed, crc16(prefix + varint(i) + framed)]
        return b"".join(parts)

    @property
    def compact_nbytes(self) -> int:
        """Size in bytes of :meth:`to_compact`."""
        return 3 + len(varint(self.seq)) + len(varint(len(self.packets))) + sum(
            len(varint(len(p))) + len(p) + 2 for p in self.packets if p is not None
        )

    @classmethod
    def from_compact(cls, data: bytes | bytearray | memoryview, header: Header) -> Bitstream:
        """Parse a session-framed sample written for ``header``'s session.

        A packet whose CRC-16 fails comes back as ``None`` (lost). A wrong tag or session,
        truncation, counts or lengths the input cannot hold, and trailing bytes raise
        :class:`BitstreamError`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BitstreamError(f"expected bytes, got {type(data).__name__}")
        if not isinstance(header, Header):
            raise BitstreamError(f"header must be a Header, got {type(header).__name__}")
        buf = bytes(data)
        r = Reader(buf)
        tag, sess = r.take(1, "compact tag")[0], r.take(2, "session tag")
        if tag != COMPACT_TAG:
            raise BitstreamError(f"bad compact tag 0x{tag:02x}, expected 0x{COMPACT_TAG:02x}")
        if sess != session_tag(header):
            raise BitstreamError("sample belongs to another session (session tag mismatch)")
        seq = read_varint(r, "sample sequence number")
        if seq > MAX_SEQ:
            raise BitstreamError(f"sample sequence number {seq} over {MAX_SEQ}")
        prefix = sess + varint(seq)
        n_packets = read_varint(r, "packet count")
        if n_packets > MAX_PACKETS or 3 * n_packets > len(buf) - r.pos:
            raise BitstreamError(
                f"{n_packets} packets declared, {len(buf) - r.pos} bytes follow (3 per packet "
                f"at least, at most {MAX_PACKETS} packets)"
            )
        packets: list[bytes | None] = []
        for i in range(n_packets):
            start = r.pos
            length = read_varint(r, f"packet {i} length")
            payload = r.take(length, f"packet {i} payload")
            crc = r.take(2, f"packet {i} CRC")
            ok = crc16(prefix + varint(i) + buf[start : r.pos - 2]) == crc
            packets.append(payload if ok else None)
        if r.pos != len(buf):
            raise BitstreamError(f"{len(buf) - r.pos} trailing bytes after the last packet")
        return cls(header, packets, seq)

    # --- what a link carries ----------------------------------------------------------
    def units(self, framing: str = "sample") -> list[bytes]:
        """The link packets one sample sends.

        ``framing="sample"``: the header, then each packet framed by :meth:`link_packets`
        (a self-contained sample). ``framing="session"``: the header went once at session
        set-up, so only the packets, each as ``index (varint) | payload | CRC-16``, the
        CRC-16 covering session tag, ``seq``, index and payload (the receiver passes the
        ``seq`` it expects to :meth:`from_units`).
        """
        if framing == "sample":
            return [self.header_bytes(), *self.link_packets()]
        if framing == "session":
            prefix = self._session_prefix()
            out = []
            for i, p in enumerate(self.packets):
                if p is None:
                    raise BitstreamError(f"packet {i} is lost and cannot be sent")
                body = varint(i) + bytes(p)
                out.append(body + crc16(prefix + body))
            return out
        raise BitstreamError(f"framing must be 'sample' or 'session', got {framing!r}")

    @classmethod
    def from_units(cls, header: Header, delivered: Sequence[bytes | None],
                   framing: str = "sample", seq: int = 0) -> Bitstream:  # fmt: skip
        """Rebuild a sample from the :meth:`units` a link delivered (``None``: lost).

        With ``framing="sample"`` a lost or damaged header loses every packet (nothing can
        be decoded without it), and ``seq`` comes from the header unit; a unit whose
        index or CRC is wrong is reported lost. With ``framing="session"`` the units
        carry no ``seq``: pass the one the sample was sent with (a unit of another sample,
        session or index fails its CRC and is reported lost).
        """
        if not isinstance(header, Header):
            raise BitstreamError(f"header must be a Header, got {type(header).__name__}")
        _check_seq(seq)
        if framing == "sample":
            if not delivered:
                raise BitstreamError("no header unit")
            head, body = delivered[0], list(delivered[1:])
            ok = head is not None
            if ok:
                try:
                    hdr, n, got_seq, size = _parse_header(bytes(head))
                    ok = hdr == header and n == len(body) and size == len(head)
                except BitstreamError:
                    ok = False
            if not ok:
                return cls(header, [None] * len(body), seq)
            return cls._from_framed(header, body, got_seq, bytes(head[-CRC32.size :]))
        if framing != "session":
            raise BitstreamError(f"framing must be 'sample' or 'session', got {framing!r}")
        prefix = session_tag(header) + varint(seq)
        out: list[bytes | None] = []
        for i, u in enumerate(delivered):
            payload = None
            if u is not None and len(u) >= 3:
                u = bytes(u)
                try:
                    r = Reader(u)
                    index = read_varint(r, "packet index")
                    ok = index == i and r.pos <= len(u) - 2  # the index ends before the CRC
                    if ok and crc16(prefix + u[:-2]) == u[-2:]:
                        payload = u[r.pos : -2]
                except BitstreamError:
                    payload = None
            out.append(payload)
        return cls(header, out, seq)

    def header_bytes(self) -> bytes:
        """The header alone (with this sample's ``seq``), as sent ahead of the packets."""
        return self.header.to_bytes(len(self.packets), self.seq)

    def link_packets(self) -> list[bytes]:
        """Each packet framed (index, length, payload, CRC-32): the units a link carries.
        Their CRCs cover :meth:`binding` (this sample's header CRC)."""
        bind = self.binding()
        out = []
        for i, p in enumerate(self.packets):
            if p is None:
                raise BitstreamError(f"packet {i} is lost and cannot be sent")
            out.append(frame_packet(i, bytes(p), bind))
        return out

    @classmethod
    def from_packets(cls, header: Header | bytes, packets: Sequence[bytes | None],
                     seq: int = 0) -> Bitstream:  # fmt: skip
        """Rebuild a stream from what a link delivered.

        ``header`` is a :class:`Header` (then ``seq`` says which sample the packets belong
        to) or the header's bytes (which carry ``seq``); ``packets[i]`` is the framed
        packet ``i`` as produced by :meth:`link_packets`, or ``None`` when the link lost
        it. A packet whose framing, index or CRC is wrong (a packet of another stream or
        sample included) is reported as lost (``None``).
        """
        if isinstance(header, bytes | bytearray | memoryview):
            raw = bytes(header)
            hdr, n_packets, seq, size = _parse_header(raw)
            if size != len(raw):
                raise BitstreamError(f"{len(raw) - size} trailing bytes after the header")
            if n_packets != len(packets):
                raise BitstreamError(
                    f"header declares {n_packets} packets, {len(packets)} were given"
                )
            bind = raw[-CRC32.size :]
        elif isinstance(header, Header):
            hdr = header
            _check_seq(seq)
            bind = header.to_bytes(len(packets), seq)[-CRC32.size :]
        else:
            raise BitstreamError(f"header must be Header or bytes, got {type(header).__name__}")
        return cls._from_framed(hdr, packets, seq, bind)

    @classmethod
    def _from_framed(cls, header: Header, packets: Sequence[bytes | None], seq: int,
                     bind: bytes) -> Bitstream:  # fmt: skip
        if len(packets) > MAX_PACKETS:
            raise BitstreamError(f"{len(packets)} packets, at most {MAX_PACKETS}")
        out: list[bytes | None] = []
        for i, framed in enumerate(packets):
            if framed is None:
                out.append(None)
                continue
            try:
                index, payload, end = parse_packet(bytes(framed), 0, bind)
            except BitstreamError:
                out.append(None)
                continue
            out.append(payload if (index == i and end == len(framed)) else None)
        return cls(header, out, seq)

    @property
    def lost(self) -> list[int]:
        """Indices of packets that are missing."""
        return [i for i, p in enumerate(self.packets) if p is None]
