"""Continue training a shipped CIFAR-10 codec on CPU (when no GPU time is left).

    python -m experiments.finetune_codec_cpu --codec cifar10-fact_l0p03 --lam 0.01 \
        --steps 350 --out cifar10-fact_l0p01ft

    python -m experiments.finetune_codec_cpu --codec cifar10-fact_l0p01ft --lam 0.1 \
        --kd 1 --beta 0.1 --views 3 --seconds 3600 --threads 2 --out cifar10-fact_kd

Loads the codec from flowcodec/zoo/codecs (``--packets`` rebuilds it with another number of
packets: the weights do not depend on it), trains it with ``train_codec`` (CIFAR-10 train
set, tail = member 3 from split point 1) for ``--steps`` steps or ``--epochs`` epochs within
``--seconds``, freezes the CDF tables and writes the result back to the zoo with the run's
history. ``--views K`` caches K augmented copies of the head's features and the teacher's
logits first (``train_codec(views=K)``), so that no step runs the head or the teacher.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import evaluate_codec, train_codec
    from flowcodec.codecs.zoo import CODEC_ZOO, load_pretrained_codec, round_half, save_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.checkpoint import read_config

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--codec", required=True, help="zoo codec to start from")
    ap.add_argument("--lam", type=float, required=True, help="rate weight (per kbit)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=None, help="time budget (after epoch 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=1.0, help="feature-distillation weight")
    ap.add_argument("--kd", type=float, default=0.0, help="logit-distillation weight")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--views", type=int, default=0, help="cached augmented copies")
    ap.add_argument("--cache-file", default=None,
                    help="load the cached copies from this file, or save them there")
    ap.add_argument("--drop-prob", type=float, default=0.0)
    ap.add_argument("--packets", type=int, default=None, help="rebuild with this many packets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=2000, help="test images to score at the end")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = read_config(CODEC_ZOO / args.codec)
    codec = load_pretrained_codec(args.codec)
    kwargs = dict(cfg["config"]["kwargs"])
    if args.packets is not None and args.packets != kwargs.get("packets", 1):
        kwargs["packets"] = args.packets
        fresh = build_codec(cfg["config"]["name"], tuple(cfg["config"]["feature_shape"]), **kwargs)
        tables = ("_offset", "_quantized_cdf", "_cdf_length")  # rebuilt by update() below
        state = {k: v for k, v in codec.state_dict().items() if not k.endswith(tables)}
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith(tables) for k in missing):
            raise SystemExit(f"cannot carry weights over: {missing} {unexpected}")
        codec = fresh
    fam = load_pretrained("cifar10")
    train, test = load_dataset("cifar10")
    cache = None
    if args.cache_file and args.views:
        import os

        from flowcodec.codecs.train import cache_views, load_views, save_views

        if os.path.exists(args.cache_file):
            cache = load_views(args.cache_file, args.views)
        else:
            head, tail = fam.eval().split(3, 1)
            gen = torch.Generator().manual_seed(args.seed)
            cache = cache_views(head, tail, train, args.views, gen)
            save_views(cache, args.cache_file)
    res = train_codec(codec, fam, 3, 1, train, None, lam=args.lam, beta=args.beta,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      drop_prob=args.drop_prob, max_steps=args.steps, seed=args.seed,
                      time_budget=args.seconds, kd=args.kd, temperature=args.temperature,
                      views=args.views, cache=cache, progress=True)  # fmt: skip
    round_half(codec).eval()
    codec.update(force=True)
    extra = dict(cfg["extra"])
    extra["finetune"] = {"from": args.codec, "lam": args.lam, "beta": args.beta, "kd": args.kd,
                         "temperature": args.temperature, "views": args.views,
                         "steps": args.steps, "epochs": res.epochs,
                         "batch_size": args.batch_size, "lr": args.lr,
                         "drop_prob": args.drop_prob, "device": "cpu",
                         "threads": args.threads, "seconds": round(res.seconds, 1),
                         "cache_seconds": round(res.cache_seconds, 1),
                         "history": res.history}  # fmt: skip
    extra["train_kwargs"] = {**extra.get("train_kwargs", {}), "lam": args.lam,
                             "drop_prob": args.drop_prob}  # fmt: skip
    path = save_codec(codec, CODEC_ZOO / args.out, kwargs, extra)
    print(f"saved {path} after {res.seconds:.0f}s, {res.epochs} epoch(s)")
    if args.eval:
        head, tail = fam.split(3, 1)
        ev = evaluate_codec(codec, head, tail, test.subset(args.eval, seed=0))
        print(f"{args.out}: {100 * ev.accuracy:.2f}% at {ev.bytes_per_image:.1f} B/image "
              f"(measured, {ev.n} test images; estimate {ev.est_bytes_per_image:.1f} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
