"""Train the token codecs of the ViT family (``cifar10-vit``) and write them to the zoo.

The head's tokens at the split point (and member 3's logits on them, the distillation
target) are computed once for ``--views`` augmented copies of the training set; then each
codec in :data:`MODELS` trains on that cache for at most ``--seconds`` (its cosine schedule
stretched to the epochs that fit), with the task loss, logit distillation and a small
feature term, and is saved (float16 transforms, frozen entropy tables) as
``cifar10vit-<name>``. ``experiments/rd_vit_cifar10.json`` measures them.

    FLOWCODEC_DATA=../shared/data python -m experiments.train_vit_token_codecs \\
        --seconds 360 --out flowcodec/zoo/codecs

Smoke test: ``--max-steps 2 --train-samples 512 --test-samples 256 --out /tmp/vitc``
(with ``--family-from`` a small saved family).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

#: name -> (codec registry name, constructor kwargs, train_codec kwargs)
MODELS: dict[str, tuple[str, dict, dict]] = {
    "merge_k2": ("token-merge", {"clusters": 2, "latent": 8, "hidden": 64, "packets": 1},
                 {"lam": 0.5}),
    "merge_k4": ("token-merge", {"clusters": 4, "latent": 8, "hidden": 64, "packets": 1},
                 {"lam": 0.5}),
    "merge_k8": ("token-merge", {"clusters": 8, "latent": 8, "hidden": 64, "packets": 1},
                 {"lam": 0.5}),
    # cluster sizes instead of the assignment (order="sizes": the ViT tail does not depend on
    # the order of the patch tokens), at three rate weights
    "merge_k8_sizes": ("token-merge", {"clusters": 8, "latent": 8, "hidden": 64, "packets": 1,
                                       "order": "sizes"}, {"lam": 1.0}),
    "merge_k8_sizes_r2": ("token-merge", {"clusters": 8, "latent": 8, "hidden": 64,
                                          "packets": 1, "order": "sizes"}, {"lam": 2.0}),
    "merge_k8_sizes_r03": ("token-merge", {"clusters": 8, "latent": 8, "hidden": 64,
                                           "packets": 1, "order": "sizes"}, {"lam": 0.3}),
    # a wider latent (16 values per merged token, the class token's included)
    "merge_k8_l16": ("token-merge", {"clusters": 8, "latent": 16, "hidden": 64, "packets": 1},
                     {"lam": 0.5}),
    "prune": ("token-prune", {"latent": 8, "hidden": 64, "packets": 1}, {"lam": 0.5}),
    # every token kept (the threshold is below any logit): the all-token learned codec
    "all": ("token-prune", {"latent": 8, "hidden": 64, "packets": 1, "threshold": -1e9},
            {"lam": 0.5}),
    # the (C, H, W) factorized codec on the tokens laid out as a 128 x 10 x 8 map
    "map_fact": ("token-map", {"inner": "factorized",
                               "inner_kwargs": {"latent": 32, "hidden": 64, "packets": 1}},
                 {"lam": 0.5}),
}  # fmt: skip

FAMILY, MEMBER = "cifar10-vit", 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="flowcodec/zoo/codecs", help="folder for the checkpoints")
    ap.add_argument("--point", type=int, default=2, help="split point (default 2)")
    ap.add_argument("--views", type=int, default=1, help="augmented copies to cache")
    ap.add_argument("--seconds", type=float, default=360, help="training budget per codec")
    ap.add_argument("--epochs", type=int, default=8, help="epochs before the budget cuts")
    ap.add_argument("--kd", type=float, default=1.0, help="logit distillation weight")
    ap.add_argument("--beta", type=float, default=0.1, help="feature (MSE) term weight")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lam", type=float, default=None, help="override every codec's lam")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(MODELS))
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps (smoke tests)")
    ap.add_argument("--train-samples", type=int, default=None, help="train on a subset")
    ap.add_argument("--test-samples", type=int, default=None,
                    help="estimate accuracy on a subset of the test set (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, metavar="PATH",
                    help="keep the cached views in this safetensors file: read it when it "
                         "exists (with at least --views views), else write it")  # fmt: skip
    ap.add_argument("--family-from", default=None,
                    help="a family checkpoint path instead of the shipped cifar10-vit")
    args = ap.parse_args(argv)

    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import cache_views, load_views, save_views, train_codec
    from flowcodec.codecs.zoo import save_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_family, load_pretrained

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fam = (load_family(args.family_from) if args.family_from else load_pretrained(FAMILY)).eval()
    train, test = load_dataset("cifar10")
    if args.train_samples:
        train = train.subset(args.train_samples, seed=0)
    if args.test_samples:
        test = test.subset(args.test_samples, seed=0)
    head, tail = fam.split(MEMBER, args.point)
    t0 = time.perf_counter()
    cache = None
    if args.cache and Path(args.cache).exists():
        cache = load_views(args.cache, args.views)
        if len(cache) < args.views or len(cache[0][1]) != len(train):
            print(f"{args.cache} holds {len(cache)} view(s) of {len(cache[0][1])} samples, "
                  f"not {args.views} of {len(train)}: computing them again", flush=True)
            cache = None
        else:
            print(f"read {args.views} cached view(s) from {args.cache}", flush=True)
    if cache is None:
        with torch.no_grad():
            cache = cache_views(head, tail, train, args.views,
                                torch.Generator().manual_seed(0))  # fmt: skip
        if args.cache:
            save_views(cache, args.cache)
    print(f"cached {args.views} view(s) of {len(train)} samples in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    for name in args.only or list(MODELS):
        kind, ckw, tkw = MODELS[name]
        if args.lam is not None:
            tkw = {**tkw, "lam": args.lam}
        torch.manual_seed(0)
        codec = build_codec(kind, fam.feature_shape(args.point), **ckw)
        res = train_codec(codec, fam, MEMBER, args.point, train, test, epochs=args.epochs,
                          batch_size=128, lr=args.lr, beta=args.beta, kd=args.kd, seed=0,
                          time_budget=args.seconds, max_steps=args.max_steps, cache=cache,
                          progress=sys.stderr.isatty(), **tkw)  # fmt: skip
        codec.update(force=True)
        extra = {"family": FAMILY, "member": MEMBER, "point": args.point,
                 "train": {**tkw, "kd": args.kd, "beta": args.beta, "lr": args.lr,
                           "views": args.views, "seconds_budget": args.seconds},
                 "history": res.history, "epochs": res.epochs,
                 "train_seconds": round(res.seconds, 1),
                 "est_test_accuracy": res.test_accuracy, "est_bytes": res.est_bytes,
                 "command": "python -m experiments.train_vit_token_codecs " + " ".join(
                     argv if argv is not None else sys.argv[1:])}  # fmt: skip
        path = save_codec(codec, out / f"cifar10vit-{name}", ckw, extra)
        print(f"[{name}] {res.epochs} epochs, {res.seconds:.0f} s, estimated test accuracy "
              f"{res.test_accuracy:.4f} at {res.est_bytes:.1f} B -> {path}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
