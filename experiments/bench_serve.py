"""Serving benchmark: one edge server (`flowcodec serve`) under N devices on loopback.

In one run, on the same machine and with the same thread count:

1. offline: `TierEngine.run` (decode + tail + exit, the server's exact work) on batches
   of `--max-batch` pre-encoded samples, in this process: samples per second;
2. saturation: the server in a child process, N=64 devices keeping 2 requests each in
   flight (closed loop): answers per second, and its ratio to (1) (target: >= 0.8);
   with `--samples-per-request S` above 1, a second saturation phase where each call is
   an `InferBatch` of S samples (`--sat-devices` devices x `--sat-in-flight` calls; by
   default 64 // S devices, so about as many samples are outstanding as in the
   single-sample phase): samples per second and its ratio to (1);
3. offered load: for each N in `--devices`, Poisson arrivals at fractions of the
   saturation throughput (open loop): throughput, p50 and p99 latency (from the scheduled
   send time to the answer), and every request counted: answered, refused (queue full),
   failed, answered twice.

`--pin` pins the server to CPU 1 and this process (the load generator) to CPU 0, so
that the two do not share a core (skipped, with a note, where affinity is unsupported).

`--transports grpc,tcp` runs phases 2 and 3 once per transport against the same offline
figure (a server per transport; `tcp`: its framed TCP port, `flowcodec serve --tcp-port`),
and `--answer json|binary` picks the answers' form (default binary; the servers before
the binary form answer JSON only). `--server-src DIR` runs the server from another source
tree (`git archive` of an older commit), for a before/after with the same command.

Writes `OUT/bench_serve_FAMILY.csv` and `.json` and the plot `--plot`. Run it with the
cores free (through the CPU lock):

    flock /work/helpers/cpu.lock nice -n 0 .venv/bin/python experiments/bench_serve.py
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import time
from pathlib import Path

import torch

from flowcodec.data import load_dataset
from flowcodec.family import load_pretrained
from flowcodec.family.pretrained import family_dataset, image_families
from flowcodec.progress import tqdm
from flowcodec.serve.bench import closed_loop, open_loop, pin_to_cpu, request_pool, spawn
from flowcodec.serve.cli import build_codec_from_args
from flowcodec.serve.engine import TierEngine, TierSpec
from flowcodec.serve.server import freeze_heap
from flowcodec.serve.wire import MAX_BATCH_SAMPLES, parse_request


def offline_throughput(engine: TierEngine, pool: list[bytes], batch: int,
                       seconds: float) -> float:  # fmt: skip
    streams = [engine.stream_of(parse_request(r)) for r in pool]
    engine.run(streams[:batch])  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in range(0, len(streams) - batch + 1, batch):
            engine.run(streams[s : s + batch])
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="digits", choices=image_families())
    ap.add_argument("--point", type=int, default=1, help="device split point (default 1)")
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--codec-kwargs", default='{"dtype": "float16"}')
    ap.add_argument("--devices", default="1,4,16,64")
    ap.add_argument("--loads", default="0.1,0.25,0.5,0.75,0.9,1.1",
                    help="offered load as fractions of the saturation throughput")
    ap.add_argument("--seconds", type=float, default=4.0, help="per load point")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--queue", type=int, default=512)
    ap.add_argument("--batches-in-flight", type=int, default=2, help="the server's (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (server and offline)")
    ap.add_argument("--pool", type=int, default=512, help="distinct test samples")
    ap.add_argument("--samples-per-request", type=int, default=1, metavar="S",
                    help="samples per call in a second saturation phase (InferBatch); "
                    "1 (default): single-sample calls only, as before")
    ap.add_argument("--sat-devices", type=int, default=0,
                    help="devices of the S-sample saturation phase (default 64 // S)")
    ap.add_argument("--sat-in-flight", type=int, default=2,
                    help="calls each device keeps in flight there (default 2)")
    ap.add_argument("--pin", action="store_true",
                    help="pin the server to CPU 1 and the load generator to CPU 0")
    ap.add_argument("--transports", default="grpc",
                    help="grpc, tcp, or both (grpc,tcp): one server and one set of phases each")
    ap.add_argument("--answer", default="binary", choices=["binary", "json"],
                    help="the form of the answers asked for (default binary)")
    ap.add_argument("--server-src", default=None,
                    help="run the server from this source tree (default: this checkout)")
    ap.add_argument("--out", default="runs/bench_serve")
    ap.add_argument("--plot", default=None, help="default docs/img/serve_load_FAMILY.png")
    args = ap.parse_args()
    spr = args.samples_per_request
    if not 1 <= spr <= MAX_BATCH_SAMPLES:
        ap.error(f"--samples-per-request must be in 1..{MAX_BATCH_SAMPLES}")
    if args.sat_devices < 0 or args.sat_in_flight < 1:
        ap.error("--sat-devices must be >= 0 (0: 64 // S) and --sat-in-flight >= 1")
    sat_devices = args.sat_devices or max(1, 64 // spr)
    transports = args.transports.split(",")
    if not transports or any(t not in ("grpc", "tcp") for t in transports):
        ap.error("--transports takes grpc, tcp or grpc,tcp")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = Path(args.plot or f"docs/img/serve_load_{args.family}.png")

    fam = load_pretrained(args.family, progress=False)
    k = fam.num_members
    codec = build_codec_from_args(fam, args.point, args.codec, args.codec_kwargs, None)
    _, test = load_dataset(family_dataset(args.family))
    data = test.subset(min(args.pool, len(test)), seed=0)
    pool = request_pool(fam, codec, data.normalize(data.images), args.point)
    engine = TierEngine(fam, TierSpec("edge", args.point, k), codec)
    freeze_heap()  # the load generator's full collections would stall its sends too
    offline = offline_throughput(engine, pool, args.max_batch, max(2.0, args.seconds))
    print(f"offline decode + tail (batch {args.max_batch}, {args.threads} thread): "
          f"{offline:.0f} samples/s", flush=True)  # fmt: skip

    common = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "family": args.family, "point": args.point, "codec": args.codec,
        "codec_kwargs": args.codec_kwargs, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "batches_in_flight": args.batches_in_flight,
        "offline_per_s": round(offline, 1), "queue": args.queue, "answer": args.answer,
        "server_src": args.server_src or "this checkout",
    }  # fmt: skip
    rows: list[dict] = []
    per: dict[str, dict] = {}
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    for transport in transports:
        if cpus is not None:  # --pin of the last transport's run: each server starts unpinned
            os.sched_setaffinity(0, cpus)
        t_rows, per[transport] = _run_transport(transport, args, pool, offline, k, spr,
                                                sat_devices)  # fmt: skip
        rows += [{"transport": transport, **r} for r in t_rows]
    # One transport: its figures at the top level, as before --transports existed.
    summary = {**common, **per[transports[-1]], "transports": per}
    print(json.dumps(summary, indent=1))
    name = f"bench_serve_{args.family}"
    (out / f"{name}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot([r for r in rows if r["transport"] == transports[-1]], summary, plot)
    print(f"wrote {out / name}.csv/.json and {plot}")


def _run_transport(transport: str, args, pool: list[bytes], offline: float, k: int, spr: int,
                   sat_devices: int) -> tuple[list[dict], dict]:  # fmt: skip
    """Phases 2 and 3 against a server reached over ``transport``: the rows and the
    summary's figures."""
    tcp = ["--tcp-port", "0"] if transport == "tcp" else []
    server = spawn("serve", ["--family", args.family, "--point-in", str(args.point),
                             "--point", str(k), "--codec", args.codec, "--codec-kwargs",
                             args.codec_kwargs, "--max-batch", str(args.max_batch),
                             "--max-wait-ms", str(args.max_wait_ms), "--queue",
                             str(args.queue), "--batches-in-flight",
                             str(args.batches_in_flight), "--max-samples-per-request",
                             str(max(64, spr)), *tcp], threads=args.threads,
                   src=args.server_src)  # fmt: skip
    try:
        address = server.tcp_address if transport == "tcp" else server.address
    except RuntimeError:
        server.stop()
        raise
    pinned = "off"
    if args.pin:
        why = pin_to_cpu(server.proc.pid, 1)
        if why is None and (why := pin_to_cpu(os.getpid(), 0)) is not None:
            why = f"server on CPU 1, but the load generator not pinned: {why}"
        pinned = "server CPU 1, load generator CPU 0" if why is None else f"skipped: {why}"
        print(f"--pin: {pinned}", flush=True)
    if spr > 1 and sat_devices * args.sat_in_flight * spr > args.queue:
        print(f"note: {sat_devices} x {args.sat_in_flight} calls of {spr} samples exceed the "
              f"queue of {args.queue}: calls that do not fit are refused (and counted)")
    rows: list[dict] = []
    sat_b = None
    answer = args.answer
    print(f"{transport} ({address}), {answer} answers:", flush=True)
    try:
        asyncio.run(closed_loop(address, pool, 8, 1.0, answer=answer))  # warm up
        sat = asyncio.run(closed_loop(address, pool, 64, max(3.0, args.seconds),
                                      answer=answer))  # fmt: skip
        ratio = sat.throughput / offline
        print(f"saturation (64 devices x 2 in flight): {sat.throughput:.0f} answers/s "
              f"= {ratio:.2f} of offline; p50 {sat.row()['p50_ms']} ms", flush=True)
        rows.append({"phase": "saturation", "load": "", **sat.row()})
        if spr > 1:
            sat_b = asyncio.run(closed_loop(address, pool, sat_devices,
                                            max(3.0, args.seconds), args.sat_in_flight,
                                            samples_per_request=spr, answer=answer))  # fmt: skip
            print(f"saturation ({sat_devices} devices x {args.sat_in_flight} calls of {spr} "
                  f"samples): {sat_b.throughput:.0f} samples/s = "
                  f"{sat_b.throughput / offline:.2f} of offline; p50 "
                  f"{sat_b.row()['p50_ms']} ms", flush=True)  # fmt: skip
            rows.append({"phase": "saturation_batched", "load": "", **sat_b.row()})
        grid = [(int(n), float(f)) for n in args.devices.split(",")
                for f in args.loads.split(",") if f]  # fmt: skip
        for n, f in tqdm(grid, desc="load points"):
            r = asyncio.run(open_loop(address, pool, n, f * sat.throughput, args.seconds,
                                      seed=n, answer=answer))  # fmt: skip
            rows.append({"phase": "open", "load": f, **r.row()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        log = server.stop()
    print(log.strip().splitlines()[-1] if log.strip() else "(no server output)")
    sent = sum(r["sent"] for r in rows)
    accounted = sum(r["answered"] + r["refused"] + r["failed"] for r in rows)
    dup = sum(r["duplicates"] for r in rows)
    low = [r for r in rows if r["phase"] == "open" and r["load"] < 0.5]
    worst = max((r["p99_ms"] / r["p50_ms"] for r in low), default=float("nan"))
    summary = {
        "transport": transport, "pinned": pinned,
        "saturation_per_s": round(sat.throughput, 1), "serving_ratio": round(ratio, 3),
        "samples_per_request": spr,
        "saturation_batched_per_s": round(sat_b.throughput, 1) if sat_b else None,
        "serving_ratio_batched": round(sat_b.throughput / offline, 3) if sat_b else None,
        "saturation_batched_calls": (f"{sat_devices} devices x {args.sat_in_flight} calls"
                                     if sat_b else None),
        "worst_p99_over_p50_below_half_load": round(worst, 2),
        "requests_sent": sent, "requests_accounted": accounted, "answered_twice": dup,
    }  # fmt: skip
    return rows, summary


def _plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["devices"] for r in rows if r["phase"] == "open"}):
        rs = sorted((r for r in rows if r["phase"] == "open" and r["devices"] == n),
                    key=lambda r: r["offered_per_s"])  # fmt: skip
        x = [r["offered_per_s"] for r in rs]
        ax[0].plot(x, [r["throughput_per_s"] for r in rs], "o-", label=f"N={n}")
        (line,) = ax[1].plot(x, [r["p50_ms"] for r in rs], "o-", label=f"p50, N={n}")
        ax[1].plot(x, [r["p99_ms"] for r in rs], "s--", color=line.get_color(),
                   label=f"p99, N={n}")  # fmt: skip
    ax[0].axhline(summary["offline_per_s"], color="k", ls=":", label="offline batched")
    ax[0].axhline(summary["saturation_per_s"], color="gray", ls="--", label="saturation")
    if summary.get("saturation_batched_per_s"):
        ax[0].axhline(summary["saturation_batched_per_s"], color="gray", ls="-.",
                      label=f"saturation, {summary['samples_per_request']} samples/call")
    ax[0].set(xlabel="offered load (samples/s)", ylabel="answers/s",
              title=f"{summary['family']}: throughput")  # fmt: skip
    ax[1].set(xlabel="offered load (samples/s)", ylabel="latency (ms)", yscale="log",
              title="latency (send to answer)")  # fmt: skip
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
