"""The serving envelope and answers (JSON and binary): round trips, and hostile bytes are
WireError, never anything else."""

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
    parse_requests,
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
                     reports, st.sampled_from(["json", "binary"]))  # fmt: skip


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


# --- the binary answer ---------------------------------------------------------------------
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=12)  # fmt: skip
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
finite = st.floats(allow_nan=False, allow_infinity=False)
hops = st.fixed_dictionaries({
    "bits": st.integers(0, 2**64 - 1), "channel_uses": st.integers(0, 2**64 - 1),
    "packets": st.integers(0, 2**32 - 1), "packets_lost": st.integers(0, 2**32 - 1),
    "header_lost": st.booleans(), "tx_time_s": finite, "concealed": st.floats(0.0, 1.0)})
answers = st.fixed_dictionaries({
    "rid": st.integers(0, 2**64 - 1), "exit_tier": names, "exit_point": st.integers(0, 65535),
    "confidence": finite, "logits": st.lists(f32, min_size=1, max_size=12),
    "compute_s": st.dictionaries(names, finite, max_size=3),
    "queue_s": st.dictionaries(names, finite, max_size=3),
    "batch": st.dictionaries(names, st.integers(0, 2**32 - 1), max_size=3),
    "flops": st.dictionaries(names, st.integers(0, 2**64 - 1), max_size=3),
    "hops": st.lists(hops, max_size=3), "fallback": st.one_of(st.none(), names)})  # fmt: skip


@relaxed
@given(answers)
def test_binary_answer_round_trip(ans):
    assert parse_answer(encode_answer(ans, binary=True)) == ans


@relaxed
@given(answers)
def test_binary_and_json_answers_read_alike(ans):
    assert parse_answer(encode_answer(ans, binary=True)) == parse_answer(encode_answer(ans))


def test_binary_answer_keeps_float32_logits_exactly_and_is_small():
    import torch

    lg = torch.randn(10)
    ans = _answer(logits=lg.tolist())
    ans["hops"][0]["concealed"] = 0.0
    raw = encode_answer(ans, binary=True)
    assert raw[:4] == b"FCR1" and len(raw) < len(encode_answer(ans)) / 2
    assert torch.equal(torch.tensor(parse_answer(raw)["logits"], dtype=torch.float32), lg)


@relaxed
@given(answers, st.data())
def test_binary_answer_truncation_is_a_wire_error(ans, data):
    raw = encode_answer(ans, binary=True)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(WireError):
        parse_answer(raw[:cut])
    with pytest.raises(WireError, match="trailing"):
        parse_answer(raw + b"\0")


@settings(relaxed, max_examples=300)
@given(answers, st.data())
def test_binary_answer_mutations_parse_or_wire_error(ans, data):
    raw = bytearray(encode_answer(ans, binary=True))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    try:
        out = parse_answer(bytes(raw))
    except WireError:
        return
    assert isinstance(out["logits"], list) and out["logits"]  # what parses is well formed


@relaxed
@given(st.binary(max_size=300))
def test_arbitrary_bytes_behind_the_binary_magic(data):
    try:
        parse_answer(b"FCR1" + data)
    except WireError:
        pass


def test_binary_answers_refuse_what_they_cannot_hold():
    with pytest.raises(WireError, match="finite"):
        encode_answer(_answer(logits=[float("nan")]), binary=True)
    with pytest.raises(WireError, match="limits"):
        encode_answer(_answer(flops={f"t{i}": 1 for i in range(300)}), binary=True)
    with pytest.raises(WireError, match="binary form"):
        encode_answer(_answer(logits=[1e39]), binary=True)  # over float32's range
    with pytest.raises(WireError, match="binary form"):
        encode_answer(_answer(rid=-1), binary=True)
    raw = encode_answer(_answer(), binary=True)
    with pytest.raises(WireError, match="FCR9"):  # a later form is refused, not misread
        parse_answer(b"FCR9" + raw[4:])
    with pytest.raises(WireError, match="flags"):
        parse_answer(raw[:22] + b"\x80" + raw[23:])


def test_request_asks_for_its_answer_form():
    req = Request(5, 9, b"hdr", [b"a", None], "session", answer="binary")
    raw = encode_request(req)
    assert raw[4] & 4 and parse_request(raw) == req
    assert parse_request(encode_request(Request(5, 9, b"hdr"))).answer == "json"
    with pytest.raises(WireError, match="answer"):
        encode_request(Request(5, 9, b"hdr", answer="xml"))
    # the proxy's re-encoding keeps the form asked for
    out = parse_request(with_link(raw, LinkReport(8, 4, 2, 1, False, 0.1), [b"a", None]))
    assert out.answer == "binary"


@relaxed
@given(st.lists(st.one_of(requests.map(encode_request), st.binary(max_size=60)), max_size=8))
def test_parse_requests_gives_one_result_per_envelope(envs):
    out = parse_requests(envs)
    assert len(out) == len(envs)
    for env, got in zip(envs, out):
        try:
            want = parse_request(env)
        except WireError as e:
            assert isinstance(got, WireError) and str(got) == str(e)
        else:
            assert got == want
