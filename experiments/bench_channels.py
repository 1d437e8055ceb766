"""Benchmark of the channels links on this machine.

Prints, for MCS 9 (QPSK, R = 0.66) over AWGN at two block lengths:
- ExactLink throughput (information bits per second, packets of bytes in and out),
- the same chain called directly through Sionna blocks on a ready bit tensor
  (CRC, LDPC5GEncoder, Mapper, AWGN, Demapper, LDPC5GDecoder, CRC check),
  and the overhead of this layer relative to it,
- FastLink throughput and its speed-up over ExactLink.

With ``--gap`` it also sweeps the BLER of the k=512, n=1024 QPSK LDPC code over AWGN
and reports the gap to the normal approximation at BLER 1e-2.

Usage: python experiments/bench_channels.py [--device cpu] [--bits 4e5] [--reps 3] [--gap]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from channels import ExactLink, FastLink
from channels.link import plan_packet
from channels.mcs import MCS_TABLE


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sionna_direct(mcs, nbytes: int, num_packets: int, snr_db: float, device: str):
    """Build the chain from Sionna blocks; return a callable running one batch."""
    from sionna.phy.channel import AWGN as SionnaAWGN
    from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
    from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
    from sionna.phy.mapping import Demapper, Mapper

    plan = plan_packet(nbytes, mcs)
    if plan.num_cb != 1:
        raise SystemExit("benchmark sizes must fit one code block")
    m = mcs.modulation_order
    crc = CRCEncoder(plan.tb_crc, k=plan.payload_bits, device=device)
    crc_dec = CRCDecoder(crc, device=device)
    enc = LDPC5GEncoder(plan.k, plan.n, num_bits_per_symbol=m, bg=plan.bg, device=device,
                        check_input=False)
    dec = LDPC5GDecoder(enc, num_iter=20, hard_out=True, device=device)
    mapper = Mapper("qam", m, device=device)
    demapper = Demapper("app", "qam", m, device=device)
    awgn = SionnaAWGN(device=device)
    no = torch.tensor(10 ** (-snr_db / 10), device=device)
    bits = torch.randint(0, 2, (num_packets, plan.payload_bits), device=device).float()

    def run():
        x = mapper(enc(crc(bits)))
        y = awgn(x, no)
        _, ok = crc_dec(dec(demapper(y, no)))
        return ok

    return run


def timed(fns: list, reps: int, device: str) -> list[tuple[float, float]]:
    """Median (wall, process CPU) seconds of each callable.

    The callables alternate so that drifts in machine load hit all of them. Process CPU time
    (all threads of this process) is much less sensitive than wall time to other jobs on a
    shared machine, so the overhead is computed from it on CPU.
    """
    for fn in fns:  # warm-up
        fn()
    _sync(device)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def gap_to_limit(snrs: list[float], blocks: int, device: str) -> None:
    """BLER of k=512, n=1024 QPSK LDPC over AWGN vs the normal approximation at 1e-2."""
    from channels import MCS
    from channels.units import normal_approximation_snr

    na_q = normal_approximation_snr(512, 512, 1e-2, "qpsk")
    na_g = normal_approximation_snr(512, 512, 1e-2, "gaussian")
    print(f"normal approximation, n=512 channel uses, k=512, BLER 1e-2: "
          f"QPSK input {na_q:.3f} dB, Gaussian input {na_g:.3f} dB (Es/N0)")
    link = ExactLink(mcs=MCS(2, 0.5), device=device, seed=0)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    pts = []
    for snr in snrs:
        err = sum(int(link.simulate_code_blocks(512, 500, snr, gen).sum())
                  for _ in range(max(1, blocks // 500)))
        n = 500 * max(1, blocks // 500)
        pts.append((snr, err / n))
        print(f"  Es/N0 {snr:5.2f} dB: BLER {err / n:.4g} ({err}/{n})", flush=True)
    for (s0, b0), (s1, b1) in zip(pts, pts[1:]):
        if b0 >= 1e-2 > b1 > 0:
            import math

            x = s0 + (s1 - s0) * (math.log10(b0) + 2) / (math.log10(b0) - math.log10(b1))
            print(f"BLER = 1e-2 at {x:.2f} dB (log-linear between points): gap "
                  f"{x - na_q:.2f} dB to the QPSK limit, {x - na_g:.2f} dB to the Gaussian one")


def main() -> None:
    ap = argparse.ArgumentParser(description="channels link benchmark")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=float, default=4e5, help="information bits per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--snr-db", type=float, default=4.0)
    ap.add_argument("--mcs", type=int, default=9)
    ap.add_argument("--gap", action="store_true",
                    help="also measure the gap of k=512 QPSK LDPC to the normal approximation")
    ap.add_argument("--gap-blocks", type=int, default=2000)
    args = ap.parse_args()
    torch.manual_seed(0)
    mcs = MCS_TABLE[args.mcs]
    print(f"device={args.device} torch_threads={torch.get_num_threads()} {mcs.name} "
          f"AWGN Es/N0={args.snr_db} dB, BP 20 iterations, median of {args.reps} runs")
    print("throughput = information bits / wall second; overhead = ExactLink / Sionna direct - 1"
          " in process CPU time (and in wall time)")
    print(f"{'packet':>8} {'k':>5} {'n':>5} {'exact Mbit/s':>13} {'sionna Mbit/s':>14} "
          f"{'overhead cpu':>13} {'(wall)':>8} {'fast Mbit/s':>12} {'fast/exact':>11}")
    for nbytes in (62, 1053):  # k = 512 (CRC16) and k = 8448 (CRC24A): one code block each
        plan = plan_packet(nbytes, mcs)
        n_pk = max(4, int(args.bits // (8 * nbytes)))
        packets = [os.urandom(nbytes) for _ in range(n_pk)]
        info = 8 * nbytes * n_pk
        exact = ExactLink(mcs=mcs, snr_db=args.snr_db, device=args.device, seed=0)
        fast = FastLink(mcs=mcs, snr_db=args.snr_db, device=args.device, seed=0)
        direct = sionna_direct(mcs, nbytes, n_pk, args.snr_db, args.device)
        (t_sionna, c_sionna), (t_exact, c_exact) = timed(
            [direct, lambda e=exact, p=packets: e.transmit(p)], args.reps, args.device)
        ((t_fast, _),) = timed([lambda f=fast, p=packets: f.transmit(p)], max(args.reps, 10),
                               args.device)
        print(f"{nbytes:>7}B {plan.k:>5} {plan.n:>5} {info / t_exact / 1e6:>13.4f} "
              f"{info / t_sionna / 1e6:>14.4f} {100 * (c_exact / c_sionna - 1):>12.1f}% "
              f"{100 * (t_exact / t_sionna - 1):>7.1f}% "
              f"{info / t_fast / 1e6:>12.1f} {t_exact / t_fast:>10.0f}x", flush=True)
    if args.gap:
        gap_to_limit([1.25, 1.5, 1.75, 2.0, 2.25], args.gap_blocks, args.device)


if __name__ == "__main__":
    main()
