"""Decode speed of the shipped learned codecs (rANS packets + synthesis transform).

Times ``codec.decompress`` on streams of real CIFAR-10-shaped features (random
non-negative features of the codec's shape: the rANS decode cost depends on the symbol
count and the tables, not much on the values) and, separately, the entropy decode alone
(``rans_decode`` of every packet). Run it before and after a change to the coder:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/bench_decode.py

Prints one line per codec: CPU milliseconds per sample (``time.process_time``, so that a
busy machine does not inflate the figures) for decompress (batch 1 and batch 32) and for
the rANS decode alone, the best of ``--repeats`` timed rounds. The "rANS only" column of
the hyperprior codec times its whole decompress (its y packets need the z decode first).
"""

from __future__ import annotations

import argparse
import time

import torch

from flowcodec.codecs.zoo import load_pretrained_codec

CODECS = ["cifar10-fact_l0p1", "cifar10-robust_l0p1"]  # cifar10-hyper_l0p1 left the zoo (30 MB)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    col = f"decomp b={args.batch} ms/sample"
    print(f"{'codec':24s} {'decomp b=1 ms':>14s} {col:>22s} {'rANS only ms/sample':>20s}")
    for name in CODECS:
        bench_one(name, args, g)


def bench_one(name: str, args, g: torch.Generator) -> None:
    from flowcodec.codecs.entropy import _tables, rans_decode

    codec = load_pretrained_codec(name)
    h = torch.relu(torch.randn(args.batch, *codec.feature_shape, generator=g))
    streams = codec.compress(h)
    one = streams[:1]
    codec.decompress(one)  # warm up (loads the C++ extension)
    t1 = best_of(lambda: codec.decompress(one), args.repeats)
    tb = best_of(lambda: codec.decompress(streams), args.repeats) / len(streams)

    def rans_only():
        if name.startswith("cifar10-hyper"):
            codec.decompress(streams)  # the y indexes need the z decode: time it all
            return
        eb = codec.entropy_bottleneck
        tables = _tables(eb)
        _, hh, ww = codec.latent_shape
        for s in streams:
            for grp, p in zip(codec.groups, s.packets):
                idx = torch.arange(grp.start, grp.stop, dtype=torch.int32).view(-1, 1, 1)
                rans_decode(eb, p, idx.expand(-1, hh, ww), tables)

    tr = best_of(rans_only, args.repeats) / len(streams)
    print(f"{name:24s} {1e3 * t1:14.3f} {1e3 * tb:22.3f} {1e3 * tr:20.3f}")


if __name__ == "__main__":
    main()
