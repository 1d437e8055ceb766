"""The serving envelope: round trips, and hostile bytes are WireError, never anything else."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcodec.serve.wire import (
    LinkReport,
    Request,
    WireError,
    encode_answer,
    encode_request,
    parse_answer,
    parse_request,
    with_link,
)

units = st.lists(st.one_of(st.none(), st.binary(max_size=64)), max_size=8)
reports = st.one_of(st.none(), st.builds(
    LinkReport, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 65535),
    st.integers(0, 65535), st.booleans(), st.floats(0, 1e6)))  # fmt: skip
# Deadlines off: the tests are short, but they share 2 cores with whatever else runs.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
requests = st.builds(Request, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                     st.binary(max_size=80), units, st.sampled_from(["sample", "session"]),
                     reports)  # fmt: skip


@relaxed
@given(requests)
def test_request_round_trip(req):
    assert parse_request(encode_request(req)) == req


@relaxed
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_wire_error(data):
    try:
        req = parse_request(data)
    except WireError:
        return
    assert encode_request(req) == data  # what parses is exactly one encoding


@relaxed
@given(requests, st.data())
def test_truncation_is_an_error(req, data):
    raw = encode_request(req)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(WireError):
        parse_request(raw[:cut])


@settings(relaxed, max_examples=200)
@given(requests, st.data())
def test_one_byte_mutations_parse_or_error(req, data):
    raw = bytearray(encode_request(req))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        parse_request(bytes(raw))
    except WireError:
        pass


def test_oversized_lengths_are_refused_before_allocation():
    head = struct.pack("<4sBQI", b"FCQ1", 0, 1, 0) + struct.pack("<H", 0)
    # 65535 units declared, 4 bytes follow: refused by the count check.
    with pytest.raises(WireError, match="units declared"):
        parse_request(head + struct.pack("<H", 65535) + b"\0" * 4)
    # one unit of 4 GiB - 2 declared, 3 bytes follow.
    with pytest.raises(WireError, match="truncated"):
        parse_request(head + struct.pack("<H", 1) + struct.pack("<I", 0xFFFFFFFE) + b"abc")
    with pytest.raises(WireError, match="flags"):
        parse_request(struct.pack("<4sBQI", b"FCQ1", 0x80, 1, 0) + b"\0" * 4)


def test_with_link_replaces_units_and_sets_report():
    req = Request(5, 9, b"hdr", [b"a", b"bc"], "session")
    rep = LinkReport(24, 30, 2, 1, False, 0.25)
    out = parse_request(with_link(encode_request(req), rep, [None, b"bc"]))
    assert out.units == [None, b"bc"] and out.link == rep and out.rid == 5


def _answer(**kw):
    ans = {"rid": 1, "exit_tier": "edge", "exit_point": 3, "confidence": 0.5,
           "logits": [0.1, -2.0], "compute_s": {"edge": 0.001}, "flops": {"edge": 10},
           "queue_s": {"edge": 0.0}, "batch": {"edge": 1}, "fallback": None,
           "hops": [{"bits": 8, "channel_uses": 0, "packets": 1, "packets_lost": 0,
                     "header_lost": False, "tx_time_s": 0.0}]}  # fmt: skip
    ans.update(kw)
    return ans


def test_answer_round_trip_keeps_float32_logits_exactly():
    import torch

    lg = torch.randn(10)
    ans = parse_answer(encode_answer(_answer(logits=lg.tolist())))
    assert torch.equal(torch.tensor(ans["logits"], dtype=torch.float32), lg)


@pytest.mark.parametrize("bad", [
    {"logits": []}, {"logits": ["x"]}, {"rid": "1"}, {"hops": [{"bits": 1}]},
    {"compute_s": {"edge": "fast"}}, {"fallback": 3}, {"exit_point": True},
])  # fmt: skip
def test_malformed_answers_are_wire_errors(bad):
    with pytest.raises(WireError):
        parse_answer(encode_answer(_answer(**bad)))


@relaxed
@given(st.binary(max_size=100))
def test_arbitrary_answer_bytes(data):
    try:
        parse_answer(data)
    except WireError:
        pass


def test_answer_size_is_capped():
    with pytest.raises(WireError, match="over"):
        parse_answer(json.dumps(_answer(logits=[0.0] * 300_000)).encode())
