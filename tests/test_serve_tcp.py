"""The tier server's TCP port and its per-sample work: answers equal the offline model's,
every request answered once, hostile frames, back-pressure, deadlines, drain, TLS; and the
batched stream checks (``TierEngine.streams_of``) refuse exactly the samples that
``stream_of`` refuses, with the same streams for the others. Server fixtures are those of
``test_serve.py``."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("grpc")

import test_serve  # noqa: E402 (the server fixtures and helpers of test_serve.py)
from helpers import device_json, raw_codec, raw_edge_engine  # noqa: E402
from test_serve import (  # noqa: E402
    SlowEngine,
    _requests,
    edge_engine,
    run_remote,
    serve,
    simulated,
    tiers2,
    x_batch,
)

from flowcodec.bitstream import Bitstream, BitstreamError, Header  # noqa: E402
from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.data import load_dataset  # noqa: E402
from flowcodec.errors import ConfigError  # noqa: E402
from flowcodec.pipeline import Flow  # noqa: E402
from flowcodec.serve import (  # noqa: E402
    FrameClient,
    RemoteError,
    RemoteHop,
    Request,
    TierClient,
    TierEngine,
    TierSpec,
    connect,
)
from flowcodec.serve.bench import closed_loop_calls, request_pool  # noqa: E402
from flowcodec.serve.engine import HEADER_CACHE  # noqa: E402
from flowcodec.serve.tcp import PREFACE, split_address  # noqa: E402
from flowcodec.serve.wire import (  # noqa: E402
    WireError,
    encode_request,
    parse_answer,
    parse_request,
)

fam = test_serve.fam  # the family fixture (module scope), used here under the same name
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.function_scoped_fixture])
_CALL = struct.Struct("<IIBI")


def tcp_serve(engine, **cfg):
    return serve(engine, tcp_port=0, **cfg)


def _frame(cid: int, body: bytes, method: int = 0, timeout_ms: int = 10_000) -> bytes:
    return _CALL.pack(9 + len(body), cid, method, timeout_ms) + body


def _read_answer(sock: socket.socket) -> tuple[int, int, bytes]:
    head = _recv(sock, 9)
    length, cid, status = struct.unpack("<IIB", head)
    return cid, status, _recv(sock, length - 5)


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("closed")
        out += got
    return out


def _closed(sock: socket.socket, within: float = 10.0) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(1024):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- answers -------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["binary", "json"])
def test_answers_equal_the_offline_model(digits_family, answer):
    """The shipped digits family, float16 features: one sample per call over TCP (and
    gRPC) gives exactly the logits the offline engine computes for the same stream."""
    codec = build_codec("raw", digits_family.feature_shape(1), dtype="float16")
    eng = TierEngine(digits_family, TierSpec("edge", 1, 3), codec)
    _, test = load_dataset("digits")
    data = test.subset(24, seed=0)
    pool = request_pool(digits_family, codec, data.normalize(data.images), 1)
    reqs = [Request(r.rid, r.seq, r.header, r.units, r.framing, answer=answer)
            for r in map(parse_request, pool)]  # fmt: skip
    offline = [eng.run([eng.stream_of(r)])[0] for r in reqs]
    with serve(eng, tcp_port=0, max_batch=1) as srv:  # batch 1: the offline arithmetic
        for address in (srv.tcp_address, srv.address):
            with connect(address) as client:
                got = [client.infer(encode_request(r), 30.0) for r in reqs]
            assert all(g[:4] == b"FCR1" for g in got) == (answer == "binary")
            for r, raw_ans, off in zip(reqs, got, offline):
                ans = parse_answer(raw_ans)
                assert ans["rid"] == r.rid and ans["exit_tier"] == "edge"
                assert ans["logits"] == off.logits and ans["confidence"] == off.confidence
    labels = [max(range(10), key=o.logits.__getitem__) for o in offline]
    assert sum(int(p == y) for p, y in zip(labels, data.labels.tolist())) >= 20


def test_remote_flow_over_tcp_matches_the_simulated_flow(fam):
    x = x_batch(6)
    with tcp_serve(edge_engine(fam), max_batch=4) as st:
        res, stats = run_remote(fam, st, st.tcp_address, x)
    sim = simulated(fam, x)
    torch.testing.assert_close(res.logits, sim.logits, rtol=1e-5, atol=1e-5)
    assert stats["answered"] == stats["received"] == 6
    for r, s in zip(res.traces, sim.traces):
        assert (r.exit_tier, r.fallback) == ("edge", None)
        assert r.compute_flops == s.compute_flops and r.hops[0].bits == s.hops[0].bits


def test_every_request_is_answered_once_over_tcp(fam):
    pool = [encode_request(r) for r in _requests(fam, 32)]
    with tcp_serve(edge_engine(fam), max_batch=8, queue_size=1024) as st:
        res = asyncio.run(closed_loop_calls(st.tcp_address, pool, 600, 64, connections=4))
        stats = dict(st.server.stats)
    assert res.sent == res.answered == 600  # each answer carries its own request id
    assert res.duplicates == res.failed == res.refused == 0
    assert stats["received"] == stats["answered"] == 600
    assert max(st.server.batch_sizes) <= 8 and max(st.server.batch_sizes) > 1


# --- batched stream checks ---------------------------------------------------------------
def _hostile_requests(fam, rng: random.Random, n: int) -> list[Request]:
    """Good requests and bad ones of every kind, mixed."""
    good = _requests(fam, 6, seed=rng.randrange(1000))
    other = build_codec("raw", (1, 8, 8)).compress(torch.zeros(1, 1, 8, 8))[0]
    out = []
    for _ in range(n):
        r = good[rng.randrange(len(good))]
        kind = rng.randrange(9)
        units = list(r.units)
        if kind == 1:  # another codec's header
            r = Request(r.rid, 0, other.header_bytes(), other.units())
        elif kind == 2:  # too few units
            r = Request(r.rid, r.seq, r.header, units[:-1])
        elif kind == 3:  # a corrupted envelope header (its CRC fails)
            h = bytearray(r.header)
            h[rng.randrange(len(h))] ^= 1 << rng.randrange(8)
            r = Request(r.rid, r.seq, bytes(h), units)
        elif kind == 4:  # a lost header unit: every packet lost, not an error
            r = Request(r.rid, r.seq, r.header, [None, *units[1:]])
        elif kind == 5:  # a mutated packet: its CRC fails, concealed
            j = rng.randrange(1, len(units))
            u = bytearray(units[j])
            u[rng.randrange(len(u))] ^= 0xFF
            r = Request(r.rid, r.seq, r.header, units[:j] + [bytes(u)] + units[j + 1 :])
        elif kind == 6:  # the envelope's seq differs from the header's
            r = Request(r.rid, r.seq + 1, r.header, units)
        elif kind == 7:  # session framing of the same sample
            r = Request(r.rid, r.seq, r.header, units[1:], "session")
        elif kind == 8:  # a header with trailing bytes
            r = Request(r.rid, r.seq, r.header + b"\0", units)
        out.append(r)
    return out


def _same(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


@relaxed
@given(st.integers(0, 2**32 - 1), st.integers(1, 24))
def test_batched_checks_refuse_exactly_what_single_checks_refuse(fam, seed, n):
    rng = random.Random(seed)
    reqs = _hostile_requests(fam, rng, n)
    eng = edge_engine(fam)
    for _ in range(2):  # a fresh engine, then one that has seen these headers
        got = eng.streams_of(reqs)
        for r, g in zip(reqs, got):
            try:
                want = eng.stream_of(r)
            except (WireError, BitstreamError) as e:
                want = e
            assert _same(g, want), (r, g, want)


def test_batched_checks_reject_exactly_the_bad_samples(fam):
    good = _requests(fam, 4)
    other = build_codec("raw", (1, 8, 8)).compress(torch.zeros(1, 1, 8, 8))[0]
    reqs = [good[0], Request(9, 0, other.header_bytes(), other.units()), good[1],
            Request(8, good[2].seq, good[2].header, good[2].units[:2]), good[2],
            Request(7, good[3].seq, good[3].header[:-1] + b"\0", good[3].units), good[3]]
    out = edge_engine(fam).streams_of(reqs)
    assert [isinstance(o, Exception) for o in out] == [False, True, False, True, False, True,
                                                       False]  # fmt: skip
    assert "codec" in str(out[1]) and "units" in str(out[3]) and "CRC" in str(out[5])
    assert all(isinstance(o, Bitstream) and not o.lost for o in out[::2])


def test_header_cache_is_bounded(fam):
    eng = edge_engine(fam)
    s = raw_codec(fam, 1).compress(fam.features(x_batch(1), 1))[0]
    for i in range(3 * HEADER_CACHE):  # headers of this codec with varied side information
        h = Header(s.header.codec, s.header.fingerprint, s.header.tensors, meta=bytes([i, 7]))
        b = Bitstream(h, s.packets, seq=i)
        (got,) = eng.streams_of([Request(i, i, b.header_bytes(), b.units("sample"))])
        assert got == b
        assert len(eng._headers) <= HEADER_CACHE


# --- hostile frames, limits, life cycle ------------------------------------------------------
def test_hostile_frames_close_the_connection_and_never_the_server(fam):
    good = [encode_request(r) for r in _requests(fam, 2)]
    with tcp_serve(edge_engine(fam), max_message_bytes=1 << 16,
                   connection_grace_s=0.5) as st:  # fmt: skip
        host, port = split_address(st.tcp_address)

        def conn(preface: bytes = PREFACE) -> socket.socket:
            s = socket.create_connection((host, port), 10)
            s.sendall(preface)
            return s

        s = conn(b"GET / HTTP/1.1\r\n\r\n")  # not this protocol
        assert _closed(s)
        s = conn()
        s.sendall(struct.pack("<I", 1 << 20) + b"\0" * 16)  # over max_message_bytes
        assert _closed(s)
        s = conn()
        s.sendall(struct.pack("<I", 3) + b"\0" * 3)  # under the fixed part
        assert _closed(s)
        s = conn()
        s.sendall(_frame(1, b"", method=9) + _frame(2, b"garbage") + _frame(3, good[0]))
        answers = {cid: (status, body) for cid, status, body in
                   (_read_answer(s) for _ in range(3))}  # fmt: skip
        assert answers[1][0] == 6 and b"method" in answers[1][1]  # UNIMPLEMENTED
        assert answers[2][0] == 1  # INVALID_ARGUMENT: the envelope
        assert answers[3][0] == 0 and parse_answer(answers[3][1])["rid"] == 1000
        s.close()
        slow = [conn(PREFACE[:2]), conn()]  # a preface, a frame that never complete
        slow[1].sendall(_frame(4, good[1])[:20])
        assert all(_closed(s, within=10.0) for s in slow)  # after connection_grace_s
        with connect(st.tcp_address) as client:  # the server is fine
            assert parse_answer(client.infer(good[1], 10.0))["rid"] == 1001
        tcp = st.server._tcp.stats
    assert tcp["closed_bad_frame"] == 3 and tcp["closed_slow"] == 2


def test_queue_full_deadline_and_drain_over_tcp(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 0.3
    bodies = [encode_request(r) for r in _requests(fam, 8)]
    with tcp_serve(eng, max_batch=1, batches_in_flight=1, queue_size=2) as st:
        client = FrameClient(st.tcp_address)
        futs = [client.infer_future(b, 10.0) for b in bodies[:5]]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(parse_answer(client.result(f))["rid"])
            except RemoteError as e:
                outcomes.append(e.reason)
        assert outcomes.count("overloaded") >= 2  # one computing, two queued at most
        with pytest.raises(RemoteError) as late:
            client.infer(bodies[5], 0.1)  # the client's own deadline
        t0 = time.perf_counter()
        pending = [client.infer_future(b, 10.0) for b in bodies[6:8]]
        time.sleep(0.1)
        st.stop(5.0)  # drains: both queued samples are still answered
        drained = [parse_answer(client.result(f))["rid"] for f in pending]
        took = time.perf_counter() - t0
        with pytest.raises(RemoteError) as gone:
            client.infer(bodies[0], 2.0)
        client.close()
    assert late.value.reason == "deadline"
    assert drained == [1006, 1007] and took < 5.0
    assert gone.value.reason == "unreachable"


def test_batch_calls_and_stats_over_tcp(fam):
    good = _requests(fam, 3)
    bodies = [encode_request(good[0]), b"not an envelope", encode_request(good[1])]
    with tcp_serve(edge_engine(fam)) as st, connect(st.tcp_address) as client:
        out = client.infer_batch(bodies, 30.0)
        with pytest.raises(WireError):
            client.infer_batch([], 30.0)
        stats = json.loads(client.stats())
    assert out[0]["rid"] == 1000 and out[2]["rid"] == 1001
    assert out[1].reason == "rejected" and "sample 1" in out[1].detail
    assert stats["received"] == 3 and stats["answered"] == 2 and stats["tcp"]["connections"] == 1


def test_unreachable_tcp_server_falls_back(fam):
    hop = RemoteHop(raw_codec(fam, 1), f"tcp://127.0.0.1:{test_serve.free_port()}", deadline_s=2.0)
    t0 = time.perf_counter()
    res = Flow(fam, tiers2(), [hop]).run(x_batch(2))
    hop.close()
    assert time.perf_counter() - t0 < 2.0 + 1.0
    assert [t.fallback for t in res.traces] == ["unreachable", "unreachable"]


def test_addresses_pick_the_transport():
    assert split_address("tcp://127.0.0.1:50061") == ("127.0.0.1", 50061)
    assert split_address("tcp://[::1]:7") == ("::1", 7)
    with pytest.raises(ConfigError):
        split_address("tcp://nohost")
    with connect("127.0.0.1:1") as c:
        assert isinstance(c, TierClient)
    with connect("tcp://127.0.0.1:1") as c:
        assert isinstance(c, FrameClient)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_over_tcp(fam, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)  # fmt: skip
    body = encode_request(_requests(fam, 1)[0])
    with tcp_serve(edge_engine(fam), tls_cert=cert.read_bytes(),
                   tls_key=key.read_bytes()) as st:  # fmt: skip
        with connect(st.tcp_address, cert.read_bytes(), "localhost") as client:
            assert parse_answer(client.infer(body, 10.0))["rid"] == 1000
        with connect(st.tcp_address) as plain, pytest.raises(RemoteError):
            plain.infer(body, 2.0)


def test_random_frames_never_crash_the_server(fam):
    rng = random.Random(1)
    good = encode_request(_requests(fam, 1)[0])
    with tcp_serve(edge_engine(fam), max_message_bytes=1 << 14) as st:
        host, port = split_address(st.tcp_address)
        for i in range(60):
            with socket.create_connection((host, port), 10) as s:
                s.settimeout(10)
                if i % 3 == 0:  # raw bytes after the preface
                    s.sendall(PREFACE + rng.randbytes(rng.randrange(0, 400)))
                else:  # well-framed calls with random methods and bodies, then a good one
                    calls = [_frame(k, rng.randbytes(rng.randrange(0, 300)), rng.randrange(4))
                             for k in range(1, 6)]  # fmt: skip
                    s.sendall(PREFACE + b"".join(calls) + _frame(99, good))
                    got = {}
                    while 99 not in got:
                        cid, status, body = _read_answer(s)
                        got[cid] = status
                    assert set(got) == {1, 2, 3, 4, 5, 99} and got[99] == 0
        with connect(st.tcp_address) as client:
            assert parse_answer(client.infer(good, 10.0))["rid"] == 1000
        stats = dict(st.server.stats)
    assert stats.get("internal_errors", 0) == 0


def test_cli_device_against_the_tcp_port(digits_family, capsys):
    with tcp_serve(raw_edge_engine(digits_family)) as st:
        rc, out = device_json(st.tcp_address, capsys)
    assert rc == 0 and out["exit_mix"] == {"edge": 40} and out["fallbacks"] == {}
    assert out["accuracy"] > 0.9
