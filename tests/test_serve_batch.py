"""Several samples in one call (``InferBatch``): the framing (hypothesis), the server's
answers against single calls, per-sample errors, whole-call refusals, the shared queue's
back-pressure, the call's deadline, per-sample counts, and the load generator with
``samples_per_request``. The server fixtures are those of ``test_serve.py``."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("grpc")

import test_serve  # noqa: E402 (the server fixtures and helpers of test_serve.py)
from test_serve import SlowEngine, _requests, edge_engine, serve  # noqa: E402

from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.errors import ConfigError  # noqa: E402
from flowcodec.serve import (  # noqa: E402
    RemoteError,
    Request,
    SampleError,
    ServeConfig,
    TierClient,
)
from flowcodec.serve.bench import closed_loop, open_loop, pin_to_cpu  # noqa: E402
from flowcodec.serve.wire import (  # noqa: E402
    MAX_BATCH_SAMPLES,
    WireError,
    encode_batch,
    encode_batch_answer,
    encode_request,
    parse_answer,
    parse_batch,
    parse_batch_answer,
)

fam = test_serve.fam  # the family fixture (module scope), used here under the same name
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
envelopes = st.lists(st.binary(max_size=40), min_size=1, max_size=12)


# --- framing -------------------------------------------------------------------------------
@relaxed
@given(envelopes)
def test_batch_round_trip(envs):
    assert parse_batch(encode_batch(envs)) == envs


@relaxed
@given(st.binary(max_size=200))
def test_arbitrary_batch_bytes_parse_or_wire_error(data):
    for body in (data, b"FCB1" + data):
        try:
            envs = parse_batch(body)
        except WireError:
            continue
        assert encode_batch(envs) == body  # what parses is exactly one encoding


@relaxed
@given(envelopes, st.data())
def test_batch_truncation_is_a_wire_error(envs, data):
    body = encode_batch(envs)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(WireError):
        parse_batch(body[:cut])
    with pytest.raises(WireError, match="trailing"):
        parse_batch(body + b"\0")


@settings(relaxed, max_examples=200)
@given(envelopes, st.data())
def test_batch_byte_mutations_parse_or_error(envs, data):
    body = bytearray(encode_batch(envs))
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] ^= data.draw(st.integers(1, 255))
    try:
        parse_batch(bytes(body))
    except WireError:
        pass


def test_batch_counts_are_checked_before_the_loop():
    with pytest.raises(WireError, match="magic"):
        parse_batch(b"FCQ1" + struct.pack("<H", 1) + struct.pack("<I", 0))
    with pytest.raises(WireError, match="count 0"):
        parse_batch(b"FCB1" + struct.pack("<H", 0))
    # 4000 samples declared, 8 bytes follow: refused by the count check, not in the loop.
    with pytest.raises(WireError, match="count 4000 declared, only 8 bytes"):
        parse_batch(b"FCB1" + struct.pack("<H", 4000) + bytes(8))
    with pytest.raises(WireError, match="count 65535 not in"):  # the format's own cap
        parse_batch(b"FCB1" + struct.pack("<H", 65535) + bytes(8), max_count=1 << 16)
    with pytest.raises(WireError, match="count 5 not in 1..4"):
        parse_batch(encode_batch([b"x"] * 5), max_count=4)
    with pytest.raises(WireError, match="entry 0 declares"):
        parse_batch(b"FCB1" + struct.pack("<H", 1) + struct.pack("<I", 0xFFFFFFF0) + b"ab")
    with pytest.raises(WireError):
        encode_batch([])
    with pytest.raises(WireError):
        encode_batch([b"x"] * (MAX_BATCH_SAMPLES + 1))
    with pytest.raises(WireError, match="sample 1"):
        encode_batch([b"x", "not bytes"])


errors = st.builds(SampleError, st.sampled_from(["rejected", "deadline", "error"]),
                   st.text(max_size=30))  # fmt: skip
answer_entries = st.lists(st.one_of(st.binary(max_size=40), errors), min_size=1, max_size=10)


@relaxed
@given(answer_entries)
def test_batch_answer_round_trip(entries):
    assert parse_batch_answer(encode_batch_answer(entries), len(entries)) == entries


@relaxed
@given(st.binary(max_size=200))
def test_arbitrary_batch_answer_bytes(data):
    for body in (data, b"FCA1" + data):
        try:
            parse_batch_answer(body)
        except WireError:
            pass


@relaxed
@given(answer_entries, st.data())
def test_batch_answer_truncation_and_count(entries, data):
    body = encode_batch_answer(entries)
    with pytest.raises(WireError):
        parse_batch_answer(body[: data.draw(st.integers(0, len(body) - 1))])
    with pytest.raises(WireError, match="for"):
        parse_batch_answer(body, len(entries) + 1)


def test_batch_answer_entry_kinds_are_checked():
    head = b"FCA1" + struct.pack("<H", 1)
    with pytest.raises(WireError, match="kind 7"):
        parse_batch_answer(head + struct.pack("<BI", 7, 0))
    with pytest.raises(WireError, match="not JSON"):
        parse_batch_answer(head + struct.pack("<BI", 1, 3) + b"{{{")
    with pytest.raises(WireError, match="reason"):
        parse_batch_answer(head + struct.pack("<BI", 1, 2) + b"[]")


# --- against a server ----------------------------------------------------------------------
def _bodies(fam, n, seed=0):
    return [encode_request(r) for r in _requests(fam, n, seed)]


def test_batch_equals_single_calls(fam):
    bodies = _bodies(fam, 12)
    with serve(edge_engine(fam), max_batch=8) as srv, TierClient(srv.address) as client:
        singles = [parse_answer(client.infer(b, 60.0)) for b in bodies]
        batch = client.infer_batch(bodies, 60.0)
        stats = dict(srv.server.stats)
    assert all(isinstance(a, dict) for a in batch)
    assert [a["rid"] for a in batch] == [a["rid"] for a in singles] == list(range(1000, 1012))
    for a, s in zip(batch, singles):
        assert (a["exit_tier"], a["exit_point"], a["fallback"]) == ("edge", 3, None)
        assert a["flops"] == s["flops"] and a["hops"] == s["hops"]
        # Lossless features; the batches differ, so allow float rounding.
        torch.testing.assert_close(torch.tensor(a["logits"]), torch.tensor(s["logits"]),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        assert a["confidence"] == pytest.approx(s["confidence"], abs=1e-5)
    assert stats["received"] == stats["answered"] == 24  # counted per sample
    assert stats["batch_calls"] == 1


def test_mixed_good_and_bad_samples_are_answered_per_sample(fam):
    good = _requests(fam, 3)
    other = build_codec("raw", (1, 8, 8)).compress(torch.zeros(1, 1, 8, 8))[0]
    bodies = [
        encode_request(good[0]),
        b"FCQ1 not an envelope",  # bad envelope
        encode_request(good[1]),
        encode_request(Request(7, 0, other.header_bytes(), other.units())),  # another codec
        encode_request(Request(8, 0, good[2].header, good[2].units[:2])),  # unit count
        encode_request(good[2]),
    ]
    with serve(edge_engine(fam)) as srv, TierClient(srv.address) as client:
        out = client.infer_batch(bodies, 60.0)
        stats = dict(srv.server.stats)
    kinds = [a["rid"] if isinstance(a, dict) else a.reason for a in out]
    assert kinds == [good[0].rid, "rejected", good[1].rid, "rejected", "rejected", good[2].rid]
    assert "sample 1" in out[1].detail and "codec" in out[3].detail
    assert stats["received"] == 6 and stats["answered"] == 3 and stats["rejected"] == 3
    assert sum(n * c for n, c in srv.server.batch_sizes.items()) == 3  # bad ones never queued


def _raw_batch_call(address: str, body: bytes, timeout: float = 60.0) -> bytes:
    """An InferBatch call with a body as given (TierClient frames its own correctly)."""
    import grpc

    from flowcodec.serve.client import INFER_BATCH, _remote_error

    with grpc.insecure_channel(address) as ch:
        try:
            return ch.unary_unary(INFER_BATCH)(body, timeout=timeout)
        except grpc.RpcError as e:
            raise _remote_error(e) from None


def test_bad_framing_and_too_many_samples_refuse_the_whole_call(fam):
    bodies = _bodies(fam, 5)
    good = encode_batch(bodies)
    bad = [b"", b"FCB1", good[:-1], good + b"\0", b"FCQ1" + good[4:],
           b"FCB1" + struct.pack("<H", 60000) + good[6:]]  # fmt: skip
    with serve(edge_engine(fam), max_samples_per_request=4) as srv:
        reasons = []
        for body in bad:
            with pytest.raises(RemoteError) as e:
                _raw_batch_call(srv.address, body)
            reasons.append(e.value.reason)
        with TierClient(srv.address) as client:
            with pytest.raises(RemoteError) as over:
                client.infer_batch(bodies, 60.0)  # 5 samples, the server takes 4
            ok = [a["rid"] for a in client.infer_batch(bodies[:4], 60.0)]
        stats = dict(srv.server.stats)
    assert reasons == ["rejected"] * len(bad)
    assert over.value.reason == "rejected" and "count 5 not in 1..4" in over.value.detail
    assert ok == [1000, 1001, 1002, 1003]
    assert stats["batch_rejected"] == len(bad) + 1
    assert stats["received"] == stats["answered"] == 4  # refused calls queued nothing


def test_max_samples_per_request_is_checked():
    with pytest.raises(ConfigError, match="max_samples_per_request"):
        ServeConfig(max_samples_per_request=0)
    with pytest.raises(ConfigError, match="max_samples_per_request"):
        ServeConfig(max_samples_per_request=MAX_BATCH_SAMPLES + 1)


def _wait_queued(client: TierClient, n: int, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while json.loads(client.stats())["queued"] != n:
        assert time.time() < end, "the queue never held the expected samples"
        time.sleep(0.02)


def test_queue_full_refuses_the_whole_call_and_queues_none_of_it(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 0.6
    bodies = _bodies(fam, 8)
    with serve(eng, max_batch=1, batches_in_flight=1, queue_size=4) as srv:
        client = TierClient(srv.address)
        first = client.infer_future(bodies[0], 30.0)
        _wait_queued(client, 0)  # the batcher took it: the worker is busy 0.6 s
        queued = [client.infer_future(b, 30.0) for b in bodies[1:4]]
        _wait_queued(client, 3)  # room for 1 more
        with pytest.raises(RemoteError) as full:
            client.infer_batch(bodies[4:6], 30.0)
        with pytest.raises(RemoteError) as never:  # over the queue size: can never fit
            client.infer_batch(bodies[:5], 30.0)
        one = client.infer_batch(bodies[6:7], 30.0)  # a call that fits is taken
        rids = [parse_answer(client.result(f))["rid"] for f in [first, *queued]]
        client.close()
        stats = dict(srv.server.stats)
        computed = sum(n * c for n, c in srv.server.batch_sizes.items())
    assert full.value.reason == never.value.reason == "overloaded"
    assert "room for 1 of 4" in full.value.detail
    assert rids == [1000, 1001, 1002, 1003] and one[0]["rid"] == 1006
    assert stats["overloaded"] == 2 + 5  # per sample
    assert stats["received"] == 4 + 2 + 5 + 1 and stats["answered"] == 5
    assert computed == 5  # no sample of a refused call reached the worker


def test_the_deadline_covers_the_whole_call(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 0.5
    bodies = _bodies(fam, 3)
    # One sample per batch, one batch at a time: the first is answered at 0.5 s, the
    # second would be at 1.0 s and the third at 1.5 s, past the call's 0.8 s.
    with serve(eng, max_batch=1, batches_in_flight=1, default_deadline_s=0.8) as srv, \
            TierClient(srv.address) as client:  # fmt: skip
        t0 = time.perf_counter()
        out = client.infer_batch(bodies, 10.0)  # the server's cap passes before the caller's
        took = time.perf_counter() - t0
        time.sleep(0.8)  # the worker finishes the second sample (computed, not answered)
        stats = dict(srv.server.stats)
        eng.delay = 1.0
        t0 = time.perf_counter()
        with pytest.raises(RemoteError) as none:  # no sample answered: the call fails
            client.infer_batch(bodies[:2], 0.3)
        none_took = time.perf_counter() - t0
    assert out[0]["rid"] == 1000 and [e.reason for e in out[1:]] == ["deadline", "deadline"]
    assert 0.8 <= took < 0.8 + 0.5
    assert stats["deadline"] == 2 and stats["answered"] == 1 and stats["received"] == 3
    assert none.value.reason == "deadline" and none_took < 0.3 + 0.5


def test_load_generator_counts_samples_of_batch_calls(fam):
    pool = _bodies(fam, 16)
    with serve(edge_engine(fam), max_batch=16, queue_size=512) as srv:
        sat = asyncio.run(closed_loop(srv.address, pool, 3, 1.0, in_flight=2,
                                      samples_per_request=5))  # fmt: skip
        load = asyncio.run(open_loop(srv.address, pool, 2, 80.0, 1.0, samples_per_request=4))
        single = asyncio.run(closed_loop(srv.address, pool, 2, 0.5))
        stats = dict(srv.server.stats)
    for r, s in ((sat, 5), (load, 4), (single, 1)):
        assert r.sent > 0 and r.sent % s == 0 and r.duplicates == 0 and r.failed == 0
        assert r.answered + r.refused == r.sent and len(r.latencies_s) == r.answered
        assert r.row()["samples_per_request"] == s
    assert stats["received"] == sat.sent + load.sent + single.sent
    assert stats["answered"] == sat.answered + load.answered + single.answered
    assert stats["batch_calls"] == sat.sent // 5 + load.sent // 4
    with pytest.raises(ConfigError):
        asyncio.run(closed_loop(srv.address, pool, 1, 0.1, samples_per_request=0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pin_to_cpu_pins_a_child_and_says_why_it_cannot():
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pin_to_cpu(child.pid, cpu) is None
        assert os.sched_getaffinity(child.pid) == {cpu}
        assert "not among" in pin_to_cpu(child.pid, 1 << 20)
    finally:
        child.kill()
        child.wait(10)
