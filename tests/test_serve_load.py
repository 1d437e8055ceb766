"""Long serving tests (marked slow): 64 devices, a server killed mid-run, hostile floods.

Each runs a real `flowcodec serve` child process on loopback, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("grpc")

from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.data import load_dataset  # noqa: E402
from flowcodec.pipeline import Flow, Tier  # noqa: E402
from flowcodec.serve.bench import (  # noqa: E402
    SlowSenders,
    closed_loop,
    free_port,
    hostile_messages,
    open_loop,
    request_pool,
    spawn,
)
from flowcodec.serve.client import AsyncTierClient, RemoteError  # noqa: E402
from flowcodec.serve.remote import RemoteHop  # noqa: E402
from flowcodec.serve.wire import Request, encode_request, parse_answer  # noqa: E402

pytestmark = pytest.mark.slow
EDGE = ["--family", "digits", "--point-in", "1", "--point", "3"]


@pytest.fixture(scope="module")
def setup(digits_family):
    codec = build_codec("raw", digits_family.feature_shape(1), dtype="float16")
    _, test = load_dataset("digits")
    data = test.subset(128, seed=0)
    x = data.normalize(data.images)
    return digits_family, codec, x, request_pool(digits_family, codec, x, 1)


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_64_devices_no_request_lost_or_answered_twice(setup, transport):
    """Every request carries its own id; each answer must carry it back, once."""
    _, _, _, pool = setup
    server = spawn("serve", [*EDGE, "--queue", "1024", "--tcp-port", "0"])
    address = server.tcp_address if transport == "tcp" else server.address
    try:
        sat = asyncio.run(closed_loop(address, pool, 64, 3.0))
        load = asyncio.run(open_loop(address, pool, 64, 0.5 * sat.throughput, 4.0))
    finally:
        log = server.stop()
    for r in (sat, load):
        assert r.duplicates == 0 and r.failed == 0
        assert r.answered + r.refused == r.sent > 0
    assert load.refused == 0 and load.answered > 0
    assert "stopped" in log


def test_killed_server_every_request_completes_and_restart_is_picked_up(setup):
    fam, codec, x, _ = setup
    port = free_port()
    deadline, margin = 1.0, 0.5
    server = spawn("serve", EDGE, port=port)
    results: list[tuple[float, str | None, float]] = []  # (start, fallback, took)
    stop = threading.Event()

    def device(k: int) -> None:
        hop = RemoteHop(codec, f"127.0.0.1:{port}", deadline_s=deadline)
        flow = Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop])
        i = k
        while not stop.is_set():
            t0 = time.perf_counter()
            tr = flow.run(x[i % len(x)][None]).traces[0]
            results.append((t0, tr.fallback, time.perf_counter() - t0))
            i += 8
            time.sleep(0.01)
        hop.close()

    threads = [threading.Thread(target=device, args=(k,)) for k in range(8)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(2.0)
    server.kill()
    t_kill = time.perf_counter()
    time.sleep(2.0)
    server = spawn("serve", EDGE, port=port)
    t_back = time.perf_counter()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    server.stop()
    assert results and t_start < t_kill
    # every request completed, within its deadline plus a small margin
    assert max(took for _, _, took in results) < deadline + margin
    down = [fb for t0, fb, _ in results if t_kill + 0.2 < t0 < t_back - 0.2]
    assert down and all(fb in ("unreachable", "deadline") for fb in down)
    late = [fb for t0, fb, _ in results if t0 > t_back + 1.5]
    assert late and all(fb is None for fb in late)  # the restarted server answers again


def test_hostile_flood_no_crash_bounded_memory(setup):
    fam, codec, x, pool = setup
    with torch.no_grad():
        streams = codec.compress(fam.features(x, 1))
    for i, s in enumerate(streams):
        s.seq = i
    o = build_codec("raw", fam.feature_shape(2)).compress(torch.zeros(1, *fam.feature_shape(2)))
    other = encode_request(Request(1, 0, o[0].header_bytes(), o[0].units()))
    server = spawn("serve", EDGE)

    async def run() -> tuple[int, dict, list]:
        c = AsyncTierClient(server.address)
        for r in pool[:50]:
            await c.infer(r, 10.0)
        idle = server.rss_kib()
        counts: dict[str, int] = {}
        sem = asyncio.Semaphore(32)

        async def one(msg):
            async with sem:
                try:
                    parse_answer(await c.infer(msg, 10.0))
                    out = "answered"
                except RemoteError as e:
                    out = e.reason
                counts[out] = counts.get(out, 0) + 1

        await asyncio.gather(*(one(m) for _, m in hostile_messages(pool, streams, other,
                                                                   5000, 1)))  # fmt: skip
        ok = [parse_answer(await c.infer(r, 10.0))["rid"] for r in pool[:20]]
        await c.close()
        return idle, counts, ok

    slow = SlowSenders(server.port, 16)
    slow.thread.start()
    try:
        idle, counts, ok = asyncio.run(run())
        peak = server.peak_rss_kib()  # since start: model loading included
        alive = server.alive
    finally:
        slow.stop.set()
        slow.thread.join(5)
        server.stop()
    assert alive and ok == list(range(20))
    assert set(counts) <= {"answered", "rejected", "overloaded"}, counts
    assert sum(counts.values()) == 5000
    assert peak < 2 * idle
