"""Encode and decode time per image of every codec on CPU, at batch 1 and batch 256.

    python -m experiments.bench_codecs --out runs/bench_codecs --threads 2

Features are CIFAR-10 split-point-1 features (64x16x16) of test images when the data is
found, else non-negative random features of that shape (said in the output). Encode is
``compress`` (learned encoder, quantisation and entropy coding: what the device runs
after the family head); decode is ``decompress``. Writes ``bench.csv`` and ``bench.png``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path


def _codecs(train_mean, train_std, fit):
    from flowcodec.codecs import build_codec
    from flowcodec.codecs.zoo import list_pretrained, load_pretrained_codec

    shape = (64, 16, 16)
    out = [
        ("raw-float32", build_codec("raw", shape), 1),
        ("raw-float16", build_codec("raw", shape, dtype="float16"), 1),
        ("quant-4b", build_codec("quant", shape, bits=4).fit(fit), 1),
        ("pca-r8-4b", build_codec("pca", shape, rank=8, bits=4).fit(fit), 1),
        ("jpeg-q90", build_codec("jpeg", (3, 32, 32), quality=90, mean=train_mean,
                                 std=train_std), 0),
        ("webp-q90", build_codec("webp", (3, 32, 32), quality=90, mean=train_mean,
                                 std=train_std), 0),
    ]  # fmt: skip
    for name in ("cifar10-fact_l0p1", "cifar10-robust_l0p1",
                 "cifar10-binary_m16"):  # fmt: skip
        if name in list_pretrained():
            out.append((name.removeprefix("cifar10-"), load_pretrained_codec(name), 1))
    return out


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    import torch

    from flowcodec.errors import DataNotFoundError
    from flowcodec.family import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench_codecs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps1", type=int, default=20, help="repetitions at batch 1")
    ap.add_argument("--reps256", type=int, default=2, help="repetitions at batch 256")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fam = load_pretrained("cifar10")
    head, _ = fam.split(3, 1)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    try:
        from flowcodec.data import load_dataset

        train, test = load_dataset("cifar10")
        x = next(test.batches(256))[0]
        fit_x = next(train.batches(1000))[0]
        source = "CIFAR-10 test images"
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        x, fit_x = torch.randn(256, 3, 32, 32, generator=g), torch.randn(1000, 3, 32, 32,
                                                                       generator=g)
        source = "random inputs (CIFAR-10 not found)"
    with torch.no_grad():
        feats = {0: x, 1: head(x)}
        fit = head(fit_x)
    rows = []
    for label, codec, point in _codecs(mean, std, fit):
        codec.eval()
        h = feats[point]
        for batch, reps in ((1, args.reps1), (256, args.reps256)):
            hb = h[:batch]
            with torch.no_grad():
                streams = codec.compress(hb)
                enc = _time(lambda hb=hb, c=codec: c.compress(hb), reps) / batch
                dec = _time(lambda s=streams, c=codec: c.decompress(s), reps) / batch
            nbytes = sum(s.nbytes for s in streams) / batch
            rows.append({"codec": label, "batch": batch, "encode_ms": round(1e3 * enc, 3),
                         "decode_ms": round(1e3 * dec, 3), "bytes": round(nbytes, 1)})
            print(f"{label:>14} batch {batch:>3}: encode {1e3 * enc:8.3f} ms/img  "
                  f"decode {1e3 * dec:8.3f} ms/img  {nbytes:9.1f} B/img", flush=True)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, out / "bench.png", f"CPU, {args.threads} threads, {source}")
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.png'} ({source})")
    return 0


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["codec"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, batch in zip(axes, (1, 256)):
        enc = [next(r["encode_ms"] for r in rows if r["codec"] == c and r["batch"] == batch)
               for c in labels]  # fmt: skip
        dec = [next(r["decode_ms"] for r in rows if r["codec"] == c and r["batch"] == batch)
               for c in labels]  # fmt: skip
        ys = range(len(labels))
        ax.barh([y - 0.2 for y in ys], enc, 0.4, label="encode")
        ax.barh([y + 0.2 for y in ys], dec, 0.4, label="decode")
        ax.set_xscale("log")
        ax.set_xlabel("ms per image")
        ax.set_title(f"batch {batch}")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
