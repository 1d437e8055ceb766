"""Simulator check: the latency a simulated Flow predicts against a real run.

The same configuration twice, sample by sample (batch 1, one device):

- real: this process is the device (digits member 1 up to point 1, raw float16 codec); a
  `flowcodec proxy` child applies a FastLink (seeded) to the real packets and holds each
  sample for channel uses / symbol rate + delay; a `flowcodec serve` child (the edge)
  decodes and runs member 3. Latency is `SampleTrace.wall_s`: from the start of
  `Flow.run` to the answer, measured.
- simulated: `Flow` with a `Hop` over a FastLink with the same seed, and tier FLOP/s
  calibrated on this machine: the device's FLOPs over the measured time of its head and
  encoder at batch 1, the edge's FLOPs over the measured time of `TierEngine.run` at
  batch 1 (decode, stages, exit). Its hop carries a per-sample transport overhead
  (`Hop.overhead_s`: serialisation, the two gRPC legs device -> proxy -> edge, the proxy's
  and the edge's thread hand-offs, the answer's way back), measured on this machine
  before the real run like the compute times: the same device, proxy and edge with the
  link's time set to zero (`--symbol-rate 1e15 --delay-ms 0`), mean wall time less the
  calibrated compute. The link itself and its losses are not part of that figure.

Target: mean latencies within 10 %. Writes `--out` (JSON) and prints a table; the
simulator without the transport overhead (link + compute only) is reported beside it.

    flock /work/helpers/cpu.lock .venv/bin/python experiments/bench_serve_sim.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from channels import FastLink
from flowcodec.codecs import build_codec
from flowcodec.data import load_dataset
from flowcodec.family import load_pretrained
from flowcodec.pipeline import Flow, Hop, Tier
from flowcodec.progress import tqdm
from flowcodec.serve.bench import spawn
from flowcodec.serve.engine import TierEngine, TierSpec
from flowcodec.serve.remote import RemoteHop
from flowcodec.serve.server import freeze_heap


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--mcs", type=int, default=9)
    ap.add_argument("--snr-db", type=float, default=5.0)
    ap.add_argument("--symbol-rate", type=float, default=1e6)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="the edge's batching wait (one device: nothing to wait for)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=100,
                    help="samples of the zero-time-link run that measures the transport")
    ap.add_argument("--out", default="runs/bench_serve/sim_check.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fam = load_pretrained("digits", progress=False)
    kw = '{"dtype": "float16"}'
    codec = build_codec("raw", fam.feature_shape(1), dtype="float16").eval()
    _, test = load_dataset("digits")
    data = test.subset(min(args.samples, len(test)), seed=args.seed)
    x = data.normalize(data.images)

    # Compute times on this machine, batch 1.
    head, _ = fam.split(3, 1)
    x1 = x[:1]
    with torch.no_grad():
        dev_s = median_time(lambda: codec.compress(head(x1)), 200)
        engine = TierEngine(fam, TierSpec("edge", 1, 3), codec)
        stream = codec.compress(head(x1))
        edge_s = median_time(lambda: engine.run(stream), 200)
    probe = Flow(fam, [Tier("device", 1.0, 1), Tier("edge", 1.0, 3)],
                 [Hop(codec, FastLink(seed=0), 1.0)]).run(x1).traces[0]  # fmt: skip
    dev_flops, edge_flops = probe.compute_flops["device"], probe.compute_flops["edge"]
    tiers = [Tier("device", dev_flops / dev_s, 1), Tier("edge", edge_flops / edge_s, 3)]
    print(f"calibrated: device {1e3 * dev_s:.3f} ms ({dev_flops / dev_s / 1e9:.2f} GFLOP/s), "
          f"edge {1e3 * edge_s:.3f} ms ({edge_flops / edge_s / 1e9:.2f} GFLOP/s)", flush=True)

    freeze_heap()  # the device process: no full-collection stalls inside a sample
    link_args = ["--link", "fast", "--mcs", str(args.mcs), "--snr-db", str(args.snr_db),
                 "--symbol-rate", str(args.symbol_rate), "--delay-ms", str(args.delay_ms),
                 "--seed", str(args.seed)]  # fmt: skip
    edge = spawn("serve", ["--family", "digits", "--point-in", "1", "--point", "3",
                           "--codec-kwargs", kw, "--max-wait-ms", str(args.max_wait_ms)])
    try:
        # Transport overhead: the same chain with a link that takes no time.
        zero = link_args[:-6] + ["--symbol-rate", "1e15", "--delay-ms", "0", "--seed",
                                 str(args.seed + 1)]  # fmt: skip
        calib = spawn("proxy", ["--upstream", edge.address, *zero])
        try:
            hop = RemoteHop(codec, calib.address, deadline_s=5.0, first_seq=0)
            flow = Flow(fam, tiers, [hop])
            flow.run(x1)
            n_cal = min(args.calib_samples, len(x))
            cal = [flow.run(x[i : i + 1]).traces[0]
                   for i in tqdm(range(n_cal), desc="transport")]  # fmt: skip
            hop.close()
        finally:
            calib.stop()
        overhead_s = statistics.mean(t.wall_s - dev_s - edge_s - t.hops[0].tx_time_s
                                     for t in cal)  # fmt: skip
        print(f"transport overhead (zero-time link, {n_cal} samples): "
              f"{1e3 * overhead_s:.3f} ms per sample", flush=True)
        proxy = spawn("proxy", ["--upstream", edge.address, *link_args])
        try:
            hop = RemoteHop(codec, proxy.address, deadline_s=5.0, first_seq=0)
            flow = Flow(fam, tiers, [hop])
            flow.run(x1)  # warm-up: connections (the simulator draws for it too, below)
            real = [flow.run(x[i : i + 1]).traces[0]
                    for i in tqdm(range(len(x)), desc="real")]  # fmt: skip
            hop.close()
        finally:
            proxy.stop()
    finally:
        edge.stop()
    def simulate(overhead: float) -> list:
        link = FastLink(mcs=args.mcs, snr_db=args.snr_db, seed=args.seed)
        sim_flow = Flow(fam, tiers, [Hop(codec, link, args.symbol_rate, args.delay_ms / 1e3,
                                         overhead_s=overhead)])  # fmt: skip
        # The same samples in the same order as the real run (its warm-up sample first).
        sim_flow.run(x1)
        return [sim_flow.run(x[i : i + 1]).traces[0] for i in range(len(x))]

    sim = simulate(overhead_s)
    bare = [1e3 * t.latency_s for t in simulate(0.0)]
    fallbacks = sum(t.fallback is not None for t in real)
    # Losses are drawn alike; channel uses differ by a byte's worth where the real run's
    # sample number needs a longer varint in the header (seq >= 128) than the simulator's 0.
    same_losses = all(r.hops[0].packets_lost == s.hops[0].packets_lost
                      for r, s in zip(real, sim))  # fmt: skip
    uses_real = statistics.mean(t.hops[0].channel_uses for t in real)
    uses_sim = statistics.mean(t.hops[0].channel_uses for t in sim)
    real_ms = [1e3 * t.wall_s for t in real]
    sim_ms = [1e3 * t.latency_s for t in sim]
    link_ms = [1e3 * (t.hops[0].tx_time_s - overhead_s) for t in sim]
    mean_real, mean_sim = statistics.mean(real_ms), statistics.mean(sim_ms)
    summary = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "samples": len(x), "mcs": args.mcs, "snr_db": args.snr_db,
        "symbol_rate": args.symbol_rate, "delay_ms": args.delay_ms,
        "edge_max_wait_ms": args.max_wait_ms,
        "device_ms": round(1e3 * dev_s, 3), "edge_ms": round(1e3 * edge_s, 3),
        "mean_link_ms": round(statistics.mean(link_ms), 3),
        "transport_overhead_ms": round(1e3 * overhead_s, 3), "calib_samples": n_cal,
        "mean_sim_without_transport_ms": round(statistics.mean(bare), 3),
        "real_over_sim_without_transport": round(statistics.mean(real_ms)
                                                 / statistics.mean(bare), 4),
        "mean_real_ms": round(mean_real, 3), "mean_sim_ms": round(mean_sim, 3),
        "real_over_sim": round(mean_real / mean_sim, 4),
        "p50_real_ms": round(statistics.median(real_ms), 3),
        "p50_sim_ms": round(statistics.median(sim_ms), 3),
        "mean_overhead_ms": round(mean_real - mean_sim, 3),
        "same_losses": same_losses, "mean_channel_uses_real": round(uses_real, 1),
        "mean_channel_uses_sim": round(uses_sim, 1), "fallbacks": fallbacks,
        "packets_lost": sum(t.hops[0].packets_lost for t in real),
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "real_ms": real_ms,
                                          "sim_ms": sim_ms}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
