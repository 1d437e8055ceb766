"""The p99/p50 ratio of response times that queueing alone gives under Poisson arrivals.

``experiments/bench_serve.py`` offers Poisson load and issue 30 asks for p99 <= 2 x p50
below half load. This prints what an ideal server would score: one that takes requests
first come, first served, each for the same service time (M/D/1), and one that takes
every waiting request, up to ``--batch``, as one batch whose time is ``--fixed`` plus
``1 - --fixed`` per request (in units of one request's time alone). No server, no
network: the floor that the arrival process sets.

    python -m experiments.queue_floor --loads 0.1 0.25 0.4 0.5 --batch 1 16
"""

from __future__ import annotations

import argparse

import numpy as np


def response_times(load: float, batch: int, fixed: float, n: int, seed: int) -> np.ndarray:
    """Response times (arrival to answer) of ``n`` Poisson arrivals at ``load`` times the
    one-at-a-time service rate, served in batches of up to ``batch``; one request alone
    takes 1."""
    rng = np.random.default_rng(seed)
    arrive = np.cumsum(rng.exponential(1.0 / load, n))
    out = np.empty(n)
    free, i = 0.0, 0  # when the server is next free; the next request not yet served
    while i < n:
        start = max(free, arrive[i])
        j = min(n, i + batch, int(np.searchsorted(arrive, start, side="right")))
        j = max(j, i + 1)  # the ones waiting when it starts (at least the first)
        free = start + fixed + (1.0 - fixed) * (j - i)
        out[i:j] = free - arrive[i:j]
        i = j
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.5])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--fixed", type=float, default=0.5,
                    help="share of one request's time a batch pays once (batch > 1)")
    ap.add_argument("-n", type=int, default=400_000, help="requests per simulation")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print("batch  load    p50    p99  p99/p50   (times in units of one request's service)")
    for b in a.batch:
        for load in a.loads:
            r = response_times(load, b, a.fixed if b > 1 else 0.0, a.n, a.seed)
            p50, p99 = np.percentile(r, [50, 99])
            print(f"{b:5d}  {load:4.2f}  {p50:5.2f}  {p99:5.2f}  {p99 / p50:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
