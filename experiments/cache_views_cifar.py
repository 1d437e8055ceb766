"""Cache augmented copies of CIFAR-10 through the frozen part of the shipped family.

    python -m experiments.cache_views_cifar --views 2 --out /tmp/cifar10_views.safetensors

Writes what ``flowcodec.codecs.train.cache_views`` returns for member 3 at split point 1
(features as float16, labels, member 3's logits), so that several
``experiments.finetune_codec_cpu --cache-file`` runs share one cache
(about 1.6 GB per copy).
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import time

    import torch

    from flowcodec.codecs.train import cache_views, save_views
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fam = load_pretrained("cifar10").eval()
    train, _ = load_dataset("cifar10")
    head, tail = fam.split(3, 1)
    t0 = time.perf_counter()
    cache = cache_views(head, tail, train, args.views, torch.Generator().manual_seed(args.seed))
    save_views(cache, args.out)
    print(f"cached {args.views} copies of {len(train)} images in "
          f"{time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
