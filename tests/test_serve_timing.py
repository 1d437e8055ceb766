"""Timing parts of serving: the simulator's per-sample transport overhead, the proxy's
hold (never early), and the server's per-request deadline timer (a second or two)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("grpc")

from channels import IIDPacketErasure  # noqa: E402
from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.errors import ConfigError  # noqa: E402
from flowcodec.family import build_family  # noqa: E402
from flowcodec.pipeline import Flow, Hop, Tier  # noqa: E402
from flowcodec.serve import (  # noqa: E402
    LinkProxy,
    RemoteError,
    Request,
    ServeConfig,
    ServerThread,
    TierClient,
    TierEngine,
    TierServer,
    TierSpec,
)
from flowcodec.serve.wire import encode_request, parse_answer  # noqa: E402

FAM = build_family("digits").eval()


def _flow(overhead: float, symbol_rate: float = 1e6, delay: float = 0.002) -> Flow:
    codec = build_codec("raw", FAM.feature_shape(1), packets=3)
    hop = Hop(codec, IIDPacketErasure(0.0), symbol_rate, delay, overhead_s=overhead)
    return Flow(FAM, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop])


@settings(max_examples=20, deadline=None)
@given(overhead=st.floats(0.0, 1.0, allow_nan=False), rate=st.floats(1e3, 1e9))
def test_hop_overhead_adds_to_every_samples_transmission_time(overhead, rate):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with_o = _flow(overhead, rate).run(x).traces
    without = _flow(0.0, rate).run(x).traces
    for a, b in zip(with_o, without):
        assert a.hops[0].tx_time_s == pytest.approx(b.hops[0].tx_time_s + overhead, abs=1e-12)
        assert a.latency_s == pytest.approx(b.latency_s + overhead, abs=1e-12)
        assert (a.hops[0].bits, a.hops[0].channel_uses) == (b.hops[0].bits,
                                                            b.hops[0].channel_uses)


@pytest.mark.parametrize("bad", [-1e-6, float("nan"), float("-inf")])
def test_hop_overhead_must_be_non_negative(bad):
    with pytest.raises(ConfigError, match="overhead_s"):
        _flow(bad)


def test_proxy_hold_is_never_early_and_close_to_its_time():
    proxy = LinkProxy("127.0.0.1:1", IIDPacketErasure(0.0), 1e6)

    async def holds() -> list[float]:
        proxy._loop = asyncio.get_running_loop()
        late = []
        for k in range(30):
            target = proxy._loop.time() + 0.0005 * (k % 10) + 0.0001
            await proxy._hold_until(target)
            late.append(proxy._loop.time() - target)
        return late

    try:
        late = asyncio.run(holds())
    finally:
        proxy._timers.shutdown()
        proxy._pool.shutdown()
    assert min(late) >= 0.0
    # asyncio's own timer rounds its wait up to a whole millisecond; the timer thread
    # makes a typical hold far closer than that (generous: loaded test machines).
    assert sorted(late)[len(late) // 2] < 0.004


class _SlowEngine(TierEngine):
    delay = 0.0

    def run(self, streams):
        time.sleep(self.delay)
        return super().run(streams)


def test_server_deadline_timer_expires_queued_requests_and_spares_answered_ones():
    codec = build_codec("raw", FAM.feature_shape(1))
    engine = _SlowEngine(FAM, TierSpec("edge", 1, 3), codec)
    streams = codec.compress(FAM.features(torch.randn(4, 1, 8, 8), 1))
    reqs = [encode_request(Request(i, i, s.header_bytes(), s.units("sample")))
            for i, s in enumerate(streams)]  # fmt: skip
    server = TierServer(engine, ServeConfig(max_batch=1, max_wait_s=0.0,
                                            default_deadline_s=0.3))  # fmt: skip
    with ServerThread(server) as srv, TierClient(srv.address) as client:
        # Answered well within the deadline: its timer must not count it as expired later.
        assert parse_answer(client.infer(reqs[0], 5.0))["rid"] == 0
        time.sleep(0.4)
        assert server.stats["deadline"] == 0
        # The batch worker is busy 0.6 s with the first of three: the others expire queued.
        engine.delay = 0.6
        futs = [client.infer_future(r, 5.0) for r in reqs[1:]]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(parse_answer(client.result(f))["rid"])
            except RemoteError as e:
                outcomes.append(e.reason)
        engine.delay = 0.0
        time.sleep(0.7)  # the worker finishes the slow batch it was running
        assert outcomes.count("deadline") >= 2
        assert server.stats["deadline"] == outcomes.count("deadline")
        assert parse_answer(client.infer(reqs[3], 5.0))["rid"] == 3  # still serving


def test_freeze_heap_takes_the_loaded_objects_out_of_the_collector():
    import gc
    import subprocess
    import sys

    code = ("import gc, torch; from flowcodec.serve.server import freeze_heap; "
            "from flowcodec.family import build_family; f = build_family('digits'); "
            "n = freeze_heap(); print(n, len(gc.get_objects()))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    frozen, tracked = int(out[0]), int(out[1])
    assert frozen > 10_000 and tracked < frozen / 100  # a full collection walks only new ones
    assert gc.get_freeze_count() == 0  # (run in a child: this process is left as it was)


def test_batches_in_flight_is_checked_and_one_still_answers_everything():
    with pytest.raises(ConfigError, match="batches_in_flight"):
        ServeConfig(batches_in_flight=0)
    codec = build_codec("raw", FAM.feature_shape(1))
    streams = codec.compress(FAM.features(torch.randn(24, 1, 8, 8), 1))
    reqs = [encode_request(Request(i, i, s.header_bytes(), s.units("sample")))
            for i, s in enumerate(streams)]  # fmt: skip
    for k in (1, 3):
        server = TierServer(TierEngine(FAM, TierSpec("edge", 1, 3), codec),
                            ServeConfig(max_batch=4, batches_in_flight=k))  # fmt: skip
        with ServerThread(server) as srv, TierClient(srv.address) as client:
            futs = [client.infer_future(r, 10.0) for r in reqs]
            rids = [parse_answer(client.result(f))["rid"] for f in futs]
        assert rids == list(range(24))
        assert sum(n * c for n, c in server.batch_sizes.items()) == 24
        assert max(server.batch_sizes) <= 4
