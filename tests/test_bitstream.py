"""The bitstream container: round trips, malformed input, bit flips and truncation."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from helpers import STREAM_CODECS as CODECS
from helpers import ready_small as ready
from helpers import small_features as _features
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import (
    DTYPES,
    MAX_ELEMENTS,
    PACKET_OVERHEAD,
    Bitstream,
    BitstreamError,
    Header,
    TensorSpec,
    fingerprint,
    frame_packet,
)
from flowcodec.codecs.entropy import BYPASS_LIMIT

SAFE = (BitstreamError,)
shapes = st.lists(st.integers(0, 64), min_size=0, max_size=4).map(tuple)
specs = st.builds(TensorSpec, st.sampled_from(sorted(DTYPES)), shapes)
headers = st.builds(
    Header,
    codec=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64),
    fingerprint=st.binary(min_size=8, max_size=8),
    tensors=st.lists(specs, max_size=3).map(tuple),
    meta=st.binary(max_size=64),
    flags=st.integers(0, 255),
)
payloads = st.lists(st.binary(max_size=48), min_size=0, max_size=6)
streams = st.builds(Bitstream, headers, payloads)


@given(streams)
def test_round_trip(bs):
    data = bs.to_bytes()
    assert len(data) == bs.nbytes
    assert Bitstream.from_bytes(data) == bs


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise(data):
    try:
        bs = Bitstream.from_bytes(data)
    except BitstreamError:
        return
    # Whatever parses must serialise back to the same bytes when no packet was lost.
    if not bs.lost:
        assert bs.to_bytes() == data


@given(streams, st.data())
def test_arbitrary_mutation_parse_or_raise(bs, data):
    raw = bytearray(bs.to_bytes())
    if not raw:
        return
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        out = Bitstream.from_bytes(bytes(raw))
    except BitstreamError:
        return
    for got, want in zip(out.packets, bs.packets):
        assert got is None or got == want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=3))
def test_every_single_bit_flip_in_packets_is_detected(header, packets):
    bs = Bitstream(header, packets)
    _assert_flips_detected(bs.to_bytes(), len(bs.header_bytes()), Bitstream.from_bytes, packets)


def _assert_flips_detected(raw, start, parse, packets):
    """Every single-bit flip from byte ``start`` on raises or marks a packet lost, and no
    packet that comes back differs from what was sent."""
    for bit in range(8 * start, 8 * len(raw)):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            out = parse(bytes(flipped))
        except BitstreamError:
            continue
        assert out.lost, f"flip of bit {bit} went undetected"
        for got, want in zip(out.packets, packets):
            assert got is None or got == want


@settings(max_examples=40, deadline=None)
@given(headers)
def test_every_single_bit_flip_in_header_is_detected(header):
    raw = Bitstream(header, [b"x"]).to_bytes()
    for bit in range(8 * len(Bitstream(header, [b"x"]).header_bytes())):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BitstreamError):
            Bitstream.from_bytes(bytes(flipped))


@pytest.mark.parametrize("framing", ["self-contained", "session"])
@settings(max_examples=30, deadline=None)
@given(bs=streams)
def test_truncation_at_every_offset_is_detected(framing, bs):
    if framing == "session":
        raw, parse = bs.to_compact(), lambda b: Bitstream.from_compact(b, bs.header)
    else:
        raw, parse = bs.to_bytes(), Bitstream.from_bytes
    for cut in range(len(raw)):
        with pytest.raises(BitstreamError):
            parse(raw[:cut])


def test_trailing_bytes_rejected():
    raw = Bitstream(Header("c", b"\0" * 8), [b"abc"]).to_bytes()
    with pytest.raises(BitstreamError, match="trailing"):
        Bitstream.from_bytes(raw + b"\0")


def test_huge_declared_packet_count_fails_before_allocating():
    h = Header("c", b"\0" * 8)
    body = h.to_bytes(65535)  # declares 65,535 packets, none follow
    with pytest.raises(BitstreamError, match="declares 65535 packets"):
        Bitstream.from_bytes(body)


def test_huge_declared_packet_length_is_truncation():
    h = Header("c", b"\0" * 8)
    frame = struct.pack("<HI", 0, 2**32 - 1) + b"abc"
    with pytest.raises(BitstreamError, match="truncated"):
        Bitstream.from_bytes(h.to_bytes(1) + frame + b"\0" * PACKET_OVERHEAD)


def test_shape_over_element_limit_rejected():
    with pytest.raises(BitstreamError, match="elements"):
        TensorSpec("float32", (MAX_ELEMENTS, 2))


def test_wrong_magic_and_version_named():
    raw = bytearray(Bitstream(Header("c", b"\0" * 8), []).to_bytes())
    with pytest.raises(BitstreamError, match="magic"):
        Bitstream.from_bytes(b"XXXX" + bytes(raw[4:]))
    raw[4] = 99
    with pytest.raises(BitstreamError, match="version"):
        Bitstream.from_bytes(bytes(raw))


def test_non_bytes_input_is_bitstream_error():
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes("not bytes")  # type: ignore[arg-type]


@given(streams, st.data())
def test_from_packets_marks_lost_and_corrupt(bs, data):
    framed = bs.link_packets()
    delivered: list[bytes | None] = []
    expect: list[bytes | None] = []
    for p, payload in zip(framed, bs.packets):
        action = data.draw(st.sampled_from(["ok", "lost", "flip"]))
        if action == "ok":
            delivered.append(p)
            expect.append(payload)
        elif action == "lost":
            delivered.append(None)
            expect.append(None)
        else:
            b = bytearray(p)
            k = data.draw(st.integers(0, 8 * len(b) - 1))
            b[k // 8] ^= 1 << (k % 8)
            delivered.append(bytes(b))
            expect.append(None)
    out = Bitstream.from_packets(bs.header_bytes(), delivered)
    assert out.header == bs.header
    assert out.packets == expect
    with pytest.raises(BitstreamError):
        Bitstream.from_packets(bs.header_bytes(), delivered + [None])


def test_packet_delivered_at_wrong_index_is_lost():
    bs = Bitstream(Header("c", b"\0" * 8), [b"first", b"second"])
    a, b = bs.link_packets()
    out = Bitstream.from_packets(bs.header, [b, a])
    assert out.packets == [None, None]


def test_lost_packets_cannot_be_serialised():
    bs = Bitstream(Header("c", b"\0" * 8), [b"a", None])
    with pytest.raises(BitstreamError, match="lost"):
        bs.to_bytes()


def test_fingerprint_depends_on_config():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 8


def test_frame_layout_is_documented_layout():
    framed = frame_packet(3, b"xy")
    import zlib

    assert framed[:6] == struct.pack("<HI", 3, 2)
    assert framed[6:8] == b"xy"
    assert framed[8:] == struct.pack("<I", zlib.crc32(framed[:8]))


# --- session framing ------------------------------------------------------------------
@given(streams)
def test_compact_round_trip(bs):
    data = bs.to_compact()
    assert len(data) == bs.compact_nbytes
    assert Bitstream.from_compact(data, bs.header) == bs


@given(st.binary(max_size=200))
def test_compact_arbitrary_bytes_parse_or_raise(data):
    header = Header("factorized", b"\1" * 8, (TensorSpec("float32", (4, 2, 2)),))
    try:
        bs = Bitstream.from_compact(data, header)
    except BitstreamError:
        return
    if not bs.lost:
        assert bs.to_compact() == data


@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.lists(st.binary(min_size=1, max_size=140), min_size=1, max_size=3))
def test_compact_every_single_bit_flip_is_detected(header, packets):
    bs = Bitstream(header, packets)
    _assert_flips_detected(bs.to_compact(), 0, lambda b: Bitstream.from_compact(b, header),
                           packets)  # fmt: skip


def test_compact_refuses_another_session_and_a_full_stream():
    a = Header("factorized", b"\1" * 8)
    b = Header("factorized", b"\2" * 8)
    raw = Bitstream(a, [b"abc"]).to_compact()
    with pytest.raises(BitstreamError, match="another session"):
        Bitstream.from_compact(raw, b)
    with pytest.raises(BitstreamError, match="compact tag"):
        Bitstream.from_compact(Bitstream(a, [b"abc"]).to_bytes(), a)


def test_compact_layout_is_documented_layout():
    from flowcodec.bitstream import COMPACT_TAG, session_tag

    h = Header("factorized", b"\1" * 8, (TensorSpec("float32", (64, 16, 16)),))
    payload = bytes(range(200))
    raw = Bitstream(h, [payload, b"z"]).to_compact()
    # tag, session, seq 0, count 2, then varint 200 = c8 01, payload, CRC-16; varint 1, "z",
    # CRC-16
    assert raw[:5] == bytes((COMPACT_TAG,)) + session_tag(h) + b"\x00\x02"
    assert raw[5:7] == b"\xc8\x01" and raw[7:207] == payload
    assert raw[209:211] == b"\x01z" and len(raw) == 213
    # 59 bytes of header and framing in the self-contained form, 9 here, for one packet
    one = Bitstream(h, [payload])
    assert one.nbytes - len(payload) == 59 and one.compact_nbytes - len(payload) == 9


@settings(max_examples=60)
@given(streams, st.data())
def test_units_round_trip_and_mark_losses(bs, data):
    for framing in ("sample", "session"):
        units = bs.units(framing)
        assert len(units) == len(bs.packets) + (framing == "sample")
        assert Bitstream.from_units(bs.header, units, framing) == bs
        drop = data.draw(st.lists(st.booleans(), min_size=len(units), max_size=len(units)))
        got = [None if d else u for d, u in zip(drop, units)]
        out = Bitstream.from_units(bs.header, got, framing)
        body = drop[1:] if framing == "sample" else drop
        head_lost = framing == "sample" and drop[0]
        for d, p, want in zip(body, out.packets, bs.packets):
            assert p == (None if (d or head_lost) else want)


def test_session_units_with_a_wrong_index_or_crc_are_lost():
    bs = Bitstream(Header("c", b"\0" * 8), [b"abc", b"defg"])
    a, b = bs.units("session")
    assert Bitstream.from_units(bs.header, [b, a], "session").packets == [None, None]
    broken = bytearray(a)
    broken[1] ^= 0x10
    assert Bitstream.from_units(bs.header, [bytes(broken), b], "session").packets == [
        None, b"defg"]
    with pytest.raises(BitstreamError, match="framing"):
        bs.units("frame")


# --- binding: a packet belongs to one stream, one sample and one index ----------------------
def _two_samples():
    h = Header("factorized", b"\1" * 8, (TensorSpec("float32", (4, 2, 2)),))
    return Bitstream(h, [b"abcd", b"efgh"], seq=7), Bitstream(h, [b"ijkl", b"mnop"], seq=8)


@pytest.mark.parametrize("framing", ["self-contained", "sample", "session", "compact"])
def test_packets_spliced_from_another_sample_or_stream_are_lost(framing):
    a, b = _two_samples()
    other = Bitstream(Header("factorized", b"\2" * 8, a.header.tensors), [b"abcd", b"efgh"],
                      seq=7)  # fmt: skip
    for donor in (b, other):
        if framing == "self-contained":
            raw = a.header_bytes() + donor.link_packets()[0] + a.link_packets()[1]
            out = Bitstream.from_bytes(raw)
        elif framing == "sample":
            units = a.units("sample")
            units[1] = donor.units("sample")[1]
            out = Bitstream.from_units(a.header, units, "sample")
        elif framing == "session":
            units = a.units("session")
            units[0] = donor.units("session")[0]
            out = Bitstream.from_units(a.header, units, "session", seq=a.seq)
        else:
            if donor.header != a.header:
                continue  # another session's compact sample is refused whole (tag)
            raw = bytearray(a.to_compact())
            spliced = donor.to_compact()
            # same lengths: swap packet 0 (length varint, payload, CRC) from the donor
            raw[5:12] = spliced[5:12]
            out = Bitstream.from_compact(bytes(raw), a.header)
        assert out.packets[0] is None, framing
        assert out.packets[1] == a.packets[1]


def test_packets_reordered_or_replayed_at_another_index_are_lost():
    a, _ = _two_samples()
    p0, p1 = a.link_packets()
    out = Bitstream.from_packets(a.header, [p1, p0], seq=a.seq)
    assert out.packets == [None, None]
    # the right seq is needed with a Header object, and taken from header bytes otherwise
    assert Bitstream.from_packets(a.header, [p0, p1]).packets == [None, None]
    assert Bitstream.from_packets(a.header, [p0, p1], seq=7) == a
    assert Bitstream.from_packets(a.header_bytes(), [p0, p1]) == a
    s0, s1 = a.units("session")
    assert Bitstream.from_units(a.header, [s0, s1], "session", seq=8).packets == [None, None]
    assert Bitstream.from_units(a.header, [s0, s1], "session", seq=7) == a
    assert Bitstream.from_compact(a.to_compact(), a.header) == a


@given(st.integers(0, 2**32 - 1))
def test_seq_round_trips_in_every_framing(seq):
    h = Header("raw", b"\0" * 8)
    bs = Bitstream(h, [b"x", b""], seq=seq)
    assert Bitstream.from_bytes(bs.to_bytes()) == bs
    assert Bitstream.from_compact(bs.to_compact(), h) == bs
    assert len(bs.to_compact()) == bs.compact_nbytes and len(bs.to_bytes()) == bs.nbytes
    assert Bitstream.from_units(h, bs.units("sample"), "sample") == bs
    assert Bitstream.from_units(h, bs.units("session"), "session", seq=seq) == bs


def test_bad_seq_is_refused():
    h = Header("raw", b"\0" * 8)
    for bad in (-1, 2**32, 1.5):
        with pytest.raises(BitstreamError, match="sequence"):
            Bitstream(h, [b"x"], seq=bad)


# --- streams of the small feature codecs (issue 14, hole 4) ---------------------------------
@pytest.mark.parametrize("framing", ["sample", "session"])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_packets_of_another_sample_or_codec_are_lost_not_decoded(name, framing):
    codec = ready(name)
    a, b = codec.compress(_features(2, seed=3))
    a.seq, b.seq = 10, 11
    other = ready("raw" if name != "raw" else "quant").compress(_features(1))[0]
    other.seq = 10
    for donor in (b, other):
        units = a.units(framing)
        donor_units = donor.units(framing)
        off = 1 if framing == "sample" else 0
        units[off] = donor_units[off]
        got = Bitstream.from_units(a.header, units, framing, seq=a.seq)
        assert got.packets[0] is None and got.packets[1] == a.packets[1]
        out = codec.decompress([got])
        assert torch.isfinite(out).all()


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.binary(max_size=300))
def test_random_bytes_are_a_bitstream_error_or_a_stream(name, data):
    codec = ready(name)
    header = codec.compress(_features(1))[0].header
    for parse in (Bitstream.from_bytes, lambda b: Bitstream.from_compact(b, header)):
        try:
            stream = parse(data)
        except BitstreamError:
            continue
        try:
            codec.decompress([stream])
        except SAFE:
            pass


def test_stream_crc_is_what_the_docs_say():
    """The packet CRC-32 of a self-contained stream starts from the CRC-32 of the header's
    own CRC (the binding), as docs/bitstream.md describes."""
    h = Header("raw", b"\0" * 8, (TensorSpec("float32", (1,)),))
    bs = Bitstream(h, [b"abcd"], seq=5)
    head = bs.header_bytes()
    framed = bs.link_packets()[0]
    body = framed[:-4]
    assert struct.unpack("<I", framed[-4:])[0] == zlib.crc32(head[-4:] + body)
    assert BYPASS_LIMIT == 1 << 20
