"""Where a one-sample call's time goes in a tier server: CPU per call, part by part.

Throughput on loopback needs free cores; CPU time per call does not (much): a server
saturated on a core of its own answers at most 1 / (CPU seconds per sample) samples per
second. So this script measures, for each configuration in `--configs`:

- offline: the CPU time per sample of `TierEngine.run` (decode + tail + exit, the
  server's exact work) on batches of `--max-batch` pre-encoded samples, in this process;
- the server (`flowcodec serve` in a child process, one torch thread): `--calls`
  single-sample calls kept `--in-flight` at a time (closed loop). Its CPU time per answered
  sample by thread (the event loop, the batch worker, gRPC's own threads, from /proc),
  and, inside the loop thread, the time in the server's own Python by part (envelope
  parsing, stream checks, answer encoding: functions timed with the thread's CPU clock;
  nested timed calls count once, to the outermost), and in the worker the engine's
  decode and the rest of its work; and the mean batch the server formed (its Stats);
- `cpu_ratio` = offline CPU per sample / server CPU per sample: what bench_serve.py's
  `serving_ratio` would be with the server pinned to a free core and a load generator
  fast enough; the wall-clock throughput of the run is printed beside it (on a busy
  machine it says little).

A configuration is `TRANSPORT:ANSWER`: `grpc` or `tcp` (the framed TCP port of
`flowcodec serve --tcp-port`), and `json` or `binary` answers. `--src DIR` runs the server
from another source tree (e.g. `git archive` of an older commit) for a before/after in
one run; the load generator always runs from this tree.

    FLOWCODEC_DATA=../shared/data .venv/bin/python experiments/bench_serve_cpu.py \\
        --family cifar10 --point 2 --configs grpc:json,grpc:binary,tcp:binary
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: Parts of the loop thread's own work: (module, attribute path) of the functions timed.
#: Names that a server tree does not have are skipped (older and newer trees differ).
PARTS = {
    "parse envelope": [("flowcodec.serve.server", "parse_request"),
                       ("flowcodec.serve.server", "parse_batch"),
                       ("flowcodec.serve.server", "parse_requests")],
    "stream checks": [("flowcodec.serve.engine", "TierEngine.stream_of"),
                      ("flowcodec.serve.engine", "TierEngine.streams_of")],
    "answer encoding": [("flowcodec.serve.server", "encode_answer"),
                        ("flowcodec.serve.server", "TierServer._answer_base"),
                        ("flowcodec.serve.server", "encode_batch_answer")],
    "engine: decode": [("flowcodec.serve.engine", "TierEngine._decode")],
    "engine: all": [("flowcodec.serve.engine", "TierEngine.run")],
}  # fmt: skip


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, summed by role (main: the event loop)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        comm = head.split("(", 1)[1]
        f_ = rest.split()
        role = "event loop" if int(tid) == pid else _role(comm)
        out[role] = out.get(role, 0.0) + (int(f_[11]) + int(f_[12])) / tick
    return out


def _role(comm: str) -> str:
    if comm.startswith("flowcodec-tier") or comm.startswith("python"):
        return "batch worker and other Python threads"
    return "gRPC / native threads"


def _child(log_path: str, argv: list[str]) -> int:
    """``flowcodec ARGV`` with the PARTS timed; SIGUSR1 writes the totals to LOG_PATH."""
    import importlib

    totals: dict[str, list[int]] = {p: [0, 0] for p in PARTS}
    local = threading.local()

    def timed(f, part: str):
        engine = part.startswith("engine")  # the worker's parts nest: each is timed whole

        @functools.wraps(f)
        def g(*a, **k):
            if getattr(local, "busy", False) and not engine:  # nested: the outermost counts
                return f(*a, **k)
            busy, local.busy = getattr(local, "busy", False), True
            t = time.thread_time_ns()
            try:
                return f(*a, **k)
            finally:
                local.busy = busy
                tot = totals[part]
                tot[0] += time.thread_time_ns() - t
                tot[1] += 1
        return g

    found = []
    for part, names in PARTS.items():  # (the parts of this tree's server that exist)
        for mod_name, path in names:
            obj = importlib.import_module(mod_name)
            *owners, attr = path.split(".")
            for o in owners:
                obj = getattr(obj, o, None)
            if obj is not None and callable(getattr(obj, attr, None)):
                setattr(obj, attr, timed(getattr(obj, attr), part))
                found.append(path)
    seq = [0]

    def dump(*_):
        seq[0] += 1
        tmp = log_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"seq": seq[0], "totals": totals, "timed": found}, fh)
        os.replace(tmp, log_path)

    signal.signal(signal.SIGUSR1, dump)
    from flowcodec.cli import main as cli_main

    return cli_main(argv)


def _snapshot(proc, log_path: str, address: str) -> tuple[dict, dict, dict]:
    """The child's part totals (after a SIGUSR1), its threads' CPU and its batch sizes
    (``{size: count}``, from its Stats call), taken together."""
    from flowcodec.serve.tcp import connect

    before = json.loads(Path(log_path).read_text())["seq"] if os.path.exists(log_path) else 0
    with connect(address) as client:
        sizes = {int(k): v for k, v in json.loads(client.stats())["batch_sizes"].items()}
    cpu = _thread_cpu(proc.pid)
    proc.send_signal(signal.SIGUSR1)
    end = time.time() + 60
    while time.time() < end:
        try:
            got = json.loads(Path(log_path).read_text())
            if got["seq"] > before:
                return got, cpu, sizes
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("the server did not report its totals")


def offline_cpu_per_sample(engine, pool: list[bytes], batch: int, calls: int) -> float:
    from flowcodec.serve.wire import parse_request

    streams = [engine.stream_of(parse_request(r)) for r in pool]
    engine.run(streams[:batch])
    n, t0 = 0, time.thread_time()
    while n < calls:
        for s in range(0, len(streams) - batch + 1, batch):
            engine.run(streams[s : s + batch])
            n += batch
    return (time.thread_time() - t0) / n


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="digits")
    ap.add_argument("--point", type=int, default=1)
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--codec-kwargs", default='{"dtype": "float16"}')
    ap.add_argument("--configs", default="grpc:json,tcp:binary",
                    help="TRANSPORT:ANSWER,... with TRANSPORT grpc or tcp, ANSWER json or binary")
    ap.add_argument("--src", default=None,
                    help="source tree to run the server from (default: this checkout)")
    ap.add_argument("--calls", type=int, default=3000, help="measured calls per config")
    ap.add_argument("--in-flight", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.pretrained import family_dataset
    from flowcodec.serve.bench import closed_loop_calls, free_port, request_pool
    from flowcodec.serve.cli import build_codec_from_args
    from flowcodec.serve.engine import TierEngine, TierSpec
    from flowcodec.serve.server import freeze_heap

    torch.set_num_threads(1)
    fam = load_pretrained(args.family, progress=False)
    k = fam.num_members
    codec = build_codec_from_args(fam, args.point, args.codec, args.codec_kwargs, None)
    _, test = load_dataset(family_dataset(args.family))
    data = test.subset(min(args.pool, len(test)), seed=0)
    pool = request_pool(fam, codec, data.normalize(data.images), args.point)
    engine = TierEngine(fam, TierSpec("edge", args.point, k), codec)
    freeze_heap()
    off = offline_cpu_per_sample(engine, pool, args.max_batch, max(args.calls, 1024))
    print(f"offline: {1e6 * off:.0f} us CPU per sample (batch {args.max_batch}, 1 thread)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    results = []
    for cfg in args.configs.split(","):
        transport, answer = cfg.split(":")
        port, tcp_port = free_port(), free_port()
        log = tempfile.mktemp(prefix="flowcodec-cpu-", suffix=".json")
        serve = ["serve", "--family", args.family, "--point-in", str(args.point), "--point",
                 str(k), "--codec", args.codec, "--codec-kwargs", args.codec_kwargs,
                 "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                 "--queue", "1024", "--threads", "1", "--no-progress", "--port", str(port)]
        if transport == "tcp":
            serve += ["--tcp-port", str(tcp_port)]
        proc = subprocess.Popen([sys.executable, __file__, "--child", log, *serve],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=args.src or None)  # fmt: skip
        lines = []
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server did not start:\n{''.join(lines)}")
            lines.append(line)
            if "listening on" in line:
                break
        address = f"tcp://127.0.0.1:{tcp_port}" if transport == "tcp" else f"127.0.0.1:{port}"
        try:
            asyncio.run(closed_loop_calls(address, pool, min(200, args.calls), args.in_flight,
                                          answer))  # fmt: skip
            parts0, cpu0, sizes0 = _snapshot(proc, log, address)
            t0 = time.perf_counter()
            res = asyncio.run(closed_loop_calls(address, pool, args.calls, args.in_flight,
                                                answer))  # fmt: skip
            wall = time.perf_counter() - t0
            parts1, cpu1, sizes1 = _snapshot(proc, log, address)
        finally:
            proc.send_signal(signal.SIGTERM)
            tail = proc.communicate(timeout=60)[0].strip().splitlines()
            os.unlink(log)
        n = res.answered
        if n != res.sent or res.duplicates:
            print(f"  warning: {res.sent} sent, {n} answered, {res.duplicates} twice, "
                  f"{res.fail_reasons}")  # fmt: skip
        by_thread = {r: 1e6 * (cpu1.get(r, 0.0) - cpu0.get(r, 0.0)) / n for r in cpu1}
        total = sum(by_thread.values())
        parts = {p: 1e6 * (parts1["totals"][p][0] - parts0["totals"][p][0]) / 1e9 / n
                 for p in PARTS}  # fmt: skip
        parts["engine: stages, exit"] = parts.pop("engine: all") - parts["engine: decode"]
        loop_own = sum(v for p, v in parts.items() if not p.startswith("engine"))
        batches = {b: sizes1.get(b, 0) - sizes0.get(b, 0) for b in sizes1}
        mean_batch = sum(b * c for b, c in batches.items()) / max(1, sum(batches.values()))
        row = {"config": cfg, "src": args.src or "this checkout", "calls": n,
               "offline_cpu_us": round(1e6 * off, 1), "server_cpu_us": round(total, 1),
               "cpu_ratio": round(1e6 * off / total, 3), "by_thread_us":
               {r: round(v, 1) for r, v in by_thread.items()},
               "parts_us": {p: round(v, 1) for p, v in parts.items()},
               "loop_rest_us": round(by_thread.get("event loop", 0.0) - loop_own, 1),
               "mean_batch": round(mean_batch, 1),
               "wall_calls_per_s": round(n / wall, 1), "timed": parts1["timed"]}  # fmt: skip
        results.append(row)
        print(f"{cfg} ({row['src']}): server {total:.0f} us CPU per sample = "
              f"{row['cpu_ratio']:.2f} of offline; mean batch {mean_batch:.1f}; wall "
              f"{n / wall:.0f} calls/s")
        for r, v in sorted(by_thread.items()):
            print(f"    {r:40s} {v:8.1f} us")
        for p, v in parts.items():
            print(f"      {p:38s} {v:8.1f} us")
        print(f"      {'rest of the loop (transport, asyncio)':38s} {row['loop_rest_us']:8.1f} us")
        print(f"    server: {tail[-1] if tail else '(no output)'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
