"""Generate BLER-vs-SNR tables for channels.FastLink with channels.ExactLink (AWGN).

For every (MCS, k) pair the SNR is swept upward from one dB below the BICM-capacity SNR of
the MCS's spectral efficiency in ``--step`` dB steps; at each point code blocks are simulated
until ``--min-errors`` block errors or ``--max-blocks`` blocks; the sweep stops once BLER is
below ``--stop-bler``. The JSON is rewritten after every pair (so a run cut short keeps its
finished curves). Usage:

    python experiments/make_bler_tables.py --mcs 9 --k 1024 --out channels/tables/bler_x.json
    python experiments/make_bler_tables.py --mcs all --k 128 512 1024 2048 3840 8448 \\
        --device cuda:0 --max-blocks 20000 --out channels/tables/bler_pdsch1.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from scipy.optimize import brentq

from channels.link import ExactLink
from channels.mcs import MCS_TABLE
from channels.units import qam_bicm_capacity


def capacity_snr(se: float, m: int) -> float:
    return brentq(lambda s: qam_bicm_capacity(s, m, num_nodes=24) - se, -15.0, 40.0, xtol=1e-3)


def sweep(link: ExactLink, k: int, args, gen) -> dict:
    m, r = link.mcs.modulation_order, link.mcs.code_rate
    n = math.ceil(k / r / m) * m
    batch = max(16, int(args.batch_bits // n))
    max_blocks = max(batch, min(args.max_blocks, int(args.max_bits // k)))
    snr = math.floor((capacity_snr(m * r, m) - 1.0) / args.step) * args.step
    out = {"mcs": link.mcs.index, "k": k, "n": n, "snr_db": [], "bler": [], "blocks": [],
           "errors": []}
    for _ in range(args.max_points):
        errs = blocks = 0
        while errs < args.min_errors and blocks < max_blocks:
            nb = min(batch, max_blocks - blocks)
            errs += int(link.simulate_code_blocks(k, nb, snr, generator=gen).sum())
            blocks += nb
            if errs == blocks:
                break  # every block failed: one batch is enough
        bler = errs / blocks
        out["snr_db"].append(round(snr, 4))
        out["bler"].append(bler)
        out["blocks"].append(blocks)
        out["errors"].append(errs)
        if bler < args.stop_bler:
            break
        snr += args.step if bler < 1.0 else args.coarse_step
    return out


def plot(table: Path, out: Path, k: int = 1024) -> None:
    """BLER-vs-Es/N0 curves of every MCS at code block size ``k`` from a table file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(table.read_text())
    fig, ax = plt.subplots(figsize=(9, 5))
    cmap = plt.get_cmap("viridis")
    for c in data["curves"]:
        if c["k"] != k:
            continue
        pts = [(s, b) for s, b in zip(c["snr_db"], c["bler"]) if b > 0]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.semilogy(xs, ys, "-o", ms=2.5, lw=1, color=cmap(c["mcs"] / 28),
                    label=f"MCS {c['mcs']}" if c["mcs"] % 4 == 0 else None)
    ax.set_xlabel("Es/N0 [dB]")
    ax.set_ylabel("BLER")
    ax.set_ylim(1e-4, 1.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"ExactLink BLER over AWGN, 5G NR PDSCH MCS table 1, k = {k} info bits")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot-from", type=Path, help="only plot this table file")
    ap.add_argument("--plot-k", type=int, default=1024)
    ap.add_argument("--mcs", nargs="+", default=["all"])
    ap.add_argument("--k", nargs="+", type=int, default=[128, 512, 1024, 2048, 3840, 8448])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step", type=float, default=0.25)
    ap.add_argument("--coarse-step", type=float, default=0.5)
    ap.add_argument("--min-errors", type=int, default=100)
    ap.add_argument("--max-blocks", type=int, default=4000)
    ap.add_argument("--max-bits", type=float, default=1e12, help="info bits per point")
    ap.add_argument("--max-points", type=int, default=40)
    ap.add_argument("--stop-bler", type=float, default=1e-3)
    ap.add_argument("--batch-bits", type=float, default=2e5)
    ap.add_argument("--num-iter", type=int, default=20)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.plot_from is not None:
        plot(args.plot_from, args.out, args.plot_k)
        return
    mcs_list = range(len(MCS_TABLE)) if args.mcs == ["all"] else [int(x) for x in args.mcs]
    t0 = time.time()
    curves = []
    gen = torch.Generator(device=args.device)
    gen.manual_seed(args.seed)
    for k in args.k:  # block sizes outer: a run cut short still covers every MCS at some k
        for i in mcs_list:
            if time.time() - t0 > args.time_budget:
                break
            mcs = MCS_TABLE[i]
            if k > 3840 and (mcs.code_rate <= 0.25 or mcs.code_rate < 1 / 3):
                continue  # BG2 only: no such code block
            link = ExactLink(mcs=i, device=args.device, seed=args.seed, num_iter=args.num_iter)
            t1 = time.time()
            c = sweep(link, k, args, gen)
            curves.append(c)
            print(f"MCS {i:2d} k={k:5d} n={c['n']:5d} points={len(c['snr_db'])} "
                  f"snr=[{c['snr_db'][0]}, {c['snr_db'][-1]}] {time.time() - t1:.1f}s",
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "mcs_table": 1, "channel": "AWGN", "snr": "Es/N0 dB",
                "decoder": f"Sionna LDPC5GDecoder BP boxplus-phi, {args.num_iter} iterations",
                "demapper": "Sionna APP", "generator": "experiments/make_bler_tables.py",
                "device": args.device, "curves": curves}, separators=(",", ":")))
    print(f"done: {len(curves)} curves in {time.time() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
