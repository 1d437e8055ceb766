"""Real tiers on loopback: the same flow remote and simulated, fallbacks, batching,
back-pressure, drain, hostile input, TLS and the link proxy (a few seconds of sockets)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time

import pytest
import torch

pytest.importorskip("grpc")

from helpers import (  # noqa: E402
    device_json,
    raw_codec,
    raw_edge_engine,
    tiny_cloud_family,
    untrained_digits_family,
)

from channels import FastLink, IIDPacketErasure  # noqa: E402
from flowcodec.bitstream import Bitstream  # noqa: E402
from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.errors import ConfigError  # noqa: E402
from flowcodec.flops import count_flops  # noqa: E402
from flowcodec.pipeline import Flow, Hop, Tier  # noqa: E402
from flowcodec.serve import (  # noqa: E402
    AsyncTierClient,
    LinkProxy,
    RemoteError,
    RemoteHop,
    Request,
    ServeConfig,
    ServerThread,
    TierClient,
    TierEngine,
    TierServer,
    TierSpec,
)
from flowcodec.serve.wire import encode_request, parse_answer  # noqa: E402


@pytest.fixture(scope="module")
def fam():
    return untrained_digits_family()


class SlowEngine(TierEngine):
    """A tier whose every batch takes ``delay`` seconds longer."""

    delay = 0.0

    def run(self, streams):
        time.sleep(self.delay)
        return super().run(streams)


def serve(engine, **cfg) -> ServerThread:
    return ServerThread(TierServer(engine, ServeConfig(**cfg))).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edge_engine(fam, cls=TierEngine, point=3):
    return cls(fam, TierSpec("edge", 1, point), raw_codec(fam, 1))


def x_batch(n, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def tiers2():
    return [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)]


def run_remote(fam, st, address, x):
    """``x`` through a two-tier flow whose hop is the server ``st`` at ``address``: the
    result and the server's stats."""
    hop = RemoteHop(raw_codec(fam, 1), address, deadline_s=10.0, first_seq=0)
    res = Flow(fam, tiers2(), [hop]).run(x)
    hop.close()
    return res, dict(st.server.stats)


def simulated(fam, x):
    """``x`` through the same flow, simulated over a lossless link."""
    return Flow(fam, tiers2(), [Hop(raw_codec(fam, 1), IIDPacketErasure(0.0), 1e6)]).run(x)


def test_remote_flow_matches_the_simulated_flow(fam):
    x = x_batch(6)
    with serve(edge_engine(fam), max_batch=4) as st:
        res, stats = run_remote(fam, st, st.address, x)
    sim = simulated(fam, x)
    # Lossless features: the same answers (batches differ, so allow float rounding).
    torch.testing.assert_close(res.logits, sim.logits, rtol=1e-5, atol=1e-5)
    assert stats["answered"] == 6 and stats["received"] == 6
    for r, s in zip(res.traces, sim.traces):
        assert (r.exit_tier, r.exit_point, r.fallback) == ("edge", 3, None)
        assert r.compute_flops == s.compute_flops  # the server counts the same FLOPs
        assert r.hops[0].bits == s.hops[0].bits and r.hops[0].packets == 3
        assert r.hops[0].packets_lost == 0
        assert r.compute_time_s["edge"] > 0 and r.wall_s > 0  # measured, not modelled


def test_edge_exit_and_cloud_behind_it(fam):
    """device -> edge (answers when confident) -> cloud, against the simulated 3 tiers."""
    x = x_batch(16, seed=1)
    conf2 = fam.member(2)(x).softmax(1).amax(1).sort().values
    # half way between two samples' confidences: a batch computed elsewhere (other batch
    # sizes, other rounding) cannot move a sample across it, as it could at a sample's own
    thr = float(conf2[7] + conf2[8]) / 2
    cloud = TierEngine(fam, TierSpec("cloud", 2, 3), raw_codec(fam, 2))
    with serve(cloud) as sc:
        edge = TierEngine(fam, TierSpec("edge", 1, 2, thr), raw_codec(fam, 1), raw_codec(fam, 2))
        with serve(edge, next_address=sc.address) as se:
            tiers = [Tier("device", 1e9, 1), Tier("edge", 1e11, 2, thr), Tier("cloud", 1e12, 3)]
            hop = RemoteHop(raw_codec(fam, 1), se.address, deadline_s=10.0)
            res = Flow(fam, tiers, [hop, Hop(raw_codec(fam, 2), IIDPacketErasure(0.0), 1e6)]).run(x)
            hop.close()
    sim_hops = [Hop(raw_codec(fam, 1), IIDPacketErasure(0.0), 1e6),
                Hop(raw_codec(fam, 2), IIDPacketErasure(0.0), 1e6)]  # fmt: skip
    sim = Flow(fam, tiers, sim_hops).run(x)
    assert [t.exit_tier for t in res.traces] == [t.exit_tier for t in sim.traces]
    assert set(res.exit_mix()) == {"edge", "cloud"}
    torch.testing.assert_close(res.logits, sim.logits, rtol=1e-5, atol=1e-5)
    for r in res.traces:
        assert len(r.hops) == (2 if r.exit_tier == "cloud" else 1)
        assert set(r.compute_time_s) == {"device", "edge"} | (
            {"cloud"} if r.exit_tier == "cloud" else set())  # fmt: skip


def test_unreachable_server_falls_back_to_the_device_exit(fam):
    x = x_batch(3)
    hop = RemoteHop(raw_codec(fam, 1), f"127.0.0.1:{free_port()}", deadline_s=2.0)
    flow = Flow(fam, tiers2(), [hop])
    t0 = time.perf_counter()
    res = flow.run(x)
    assert time.perf_counter() - t0 < 2.0 + 1.0  # refused at once, far within the deadline
    hop.close()
    torch.testing.assert_close(res.logits, fam.member(1)(x))
    for tr in res.traces:
        assert (tr.exit_tier, tr.exit_point, tr.fallback) == ("device", 1, "unreachable")
        assert tr.hops[0].packets_lost == tr.hops[0].packets


def test_late_server_falls_back_within_the_deadline(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 1.5
    x = x_batch(2)
    with serve(eng) as st:
        hop = RemoteHop(raw_codec(fam, 1), st.address, deadline_s=0.4)
        flow = Flow(fam, tiers2(), [hop])
        t0 = time.perf_counter()
        res = flow.run(x)
        took = time.perf_counter() - t0
        hop.close()
    assert [t.fallback for t in res.traces] == ["deadline", "deadline"]
    assert took < 0.4 + 1.0  # the deadline plus a margin, not the server's 1.5 s


def test_killed_server_then_restarted_is_used_again(fam):
    port = free_port()
    x = x_batch(2)
    hop = RemoteHop(raw_codec(fam, 1), f"127.0.0.1:{port}", deadline_s=3.0)
    flow = Flow(fam, tiers2(), [hop])
    st = serve(edge_engine(fam), port=port)
    assert [t.fallback for t in flow.run(x).traces] == [None, None]
    st.stop(0.0)  # abrupt: no grace
    t0 = time.perf_counter()
    down = flow.run(x).traces
    assert all(t.fallback == "unreachable" for t in down) and time.perf_counter() - t0 < 4.0
    with serve(edge_engine(fam), port=port):
        deadline = time.time() + 5.0
        while True:  # the client reconnects within its back-off (0.1-0.5 s)
            traces = flow.run(x).traces
            if all(t.fallback is None for t in traces) or time.time() > deadline:
                break
            time.sleep(0.1)
    hop.close()
    assert [t.exit_tier for t in traces] == ["edge", "edge"]


def _requests(fam, n, seed=0):
    codec = raw_codec(fam, 1)
    streams = codec.compress(fam.features(x_batch(n, seed), 1))
    out = []
    for i, s in enumerate(streams):
        s.seq = i
        out.append(Request(1000 + i, i, s.header_bytes(), s.units("sample")))
    return out


def test_batches_form_and_every_request_is_answered_once(fam):
    reqs = _requests(fam, 160)
    with serve(edge_engine(fam), max_batch=8, max_wait_s=0.01) as st:

        async def device(client, mine):
            got = []
            for r in mine:
                got.append(parse_answer(await client.infer(encode_request(r), 20.0))["rid"])
            return got

        async def main():
            client = AsyncTierClient(st.address)
            answers = await asyncio.gather(*(device(client, reqs[d::16]) for d in range(16)))
            await client.close()
            return answers

        answers = asyncio.run(main())
        stats, sizes = dict(st.server.stats), dict(st.server.batch_sizes)
    for d, got in enumerate(answers):
        assert got == [r.rid for r in reqs[d::16]]  # each device gets its own answers, in order
    assert stats["received"] == stats["answered"] == 160
    assert sum(k * v for k, v in sizes.items()) == 160
    assert max(sizes) <= 8 and max(sizes) > 1  # batches across devices, never over the cap


def test_full_queue_refuses_instead_of_growing(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 0.05
    reqs = _requests(fam, 24)
    with serve(eng, max_batch=1, queue_size=2) as st:

        async def main():
            client = AsyncTierClient(st.address)

            async def one(r):
                try:
                    return parse_answer(await client.infer(encode_request(r), 20.0))["rid"]
                except RemoteError as e:
                    return e.reason

            out = await asyncio.gather(*(one(r) for r in reqs))
            await client.close()
            return out

        out = asyncio.run(main())
        stats = dict(st.server.stats)
    answered = [o for o in out if isinstance(o, int)]
    assert "overloaded" in out and len(answered) >= 3
    assert len(answered) + out.count("overloaded") == 24  # nothing lost, nothing else
    assert stats["overloaded"] == out.count("overloaded")


def test_stop_drains_in_flight_requests(fam):
    eng = edge_engine(fam, SlowEngine)
    eng.delay = 0.2
    reqs = _requests(fam, 6)
    st = serve(eng, max_batch=2)
    client = TierClient(st.address)
    futs = [client.infer_future(encode_request(r), 20.0) for r in reqs]
    time.sleep(0.1)  # all six are queued or running
    st.stop(grace_s=10.0)
    got = [parse_answer(client.result(f))["rid"] for f in futs]
    assert got == [r.rid for r in reqs]
    with pytest.raises(RemoteError) as e:
        client.infer(encode_request(reqs[0]), 2.0)
    assert e.value.reason == "unreachable"
    client.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_hostile_messages_never_crash_the_server(fam):
    rng = random.Random(0)
    good = _requests(fam, 4)
    codec = raw_codec(fam, 1)
    hostile: list[bytes] = []
    for _ in range(150):  # random bytes, and random bytes behind a valid magic
        hostile.append(rng.randbytes(rng.randrange(0, 300)))
        hostile.append(b"FCQ1" + rng.randbytes(rng.randrange(0, 300)))
    for i in range(150):  # real streams with mutated payloads and valid CRCs
        s = codec.compress(fam.features(x_batch(1, seed=i), 1))[0]
        pk = [bytearray(p) for p in s.packets]
        for _ in range(rng.randrange(1, 20)):
            j = rng.randrange(len(pk))
            pk[j][rng.randrange(len(pk[j]))] = rng.randrange(256)
        s2 = Bitstream(s.header, [bytes(p) for p in pk], seq=i)
        hostile.append(encode_request(Request(i, i, s2.header_bytes(), s2.units("sample"))))
    # oversized length fields, wrong unit counts, another codec's header
    hostile.append(b"FCQ1\0" + b"\1" * 12 + b"\xff\xff" + b"\0" * 8)
    hostile.append(encode_request(Request(1, 0, good[0].header, good[0].units[:2])))
    other = build_codec("raw", (1, 8, 8)).compress(torch.zeros(1, 1, 8, 8))[0]
    hostile.append(encode_request(Request(1, 0, other.header_bytes(), other.units())))
    with serve(edge_engine(fam), max_message_bytes=1 << 16) as st:
        client = TierClient(st.address)
        before = _rss_kib()
        reasons = {}
        for h in hostile:
            try:
                parse_answer(client.infer(h, 10.0))
                reasons["answered"] = reasons.get("answered", 0) + 1
            except RemoteError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
        with pytest.raises(RemoteError) as big:  # over max_message_bytes: refused by gRPC
            client.infer(b"FCQ1" + b"\0" * (1 << 17), 10.0)
        # slow senders: raw connections that trickle a few bytes and stall
        socks = []
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", st.port))
            s.sendall(b"PRI * HTTP/2.0\r\n")
            socks.append(s)
        ok = [parse_answer(client.infer(encode_request(r), 10.0))["rid"] for r in good]
        for s in socks:
            s.sendall(b"\r\nSM\r\n\r\n\x00\xff\xff")  # a frame header that never completes
        ok2 = parse_answer(client.infer(encode_request(good[0]), 10.0))["rid"]
        for s in socks:
            s.close()
        grown = _rss_kib() - before
        client.close()
    assert reasons.get("rejected", 0) >= 300  # random bytes and broken envelopes
    assert set(reasons) <= {"rejected", "answered"}  # no INTERNAL, no crash
    assert big.value.reason == "overloaded"
    assert ok == [r.rid for r in good] and ok2 == good[0].rid
    assert grown < 64 * 1024  # KiB: bounded (the queue holds nothing once answered)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(fam, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)  # fmt: skip
    with serve(edge_engine(fam), tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as st:
        hop = RemoteHop(raw_codec(fam, 1), st.address, deadline_s=10.0, root_cert=cert.read_bytes(),
                        server_name="localhost")  # fmt: skip
        res = Flow(fam, tiers2(), [hop]).run(x_batch(2))
        hop.close()
        plain = RemoteHop(raw_codec(fam, 1), st.address, deadline_s=2.0)
        refused = Flow(fam, tiers2(), [plain]).run(x_batch(2))
        plain.close()
    assert [t.exit_tier for t in res.traces] == ["edge", "edge"]
    assert all(t.fallback is not None for t in refused.traces)


def test_proxy_applies_the_link_like_the_simulator(fam):
    """Same seeded link, same samples in the same order: the same losses and channel uses,
    and the request is held for channel uses / symbol rate + delay."""
    x = x_batch(6, seed=3)
    rate, delay = 2e6, 0.01
    with serve(edge_engine(fam)) as se:
        proxy = LinkProxy(se.address, FastLink(mcs=9, snr_db=1.0, seed=5), rate, delay)
        with ServerThread(proxy) as sp:
            hop = RemoteHop(raw_codec(fam, 1), sp.address, deadline_s=10.0, first_seq=0)
            flow = Flow(fam, tiers2(), [hop])
            real = [flow.run(x[i : i + 1]).traces[0] for i in range(len(x))]
            hop.close()
    sim_flow = Flow(fam, tiers2(), [Hop(raw_codec(fam, 1), FastLink(mcs=9, snr_db=1.0, seed=5),
                                        rate, delay)])  # fmt: skip
    sim = [sim_flow.run(x[i : i + 1]).traces[0] for i in range(len(x))]
    assert sum(t.hops[0].packets_lost for t in real) > 0  # 1 dB at MCS 9 loses packets
    for r, s in zip(real, sim):
        assert r.fallback == s.fallback  # "concealed" where most packets were lost, in both
        for f in ("channel_uses", "packets", "packets_lost", "header_lost", "concealed"):
            assert getattr(r.hops[0], f) == getattr(s.hops[0], f)
        assert r.hops[0].tx_time_s == pytest.approx(s.hops[0].tx_time_s, rel=1e-9)
        assert r.wall_s >= r.hops[0].tx_time_s  # it was really held that long


def test_cli_device_against_a_server(digits_family, capsys):
    with serve(raw_edge_engine(digits_family)) as st:
        rc, out = device_json(st.address, capsys)
    assert rc == 0 and out["samples"] == 40 and out["exit_mix"] == {"edge": 40}
    assert out["accuracy"] > 0.9 and out["fallbacks"] == {}


def test_serve_refuses_a_forwarding_tier_without_next(fam):
    eng = TierEngine(fam, TierSpec("edge", 1, 2), raw_codec(fam, 1), raw_codec(fam, 2))
    with pytest.raises(ConfigError, match="next_address"):
        TierServer(eng, ServeConfig())


# --- a branching family: a tier runs the stages of its member's path ----------------------------
def _engine_answers(fam, spec, x):
    """``x``'s features at ``spec.point_in`` through a raw float32 (lossless) codec into a last
    tier of ``spec``: the engine and its answers' logits."""
    codec = build_codec("raw", fam.feature_shape(spec.point_in))
    eng = TierEngine(fam, spec, codec)
    out = eng.run(codec.compress(fam.features(x, spec.point_in)))
    assert {o.kind for o in out} == {"answer"}
    return eng, torch.tensor([o.logits for o in out], dtype=torch.float32)


def test_a_branching_tier_runs_its_members_stages_not_the_numbered_ones():
    fam = tiny_cloud_family()  # member 4 reads split point 1: path [0, 1, 4]
    x = torch.randn(3, *fam.input_shape, generator=torch.Generator().manual_seed(2))
    eng, logits = _engine_answers(fam, TierSpec("cloud", 1, 4), x)
    assert torch.equal(logits, fam.member(4)(x))  # stage 4 on point 1, not stages 2-4
    assert torch.equal(logits, fam.split(4, 1)[1](fam.split(4, 1)[0](x)))
    stage = count_flops(fam.stages[3], fam.feature_shape(1))  # what stage 4 reads: point 1
    assert eng.flops_answer == stage + count_flops(fam.exits[3], fam.feature_shape(4))
    # the same FLOPs as the simulated flow's cloud tier
    flow = Flow(fam, [Tier("device", 1e9, 1), Tier("cloud", 1e12, 4)],
                [Hop(build_codec("raw", fam.feature_shape(1)), IIDPacketErasure(0.0), 1e6)])
    assert {tr.compute_flops["cloud"] for tr in flow.run(x).traces} == {eng.flops_answer}
    # from the input: member 4's stages 1 and 4
    _, logits = _engine_answers(fam, TierSpec("cloud", 0, 4), x)
    assert torch.equal(logits, fam.member(4)(x))


def test_a_chain_tier_is_unchanged_in_a_branching_family_and_in_a_chain():
    for fam, spec in [(tiny_cloud_family(), TierSpec("edge", 1, 3)),
                      (untrained_digits_family(), TierSpec("edge", 1, 3)),
                      (untrained_digits_family(), TierSpec("edge", 0, 2))]:  # fmt: skip
        x = torch.randn(3, *fam.input_shape, generator=torch.Generator().manual_seed(3))
        eng, logits = _engine_answers(fam, spec, x)
        head, tail = fam.split(spec.point, spec.point_in)
        assert torch.equal(logits, tail(head(x)))
        # stages point_in+1..point, each on the point before it (the count before branches)
        chain = sum(count_flops(fam.stages[p], fam.feature_shape(p))
                    for p in range(spec.point_in, spec.point))  # fmt: skip
        assert eng.flops_answer == chain + eng.exit_flops


def test_a_tier_off_its_members_path_is_refused_with_the_receiver_to_use():
    fam = tiny_cloud_family()
    with pytest.raises(ConfigError, match=r"tier 'cloud': member 4 .* split points \[0, 1, 4\] "
                                          r"only, not point_in 2; .* member 3 "
                                          r"\(family.receiver\(2\)\)"):  # fmt: skip
        TierEngine(fam, TierSpec("cloud", 2, 4), raw_codec(fam, 2))


def test_a_branching_member_served_over_a_real_hop_matches_the_simulated_flow():
    fam = tiny_cloud_family()
    x = torch.randn(5, *fam.input_shape, generator=torch.Generator().manual_seed(4))
    codec = build_codec("raw", fam.feature_shape(1))
    tiers = [Tier("device", 1e9, 1), Tier("cloud", 1e12, 4)]
    with serve(TierEngine(fam, TierSpec("cloud", 1, 4), codec), max_batch=2) as st:
        hop = RemoteHop(codec, st.address, deadline_s=10.0, first_seq=0)
        res = Flow(fam, tiers, [hop]).run(x)
        hop.close()
    sim = Flow(fam, tiers, [Hop(codec, IIDPacketErasure(0.0), 1e6)]).run(x)
    torch.testing.assert_close(res.logits, fam.member(4)(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.logits, sim.logits, rtol=1e-5, atol=1e-5)
    for r, s in zip(res.traces, sim.traces, strict=True):
        assert (r.exit_tier, r.exit_point, r.fallback) == ("cloud", 4, None)
        assert r.compute_flops == s.compute_flops
