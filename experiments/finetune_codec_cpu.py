"""Continue training a shipped CIFAR-10 codec on CPU (when no GPU time is left).

    python -m experiments.finetune_codec_cpu --codec cifar10-fact_l0p03 --lam 0.01 \
        --steps 400 --out cifar10-fact_l0p01ft

Loads the codec from flowcodec/zoo/codecs, trains ``--steps`` steps of ``train_codec``
(batch 64, CIFAR-10 train set, tail = member 3 from split point 1), freezes the CDF tables
and writes the result back to the zoo with the run's history.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs.train import train_codec
    from flowcodec.codecs.zoo import CODEC_ZOO, load_pretrained_codec, round_half, save_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.checkpoint import read_config

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--codec", required=True)
    ap.add_argument("--lam", type=float, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--drop-prob", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = read_config(CODEC_ZOO / args.codec)
    codec = load_pretrained_codec(args.codec)
    fam = load_pretrained("cifar10")
    train, _ = load_dataset("cifar10")
    res = train_codec(codec, fam, 3, 1, train, None, lam=args.lam, beta=1.0, epochs=1,
                      batch_size=args.batch_size, lr=args.lr, drop_prob=args.drop_prob,
                      max_steps=args.steps, seed=1, progress=True)  # fmt: skip
    round_half(codec).eval()
    codec.update(force=True)
    extra = dict(cfg["extra"])
    extra["finetune"] = {"from": args.codec, "lam": args.lam, "steps": args.steps,
                         "batch_size": args.batch_size, "lr": args.lr, "device": "cpu",
                         "seconds": round(res.seconds, 1), "history": res.history}  # fmt: skip
    extra["train_kwargs"] = {**extra.get("train_kwargs", {}), "lam": args.lam}
    path = save_codec(codec, CODEC_ZOO / args.out, cfg["config"]["kwargs"], extra)
    print(f"saved {path} after {res.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
