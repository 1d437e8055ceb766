"""Hostile input against a running edge server: crashes and peak memory.

Starts `flowcodec serve` (digits, point 1 -> 3, raw float16) in a child process, measures
its resident memory when idle (after a warm-up), then sends `--messages` hostile requests,
32 in flight, while 32 raw TCP connections trickle partial HTTP/2 frames (slow senders):

- random bytes, and random bytes behind the envelope's magic;
- real envelopes cut short, and with oversized unit counts and unit lengths;
- real streams whose packet payloads are mutated and re-framed with valid CRCs;
- another codec's header; units that do not match the header's packet count;
- messages over the server's size limit (1 in 1,000).

It polls the server's memory every 0.1 s, checks that well-formed requests are still
answered afterwards, and reports every outcome counted. Targets: 0 crashes, peak memory
within 2x of idle.

    flock /work/helpers/cpu.lock .venv/bin/python experiments/bench_serve_hostile.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import torch

from flowcodec.codecs import build_codec
from flowcodec.data import load_dataset
from flowcodec.family import load_pretrained
from flowcodec.progress import tqdm
from flowcodec.serve.bench import SlowSenders, hostile_messages, request_pool, spawn
from flowcodec.serve.client import AsyncTierClient, RemoteError
from flowcodec.serve.wire import Request, encode_request, parse_answer, parse_request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--slow-senders", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_serve/hostile.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fam = load_pretrained("digits", progress=False)
    codec = build_codec("raw", fam.feature_shape(1), dtype="float16")
    _, test = load_dataset("digits")
    data = test.subset(256, seed=0)
    x = data.normalize(data.images)
    pool = request_pool(fam, codec, x, 1)
    with torch.no_grad():
        streams = codec.compress(fam.features(x, 1))
    for i, s in enumerate(streams):
        s.seq = i
    o = build_codec("raw", fam.feature_shape(2)).compress(torch.zeros(1, *fam.feature_shape(2)))
    other = encode_request(Request(1, 0, o[0].header_bytes(), o[0].units()))

    server = spawn("serve", ["--family", "digits", "--point-in", "1", "--point", "3",
                             "--queue", "256"])  # fmt: skip
    peak = [0]
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            peak[0] = max(peak[0], server.rss_kib())
            polling.wait(0.1)

    async def good(n: int) -> int:
        c = AsyncTierClient(server.address)
        ok = 0
        for r in pool[:n]:
            ok += parse_answer(await c.infer(r, 10.0))["rid"] == parse_request(r).rid
        await c.close()
        return ok

    async def attack() -> dict:
        counts: dict[str, dict[str, int]] = {}
        clients = [AsyncTierClient(server.address) for _ in range(4)]
        sem = asyncio.Semaphore(args.in_flight)

        async def one(i: int, kind: str, msg: bytes) -> None:
            async with sem:
                try:
                    parse_answer(await clients[i % 4].infer(msg, 10.0))
                    out = "answered"
                except RemoteError as e:
                    out = e.reason
                counts.setdefault(kind, {})
                counts[kind][out] = counts[kind].get(out, 0) + 1

        pending: set[asyncio.Task] = set()
        msgs = hostile_messages(pool, streams, other, args.messages, args.seed)
        for i, (kind, msg) in enumerate(tqdm(msgs, total=args.messages, desc="hostile")):
            await sem.acquire()
            sem.release()
            t = asyncio.create_task(one(i, kind, msg))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        for c in clients:
            await c.close()
        return counts

    try:
        warm = asyncio.run(good(100))
        time.sleep(1.0)
        idle = server.rss_kib()
        threading.Thread(target=poll, daemon=True).start()
        slow = SlowSenders(server.port, args.slow_senders)
        slow.thread.start()
        t0 = time.perf_counter()
        counts = asyncio.run(attack())
        seconds = time.perf_counter() - t0
        after = asyncio.run(good(100))
        slow.stop.set()
        slow.thread.join(5)
        polling.set()
        alive = server.alive
        hwm = server.peak_rss_kib()
    finally:
        log = server.stop()
    summary = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "messages": args.messages, "seconds": round(seconds, 1), "server_alive": alive,
        "crashes": int(not alive), "idle_rss_mib": round(idle / 1024, 1),
        "peak_rss_mib": round(peak[0] / 1024, 1), "peak_over_idle": round(peak[0] / idle, 3),
        "vmhwm_mib": round(hwm / 1024, 1),
        "good_before": warm, "good_after": after, "slow_connections_opened": slow.opened,
        "outcomes": counts, "server_stats": log.strip().splitlines()[-1] if log else "",
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
