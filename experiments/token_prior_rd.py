"""Factorized vs hyperprior entropy model of a token codec: bytes at equal distortion.

A development measurement (not a benchmark): for each data set and prior the token-prune
codec (every token kept, so only the latent coding differs) is trained for the same short
schedule at each ``--lambdas`` value (loss = MSE + lambda * estimated bits per token
value), then the held-out samples are compressed and decompressed. The rate is the real
packet bytes per sample (every packet's length, z packet included); the distortion is the
MSE of the decoded features. The hyperprior codes ``z`` and its token latents with the
exact arithmetic coder; each hyperprior codec is also compressed with its token latents
rANS-coded (``bytes_rans_tokens``, same ``z`` packet, same decoded features), and each
factorized codec with its token latents arithmetic-coded (``bytes_arith_tokens``), which
separates the prior's gain from the coder's. The
factorized curve is interpolated (log bytes against log
MSE) at each hyperprior point's MSE, so the last column is the byte change at equal
distortion (negative: the hyperprior spends fewer bytes).

Data sets: ``digits`` (scikit-learn's 8x8 digits, each image row a token: 8 tokens of
width 8) and ``scaled`` (random tokens (17, 32) from a rank-8 map, each sample multiplied
by its own scale, log-uniform in 1/4..4: a case a per-sample prior is made for).

    nice -n 19 .venv/bin/python -m experiments.token_prior_rd --steps 400
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from flowcodec.codecs import build_codec
from flowcodec.progress import tqdm


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from flowcodec.data import load_digits

    tr, te = load_digits()
    xs = []
    for ds in (tr, te):
        x = torch.stack([ds[i][0] for i in range(len(ds))])  # (n, 1, 8, 8)
        xs.append(x[:, 0])  # rows as tokens: (n, 8, 8)
    return xs[0], xs[1]


def _scaled(n_train: int = 2048, n_test: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 32, generator=g) / math.sqrt(8)

    def make(n):
        z = torch.randn(n, 17, 8, generator=g)
        s = torch.exp(torch.empty(n, 1, 1).uniform_(math.log(0.25), math.log(4.0),
                                                    generator=g))  # fmt: skip
        return s * (z @ basis)

    return make(n_train), make(n_test)


DATA = {"digits": _digits, "scaled": _scaled}


def train_and_measure(prior: str, lam: float, xtr: torch.Tensor, xte: torch.Tensor,
                      steps: int, batch: int, seed: int = 0) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    kw = dict(latent=8, hidden=64, packets=2, threshold=-1e6)  # keep every token
    if prior == "hyperprior":
        kw.update(prior="hyperprior", hyper=4)
    codec = build_codec("token-prune", tuple(xtr.shape[1:]), **kw).fit(xtr)
    opt = torch.optim.Adam(codec.parameters(), 3e-3)
    aux = torch.optim.Adam(codec.entropy_bottleneck.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    values = xtr[0].numel()
    codec.train()
    for _ in tqdm(range(steps), desc=f"{prior} lambda={lam:g}", leave=False):
        h = xtr[torch.randint(len(xtr), (batch,), generator=g)]
        out = codec(h)
        loss = (out.features - h).pow(2).mean() + lam * out.bits.mean() / values
        opt.zero_grad()
        aux.zero_grad()
        (loss + codec.aux_loss()).backward()
        opt.step()
        aux.step()
    codec.eval()
    codec.update(force=True)
    with torch.no_grad():
        streams = codec.compress(xte)
        rec = codec.decompress(streams)
    payload = [sum(len(p) for p in s.packets) for s in streams]
    zbytes = [len(s.packets[0]) for s in streams] if prior == "hyperprior" else [0]
    row = {"prior": prior, "lambda": lam, "bytes": float(np.mean(payload)),
           "z_bytes": float(np.mean(zbytes)),
           "mse": float((rec - xte).pow(2).mean())}  # fmt: skip
    # the same codec with its token latents coded the other way (rANS <-> arithmetic)
    attr, other = (("_token_coder", "rans") if prior == "hyperprior"
                   else ("_factorized_coder", "arith"))  # fmt: skip
    setattr(codec, attr, other)
    try:
        with torch.no_grad():
            alt = codec.compress(xte)
            same = torch.equal(codec.decompress(alt), rec)
    finally:
        delattr(codec, attr)
    row[f"bytes_{other}_tokens"] = float(np.mean([sum(len(p) for p in s.packets)
                                                 for s in alt]))  # fmt: skip
    row[f"{other}_tokens_same_output"] = bool(same)
    return row


def at_equal_mse(fact: list[dict], mse: float, key: str = "bytes") -> float | None:
    """Factorized bytes (``key``) at ``mse`` (log-log interpolation), None outside its
    range."""
    pts = sorted((math.log(r["mse"]), math.log(r[key])) for r in fact)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lm = math.log(mse)
    if not xs[0] <= lm <= xs[-1]:
        return None
    return math.exp(float(np.interp(lm, xs, ys)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits,scaled")
    ap.add_argument("--lambdas", default="0.003,0.01,0.03,0.1")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lams = [float(v) for v in args.lambdas.split(",")]
    rows = []
    t0 = time.time()
    for name in args.data.split(","):
        xtr, xte = DATA[name]()
        res = {p: [train_and_measure(p, lam, xtr, xte, args.steps, args.batch) for lam in lams]
               for p in ("factorized", "hyperprior")}  # fmt: skip
        print(f"\n{name}: tokens {tuple(xtr.shape[1:])}, {len(xte)} test samples, "
              f"{args.steps} steps x {args.batch}")  # fmt: skip
        print(f"{'prior':<11} {'lambda':>7} {'B/sample':>9} {'z B':>5} {'MSE':>9} "
              f"{'fact. B @ MSE':>14} {'change':>8}")  # fmt: skip
        for r in res["factorized"] + res["hyperprior"]:
            ref = at_equal_mse(res["factorized"], r["mse"]) if r["prior"] == "hyperprior" \
                else None  # fmt: skip
            r["data"], r["factorized_bytes_at_mse"] = name, ref
            tail = (f"{ref:14.1f} {100 * (r['bytes'] / ref - 1):+7.1f}%" if ref
                    else f"{'-':>14} {'-':>8}")  # fmt: skip
            if r["prior"] == "hyperprior":  # both priors with the same token coder
                ra = at_equal_mse(res["factorized"], r["mse"], "bytes_arith_tokens")
                r["factorized_arith_bytes_at_mse"] = ra
                alt = (f"  (tokens rANS-coded: {r['bytes_rans_tokens']:.1f} B; "
                       + (f"vs factorized arith-coded at this MSE {ra:.1f} B: "
                          f"{100 * (r['bytes'] / ra - 1):+.1f}%)" if ra else "-)"))
            else:
                alt = f"  (tokens arith-coded: {r['bytes_arith_tokens']:.1f} B)"
            print(f"{r['prior']:<11} {r['lambda']:7g} {r['bytes']:9.1f} {r['z_bytes']:5.1f} "
                  f"{r['mse']:9.5f} {tail}{alt}")  # fmt: skip
            rows.append(r)
    print(f"\n{time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
