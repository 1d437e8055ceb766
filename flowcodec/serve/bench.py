"""Helpers of the serving benchmarks (``experiments/bench_serve*.py``) and slow tests.

- :func:`spawn` starts ``flowcodec serve`` / ``flowcodec proxy`` as a child process on a
  free loopback port and waits until it listens; :class:`Child` stops it (gracefully or
  with SIGKILL) and reads its resident memory from ``/proc``;
- :func:`request_pool` encodes test samples into request envelopes ahead of time (the
  device's work is not what a server benchmark measures);
- :func:`open_loop` offers Poisson arrivals from ``N`` devices at a given total rate and
  :func:`closed_loop` keeps a fixed number of requests in flight (for a time;
  :func:`closed_loop_calls`: for a number of calls); all count every request (answered,
  refused, failed, answered twice: each request carries a request id of its own, checked
  against its answer) and record the latency of each answer. With
  ``samples_per_request=S`` above 1 each call is an ``InferBatch`` of ``S`` samples, and
  every figure still counts samples (a call refused whole counts ``S`` refusals). The
  address picks the transport (``tcp://host:port``: the server's TCP port, else gRPC) and
  ``answer`` the form of the answers asked for (``"binary"`` or ``"json"``);
- :func:`pin_to_cpu` pins a process (every thread of it) to one CPU, so that a server
  and its load generator do not share a core.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Child", "spawn", "free_port", "request_pool", "LoadResult", "open_loop",
           "closed_loop", "closed_loop_calls", "percentile", "rss_kib", "hostile_messages",
           "SlowSenders", "pin_to_cpu"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of process ``pid`` in KiB (``field="VmHWM"``: its peak since it
    started); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Child:
    """A ``flowcodec`` child process listening on ``port``."""

    proc: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tcp_address(self) -> str:
        """The TCP port it printed (``flowcodec serve --tcp-port``) as a client address."""
        m = re.search(r" and tcp://\S+:(\d+)", "".join(self.log))
        if m is None:
            raise RuntimeError(f"flowcodec child names no TCP port:\n{''.join(self.log)}")
        return f"tcp://127.0.0.1:{m.group(1)}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def peak_rss_kib(self) -> int:
        """The most memory the process has held since it started (VmHWM)."""
        return rss_kib(self.proc.pid, "VmHWM")

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> str:
        """SIGTERM (the server drains), then wait; returns what it printed."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return "".join(self.log) + (out or "")


def pin_to_cpu(pid: int, cpu: int) -> str | None:
    """Pin process ``pid``, every thread it has now, to CPU ``cpu`` (threads it starts
    later inherit the pin from the thread that starts them). Returns ``None`` when done,
    or why nothing was pinned: no ``os.sched_setaffinity`` on this platform, ``cpu`` not
    among the CPUs this process may use, or the kernel refused."""
    if not hasattr(os, "sched_setaffinity"):
        return "CPU affinity is not supported on this platform"
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        return f"CPU {cpu} is not among the usable CPUs {sorted(allowed)}"
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # no /proc: the main thread only
        tids = [pid]
    try:
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {cpu})
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    except OSError as e:
        return f"sched_setaffinity refused: {e}"
    return None


def spawn(command: str, args: list[str], port: int | None = None, threads: int = 1,
          timeout: float = 120.0, src: str | None = None) -> Child:  # fmt: skip
    """Start ``flowcodec COMMAND ARGS --port PORT`` and wait for its "listening" line
    (``src``: run it from that source tree, e.g. an older commit's, instead of this one)."""
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.path.abspath(src)
    argv = [sys.executable, "-m", "flowcodec.cli", command, *args, "--port", str(port)]
    if command == "serve":
        argv += ["--threads", str(threads), "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    child = Child(proc, port)
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        child.log.append(line)
        if re.search(r"listening on|proxy: .* -> ", line):
            return child
    child.kill()
    raise RuntimeError(f"flowcodec {command} did not start:\n{''.join(child.log)}")


def request_pool(family, codec, images, point: int, framing: str = "sample") -> list[bytes]:
    """One request envelope per image (features at ``point`` compressed by ``codec``)."""
    import torch

    from flowcodec.serve.wire import Request, encode_request

    with torch.no_grad():
        streams = codec.compress(family.features(images, point))
    out = []
    for i, s in enumerate(streams):
        s.seq = i
        out.append(encode_request(Request(i, i, s.header_bytes(), s.units(framing), framing)))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank rule (nan when empty)."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]


@dataclass
class LoadResult:
    """What a load run offered and got."""

    devices: int
    offered_per_s: float
    seconds: float
    sent: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    duplicates: int = 0
    latencies_s: list[float] = field(default_factory=list)
    fail_reasons: dict[str, int] = field(default_factory=dict)
    samples_per_request: int = 1

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> dict:
        return {"devices": self.devices, "samples_per_request": self.samples_per_request,
                "offered_per_s": round(self.offered_per_s, 1),
                "sent": self.sent, "answered": self.answered, "refused": self.refused,
                "failed": self.failed, "duplicates": self.duplicates,
                "throughput_per_s": round(self.throughput, 1),
                "p50_ms": round(1e3 * percentile(self.latencies_s, 0.5), 3),
                "p99_ms": round(1e3 * percentile(self.latencies_s, 0.99), 3),
                "fail_reasons": ";".join(f"{k}={v}" for k, v in
                                         sorted(self.fail_reasons.items()))}  # fmt: skip


def _stamped(base: bytes, rid: int, answer: str) -> bytes:
    """A pool envelope with request id ``rid`` and the answer form asked for (the flags
    byte and the id field of wire.py's fixed part)."""
    flags = base[4] | 4 if answer == "binary" else base[4] & ~4
    return base[:4] + bytes((flags,)) + struct.pack("<Q", rid) + base[13:]


async def _send(client, pool, i, rid_seen, res: LoadResult, timeout: float, t_sched: float,
                answer: str = "binary"):  # fmt: skip
    from flowcodec.serve.client import RemoteError
    from flowcodec.serve.wire import parse_answer

    base = pool[i % len(pool)]
    rid = res.sent
    res.sent += 1
    req = _stamped(base, rid, answer)
    try:
        ans = parse_answer(await client.infer(req, timeout))
    except RemoteError as e:
        if e.reason == "overloaded":
            res.refused += 1
        else:
            res.failed += 1
            res.fail_reasons[e.reason] = res.fail_reasons.get(e.reason, 0) + 1
        return
    if ans["rid"] != rid or rid in rid_seen:
        res.duplicates += 1
        return
    rid_seen.add(rid)
    res.answered += 1
    res.latencies_s.append(time.perf_counter() - t_sched)


async def _send_batch(client, pool, i, size: int, rid_seen, res: LoadResult, timeout: float,
                      t_sched: float, answer: str = "binary"):  # fmt: skip
    """One ``InferBatch`` call of ``size`` samples (pool entries ``i, i+1, ...``), each
    with a request id of its own; every sample is counted as :func:`_send` counts one."""
    from flowcodec.serve.client import RemoteError
    from flowcodec.serve.wire import WireError

    rids = list(range(res.sent, res.sent + size))
    res.sent += size
    reqs = []
    for j, rid in enumerate(rids):
        base = pool[(i + j) % len(pool)]
        reqs.append(_stamped(base, rid, answer))
    try:
        entries = await client.infer_batch(reqs, timeout)
    except (RemoteError, WireError) as e:
        reason = e.reason if isinstance(e, RemoteError) else "bad answer"
        if reason == "overloaded":
            res.refused += size
        else:
            res.failed += size
            res.fail_reasons[reason] = res.fail_reasons.get(reason, 0) + size
        return
    took = time.perf_counter() - t_sched
    for rid, ans in zip(rids, entries):
        if isinstance(ans, RemoteError):
            res.failed += 1
            res.fail_reasons[ans.reason] = res.fail_reasons.get(ans.reason, 0) + 1
        elif ans["rid"] != rid or rid in rid_seen:
            res.duplicates += 1
        else:
            rid_seen.add(rid)
            res.answered += 1
            res.latencies_s.append(took)


def _sender(samples_per_request: int, answer: str = "binary"):
    """The coroutine function that sends one call: single-sample calls exactly as before
    ``samples_per_request`` existed, else batch calls; answers asked for in ``answer``."""
    from flowcodec.errors import ConfigError
    from flowcodec.serve.wire import ANSWER_FORMS, MAX_BATCH_SAMPLES

    if not 1 <= samples_per_request <= MAX_BATCH_SAMPLES:
        raise ConfigError(f"samples_per_request must be in 1..{MAX_BATCH_SAMPLES}")
    if answer not in ANSWER_FORMS:
        raise ConfigError(f"answer must be one of {ANSWER_FORMS}, got {answer!r}")
    if samples_per_request == 1:

        async def send_one(client, pool, i, rid_seen, res, timeout, t_sched):
            await _send(client, pool, i, rid_seen, res, timeout, t_sched, answer)

        return send_one

    async def send(client, pool, i, rid_seen, res, timeout, t_sched):
        await _send_batch(client, pool, i, samples_per_request, rid_seen, res, timeout,
                          t_sched, answer)  # fmt: skip

    return send


async def open_loop(address: str, pool: list[bytes], devices: int, rate: float,
                    seconds: float, timeout: float = 5.0, seed: int = 0,
                    samples_per_request: int = 1,
                    answer: str = "binary") -> LoadResult:  # fmt: skip
    """Each of ``devices`` devices sends Poisson arrivals at ``rate / devices`` samples per
    second for ``seconds`` (in calls of ``samples_per_request`` samples, so calls arrive
    at that rate divided by it); latency counts from the scheduled send time (so a late
    sender does not hide queueing). Returns when every request has its answer or error."""
    from flowcodec.serve.tcp import connect_async

    send = _sender(samples_per_request, answer)
    clients = [connect_async(address) for _ in range(min(devices, 8))]
    res = LoadResult(devices, rate, seconds, samples_per_request=samples_per_request)
    call_rate = rate / devices / samples_per_request
    seen: set[int] = set()
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()

    async def device(d: int) -> None:
        rng = random.Random(seed * 1000 + d)
        t = start + rng.expovariate(call_rate)
        while t < start + seconds:
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(clients[d % len(clients)], pool, res.sent + d,
                                                  seen, res, timeout, t)))  # fmt: skip
            t += rng.expovariate(call_rate)

    await asyncio.gather(*(device(d) for d in range(devices)))
    if tasks:
        await asyncio.gather(*tasks)
    res.seconds = time.perf_counter() - start
    for c in clients:
        await c.close()
    return res


async def closed_loop(address: str, pool: list[bytes], devices: int, seconds: float,
                      in_flight: int = 2, timeout: float = 10.0,
                      samples_per_request: int = 1,
                      answer: str = "binary") -> LoadResult:  # fmt: skip
    """``devices`` devices each keep ``in_flight`` calls of ``samples_per_request``
    samples outstanding for ``seconds`` (saturation throughput, in samples per second)."""
    from flowcodec.serve.tcp import connect_async

    send = _sender(samples_per_request, answer)
    clients = [connect_async(address) for _ in range(min(devices, 8))]
    res = LoadResult(devices, float("nan"), seconds, samples_per_request=samples_per_request)
    seen: set[int] = set()
    start = time.perf_counter()

    async def lane(k: int) -> None:
        while time.perf_counter() - start < seconds:
            await send(clients[k % len(clients)], pool, res.sent, seen, res, timeout,
                       time.perf_counter())  # fmt: skip

    await asyncio.gather(*(lane(k) for k in range(devices * in_flight)))
    res.seconds = time.perf_counter() - start
    for c in clients:
        await c.close()
    return res


async def closed_loop_calls(address: str, pool: list[bytes], calls: int, in_flight: int,
                            answer: str = "binary", timeout: float = 60.0,
                            connections: int = 8) -> LoadResult:  # fmt: skip
    """``calls`` single-sample calls, ``in_flight`` of them outstanding at a time over
    ``connections`` clients (for CPU-time measurements: a fixed amount of work whatever
    the machine's speed). Every request is counted as :func:`closed_loop` counts it."""
    from flowcodec.serve.tcp import connect_async

    send = _sender(1, answer)
    clients = [connect_async(address) for _ in range(max(1, min(connections, in_flight)))]
    res = LoadResult(in_flight, float("nan"), 0.0)
    seen: set[int] = set()
    start = time.perf_counter()

    async def lane(k: int) -> None:
        while res.sent < calls:
            await send(clients[k % len(clients)], pool, res.sent, seen, res, timeout,
                       time.perf_counter())  # fmt: skip

    await asyncio.gather(*(lane(k) for k in range(in_flight)))
    res.seconds = time.perf_counter() - start
    for c in clients:
        await c.close()
    return res


def hostile_messages(pool: list[bytes], streams: list, other: bytes, n: int, seed: int):
    """``(kind, message)`` pairs, ``n`` of them: random bytes, truncated envelopes,
    oversized counts and lengths, mutated streams re-framed with valid CRCs (``streams``
    are real samples with their ``seq`` set), another codec's request (``other``), unit
    counts that do not match the header, and (1 in 1,000) a message over 2 MiB."""
    from flowcodec.bitstream import Bitstream
    from flowcodec.serve.wire import Request, encode_request, parse_request

    rng = random.Random(seed)
    for i in range(n):
        kind = i % 9
        base = pool[rng.randrange(len(pool))]
        if i % 1000 == 999:
            yield "oversized message", b"FCQ1" + bytes(2 << 20)
        elif kind == 0:
            yield "random bytes", rng.randbytes(rng.randrange(0, 2048))
        elif kind == 1:
            yield "random after magic", b"FCQ1" + rng.randbytes(rng.randrange(0, 2048))
        elif kind == 2:
            yield "truncated", base[: rng.randrange(len(base))]
        elif kind == 3:  # the unit count (after the header) made 65535
            pos = 19 + struct.unpack_from("<H", base, 17)[0]
            yield "oversized unit count", base[:pos] + b"\xff\xff" + base[pos + 2 :]
        elif kind == 4:  # the first unit's length field made huge
            pos = 19 + struct.unpack_from("<H", base, 17)[0] + 2
            yield "oversized unit length", base[:pos] + struct.pack("<I", 0xFFFFFFF0) + \
                base[pos + 4 :]  # fmt: skip
        elif kind in (5, 6, 7):
            s = streams[rng.randrange(len(streams))]
            pk = [bytearray(p) for p in s.packets]
            for _ in range(rng.randrange(1, 64)):
                j = rng.randrange(len(pk))
                if pk[j]:
                    pk[j][rng.randrange(len(pk[j]))] = rng.randrange(256)
            if rng.random() < 0.2:  # and sometimes a packet of another length
                j = rng.randrange(len(pk))
                pk[j] = pk[j][: rng.randrange(len(pk[j]) + 1)] + bytearray(rng.randrange(8))
            m = Bitstream(s.header, [bytes(p) for p in pk], seq=s.seq)
            yield "mutated stream, valid CRCs", encode_request(
                Request(i, s.seq, m.header_bytes(), m.units("sample")))
        else:
            req = parse_request(base)
            if rng.random() < 0.5:
                yield "another codec", other
            else:
                yield "unit count mismatch", encode_request(
                    Request(i, req.seq, req.header, req.units[:-1]))


class SlowSenders:
    """Raw connections that send a byte now and then and never finish a frame."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        socks = []
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00"
        while not self.stop.is_set():
            while len(socks) < self.n:
                try:
                    socks.append([socket.create_connection(("127.0.0.1", self.port), 5), 0])
                    self.opened += 1
                except OSError:
                    break
            for entry in list(socks):
                s, k = entry
                try:
                    s.send(preface[k : k + 1] if k < len(preface) else b"\x00")
                    entry[1] = k + 1
                except OSError:  # the server closed it: open another
                    s.close()
                    socks.remove(entry)
            self.stop.wait(0.5)
        for s, _ in socks:
            s.close()
