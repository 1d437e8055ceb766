"""Where a sample's time goes on the real path device -> proxy -> edge (one device, batch 1).

Runs `flowcodec proxy` and `flowcodec serve` as child processes of this script with
timestamps around their handlers (CLOCK_MONOTONIC, which all processes on one machine
share), sends `--samples` digits one at a time through `RemoteHop`, and prints the median
of each leg: the device's work before the send, each gRPC leg, the link computation,
the proxy's hold, the edge's queue, batch compute and answer. Profiling aid behind
docs/deployment.md ("Simulator against a real run"); run it with the cores free:

    flock /work/helpers/cpu.lock .venv/bin/python experiments/bench_serve_breakdown.py
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def _child(role: str, log_path: str, argv: list[str]) -> int:
    """Run `flowcodec ARGV` with its handlers timed; the log is written at exit."""
    from flowcodec.serve import client, engine, proxy, server

    log: list[tuple[str, float, float]] = []

    def timed(cls, name: str, tag: str, is_async: bool) -> None:
        f = getattr(cls, name)
        if is_async:
            async def g(*a, **k):
                t = time.monotonic()
                try:
                    return await f(*a, **k)
                finally:
                    log.append((tag, t, time.monotonic()))
        else:
            def g(*a, **k):
                t = time.monotonic()
                try:
                    return f(*a, **k)
                finally:
                    log.append((tag, t, time.monotonic()))
        setattr(cls, name, functools.wraps(f)(g))

    timed(server.TierServer, "_infer", "edge.infer", True)
    timed(engine.TierEngine, "run", "edge.run", False)
    timed(proxy.LinkProxy, "_infer", "proxy.infer", True)
    timed(proxy.LinkProxy, "_transmit", "proxy.link", False)
    timed(client.AsyncTierClient, "infer", "proxy.up", True)

    def dump() -> None:
        with open(log_path, "w") as fh:
            json.dump(log, fh)

    atexit.register(dump)
    from flowcodec.cli import main as cli_main

    return cli_main(argv)


def _spawn(role: str, log_path: str, argv: list[str]):
    from flowcodec.serve.bench import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, __file__, "--child", role, log_path, *argv,
                          "--port", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} did not start")
        if "listening on" in line or "proxy: " in line:
            return p, f"127.0.0.1:{port}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], sys.argv[3], sys.argv[4:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--symbol-rate", default="1e6")
    ap.add_argument("--delay-ms", default="2")
    args = ap.parse_args()
    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.pipeline import Flow, Tier
    from flowcodec.serve import client
    from flowcodec.serve.remote import RemoteHop
    from flowcodec.serve.server import freeze_heap

    torch.set_num_threads(1)
    sent: list[float] = []
    got: list[float] = []
    start_future, result = client.TierClient.infer_future, client.TierClient.result

    def infer_future(self, *a, **k):
        sent.append(time.monotonic())
        return start_future(self, *a, **k)

    def result_(fut):
        out = result(fut)
        got.append(time.monotonic())
        return out

    client.TierClient.infer_future = infer_future
    client.TierClient.result = staticmethod(result_)
    fam = load_pretrained("digits", progress=False)
    codec = build_codec("raw", fam.feature_shape(1), dtype="float16").eval()
    _, test = load_dataset("digits")
    data = test.subset(args.samples, seed=0)
    x = data.normalize(data.images)
    tmp = tempfile.mkdtemp(prefix="flowcodec-breakdown-")
    logs = {r: os.path.join(tmp, f"{r}.json") for r in ("edge", "proxy")}
    edge, ea = _spawn("edge", logs["edge"], [
        "serve", "--family", "digits", "--point-in", "1", "--point", "3", "--codec-kwargs",
        '{"dtype": "float16"}', "--max-wait-ms", "0", "--threads", "1", "--no-progress"])
    px, pa = _spawn("proxy", logs["proxy"], [
        "proxy", "--upstream", ea, "--link", "fast", "--mcs", "9", "--snr-db", "5", "--seed",
        "0", "--symbol-rate", args.symbol_rate, "--delay-ms", args.delay_ms])  # fmt: skip
    try:
        hop = RemoteHop(codec, pa, deadline_s=5.0, first_seq=0)
        flow = Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop])
        freeze_heap()
        flow.run(x[:1])  # warm-up
        sent.clear()
        got.clear()
        began = []
        for i in range(len(x)):
            began.append(time.monotonic())
            flow.run(x[i : i + 1])
        hop.close()
    finally:
        for p in (px, edge):
            p.send_signal(signal.SIGTERM)
            print(p.communicate(timeout=30)[0].strip().splitlines()[-1])
    ev: dict[str, list] = {}
    for r in ("edge", "proxy"):
        with open(logs[r]) as fh:
            for tag, a, b in json.load(fh):
                ev.setdefault(tag, []).append((a, b))
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(x)
    if len(sent) != n or len(got) != n or any(len(v) < n for v in ev.values()):
        raise RuntimeError(f"timestamps missing: {n} samples, {len(sent)} sent, {len(got)} "
                           f"answered, {({k: len(v) for k, v in ev.items()})} logged")
    last = {k: v[len(v) - n :] for k, v in ev.items()}  # after the warm-up sample
    legs: dict[str, list[float]] = {}

    def add(name: str, v: float) -> None:
        legs.setdefault(name, []).append(1e3 * v)

    for i in range(n):
        pi, pl, pu = last["proxy.infer"][i], last["proxy.link"][i], last["proxy.up"][i]
        ei, er = last["edge.infer"][i], last["edge.run"][i]
        add("device: Flow.run up to the send", sent[i] - began[i])
        add("gRPC device -> proxy", pi[0] - sent[i])
        add("proxy: link computation (inside the hold)", pl[1] - pl[0])
        add("proxy: hold (link time + its own work)", pu[0] - pi[0])
        add("gRPC proxy -> edge", ei[0] - pu[0])
        add("edge: queue, batcher, hand-off to the worker", er[0] - ei[0])
        add("edge: TierEngine.run (batch 1)", er[1] - er[0])
        add("edge: answer back to the loop", ei[1] - er[1])
        add("gRPC edge -> proxy -> device", got[i] - ei[1])
        add("total (device start to answer)", got[i] - began[i])
    print(f"{n} samples, symbol rate {args.symbol_rate}, delay {args.delay_ms} ms; "
          "median ms per leg:")
    for k, v in legs.items():
        print(f"  {k:46s} {statistics.median(v):8.3f}")


if __name__ == "__main__":
    main()
