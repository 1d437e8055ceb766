"""Receiver-side view averaging for the ViT token codecs (CIFAR-10, member 3 at point 2).

    FLOWCODEC_DATA=../shared/data python -m experiments.vit_token_views \\
        cifar10vit-merge_k4_arith cifar10vit-merge_k8_sizes_arith cifar10vit-all_arith \\
        --csv docs/vit_token_views_cifar10.csv

The device codes the input and its mirror image (the first ``--views`` of
``flowcodec.views.VIEWS``) with the same token codec, each view as its own stream;
the receiver decodes each, runs member 3's tail on each and averages the class
probabilities. For every codec (and for uncompressed tokens) it prints the accuracy with
1..V views and the bytes per image: compact (session framing, ``Bitstream.compact_nbytes``)
and self-contained (``Bitstream.to_bytes``), summed over the views sent. The bytes are real
streams; nothing is estimated.
"""

from __future__ import annotations

import argparse
import csv
import math


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs.zoo import load_pretrained_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.progress import tqdm
    from flowcodec.views import VIEWS

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codecs", nargs="+", help="shipped token codec names")
    ap.add_argument("--views", type=int, default=2, choices=range(1, len(VIEWS) + 1))
    ap.add_argument("--n", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    fam = load_pretrained("cifar10-vit").eval()
    head, tail = fam.split(3, 2)
    _, test = load_dataset("cifar10")
    if args.n is not None and args.n < len(test):
        test = test.subset(args.n, seed=0)
    views = list(VIEWS)[: args.views]
    codecs = {name: load_pretrained_codec(name).eval() for name in args.codecs}
    names = ["uncompressed", *codecs]
    hits = {(m, v): 0 for m in names for v in range(1, args.views + 1)}
    compact = {m: [0] * args.views for m in names}
    whole = {m: [0] * args.views for m in names}
    seen = 0
    batches = test.batches(250)
    with torch.no_grad():
        for x, y in tqdm(batches, total=math.ceil(len(test) / 250), desc="views"):
            hs = [head(VIEWS[v](x)) for v in views]
            for m in names:
                probs = []
                for v, h in enumerate(hs):
                    if m != "uncompressed":
                        streams = codecs[m].compress(h)
                        compact[m][v] += sum(s.compact_nbytes for s in streams)
                        whole[m][v] += sum(len(s.to_bytes()) for s in streams)
                        h = codecs[m].decompress(streams)
                    probs.append(tail(h).softmax(1))
                    p = torch.stack(probs).mean(0)
                    hits[m, v + 1] += int((p.argmax(1) == y).sum())
            seen += len(y)
    rows = []
    for m in names:
        for v in range(1, args.views + 1):
            rows.append({"codec": m, "views": v, "view_names": "+".join(views[:v]),
                         "accuracy": round(hits[m, v] / seen, 4),
                         "session_bytes": round(sum(compact[m][:v]) / seen, 2),
                         "bytes_per_image": round(sum(whole[m][:v]) / seen, 2), "n": seen})
    print(f"{'codec':34s} views  accuracy  session B  self-contained B  (n = {seen})")
    for r in rows:
        print(f"{r['codec']:34s} {r['views']:5d}  {100 * r['accuracy']:7.2f}%  "
              f"{r['session_bytes']:9.1f}  {r['bytes_per_image']:16.1f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
