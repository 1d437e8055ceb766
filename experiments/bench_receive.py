"""The receive path's coding speed: every shipped learned codec whose coder changed with
stream format 2 (the task codecs, and the token codecs with ``coder="arith"``), old path
(format 1: exact pure-Python arithmetic coder, float64 context model per sample) and new
path (format 2: compiled range coder, fixed-point context model for the whole batch), next
to the receiving member's tail at the codec's split point.

    OMP_NUM_THREADS=1 FLOWCODEC_DATA=../shared/data nice -n 19 \\
        .venv/bin/python -m experiments.bench_receive --out runs/bench_receive

One thread, batch 512 (``--batches``), CIFAR-10 test images through the family's head.
Times are CPU seconds of this process (``time.process_time``, best of ``--repeats``;
the old path once), so a busy machine inflates them less than wall time would; compare
figures as ratios within one run. Per codec and format it prints samples/s of
``compress`` and ``decompress``; for the task codecs also the coding alone (from the
integer symbols to the payloads and back, the context model included, without the
analysis and synthesis transforms), CompressAI's raw rANS coder on the same symbols and
tables, and the mean payload bytes of both formats at every rate point. Writes
``speed.csv`` and ``bytes.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from flowcodec.bitstream import Bitstream

#: Shipped codecs whose payloads the arithmetic coder writes.
TASK = ["cifar10-task_p2_ctx", "cifar10-task_p2_1p", "cifar10-task_p2", "cifar10-task_p1_1p",
        "cifar10-task_p1", "cifar10-task_p1_lift"]  # fmt: skip
TOKEN = ["cifar10vit-all_arith", "cifar10vit-merge_k4_arith",
         "cifar10vit-merge_k8_sizes_arith"]  # fmt: skip


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return max(best, 1e-9)


def payload(streams: list[Bitstream]) -> float:
    return sum(len(p) for s in streams for p in s.packets) / len(streams)


def images(n: int) -> torch.Tensor:
    from flowcodec.data import load_dataset

    _, test = load_dataset("cifar10")
    return next(test.batches(n))[0]


def bench_task(name, codec, head, tail, x, args, writer, bytes_writer) -> None:
    with torch.no_grad():
        h = codec.device_features(head, x)
        feats = codec(h).features
        t_tail = best_of(lambda: tail(feats), args.repeats)
    r = codec.rates - 1
    k = codec.symbols(h, r)
    raw = compressai_raw(codec, h, r, args.repeats)
    n = len(x)
    for fmt in (1, 2):
        codec.stream_format = fmt
        reps = args.repeats if fmt == 2 else args.old_repeats
        streams = codec.compress(h, rate=r)
        header = streams[0].header
        packets = [s.packets for s in streams]
        t_c = best_of(lambda: codec.compress(h, rate=r), reps)
        t_d = best_of(lambda s=streams: codec.decompress(s), reps)
        # the coding alone (the context model included), timed directly
        if fmt == 1:
            t_cc = best_of(lambda hd=header: codec._compress_format1(k, r, hd), reps)
            t_dc = best_of(lambda p=packets: [codec._decode_format1(q, r) for q in p], reps)
        else:
            t_cc = best_of(lambda hd=header: codec._compress_format2(k, r, hd), reps)
            t_dc = best_of(lambda p=packets: codec._decode_format2(p, r), reps)
        row = {"codec": name, "format": fmt, "batch": n, "compress_sps": n / t_c,
               "decompress_sps": n / t_d, "tail_sps": n / t_tail,
               "decompress_over_tail": t_tail / t_d, "coding_compress_sps": n / t_cc,
               "coding_decompress_sps": n / t_dc, "coding_both_sps": n / (t_cc + t_dc),
               "compressai_raw_both_sps": raw, "payload_bytes": payload(streams)}  # fmt: skip
        report(row, writer)
    for rr in range(codec.rates):
        sizes = {}
        for fmt in (1, 2):
            codec.stream_format = fmt
            sizes[fmt] = payload(codec.compress(h, rate=rr))
        bytes_writer.writerow({"codec": name, "rate": rr, "bytes_format1": f"{sizes[1]:.3f}",
                               "bytes_format2": f"{sizes[2]:.3f}",
                               "difference": f"{sizes[2] - sizes[1]:+.3f}"})  # fmt: skip
        print(f"  {name} rate {rr}: payload {sizes[1]:.3f} B (format 1) -> {sizes[2]:.3f} B "
              f"(format 2)")  # fmt: skip
    codec.stream_format = 2


def compressai_raw(codec, h, r: int, repeats: int) -> float:
    """Samples/s of CompressAI's rANS coder alone (its C++ ``RansEncoder`` /
    ``RansDecoder``, indexed tables, one string per sample) compressing and decompressing the
    same symbols with the same factorized tables: the raw coder's speed on these symbols."""
    from flowcodec.codecs.entropy import _ext, _tables

    ans = _ext("ans")
    cdf, lengths, offsets = _tables(codec.entropy_bottlenecks[r])
    k = codec.symbols(h, r).tolist()
    idx = [i // codec.positions for i in range(codec.n_sym)]

    def enc():
        return [ans.RansEncoder().encode_with_indexes(s, idx, cdf, lengths, offsets) for s in k]

    strings = enc()

    def dec():
        return [ans.RansDecoder().decode_with_indexes(s, idx, cdf, lengths, offsets)
                for s in strings]  # fmt: skip

    assert dec() == k
    return len(h) / (best_of(enc, repeats) + best_of(dec, repeats))


def token_raw(codec, h, repeats: int) -> float | None:
    """Samples/s of CompressAI's rANS coder alone (as :func:`compressai_raw`) on a
    token-merge codec's latent symbols and CDF indexes (one string per sample), or None
    for other token codecs."""
    from flowcodec.codecs.entropy import _ext, _tables

    if not hasattr(codec, "_merge"):
        return None
    with torch.no_grad():
        merged, _ = codec._merge(codec._tokens(h.float()))
        every = torch.ones(len(h), codec.clusters)
        sym, cidx, _ = codec._latent_symbols(codec.g_a(merged).transpose(1, 2), every)
    ans = _ext("ans")
    cdf, lengths, offsets = _tables(codec._y_model())
    k = [sym[b].T.reshape(-1).tolist() for b in range(len(h))]
    idx = [cidx[b].expand(sym.shape[2], -1).reshape(-1).tolist() for b in range(len(h))]

    def enc():
        return [ans.RansEncoder().encode_with_indexes(s, i, cdf, lengths, offsets)
                for s, i in zip(k, idx)]  # fmt: skip

    strings = enc()

    def dec():
        return [ans.RansDecoder().decode_with_indexes(s, i, cdf, lengths, offsets)
                for s, i in zip(strings, idx)]  # fmt: skip

    assert dec() == k
    return len(h) / (best_of(enc, repeats) + best_of(dec, repeats))


def bench_token(name, codec, head, tail, x, args, writer, bytes_writer) -> None:
    """As :func:`bench_task`; the coding alone is ``compress + decompress`` less
    ``forward`` (the same analysis, merge and synthesis, without the coding: an
    approximation that also takes off forward's likelihoods)."""
    with torch.no_grad():
        h = head(x)
        feats = codec(h).features
        t_tail = best_of(lambda: tail(feats), args.repeats)
        t_fwd = best_of(lambda: codec(h), args.repeats)
    raw = token_raw(codec, h, args.repeats)
    n = len(x)
    sizes = {}
    for fmt in (1, 2):
        codec.stream_format = fmt
        reps = args.repeats if fmt == 2 else args.old_repeats
        streams = codec.compress(h)
        t_c = best_of(lambda: codec.compress(h), reps)
        t_d = best_of(lambda s=streams: codec.decompress(s), reps)
        sizes[fmt] = payload(streams)
        row = {"codec": name, "format": fmt, "batch": n, "compress_sps": n / t_c,
               "decompress_sps": n / t_d, "tail_sps": n / t_tail,
               "decompress_over_tail": t_tail / t_d, "payload_bytes": sizes[fmt]}  # fmt: skip
        if raw is not None:
            both = max(t_c + t_d - t_fwd, 1e-9)
            row.update({"coding_compress_sps": float("nan"),
                        "coding_decompress_sps": float("nan"), "coding_both_sps": n / both,
                        "compressai_raw_both_sps": raw})  # fmt: skip
        report(row, writer)
    bytes_writer.writerow({"codec": name, "rate": "", "bytes_format1": f"{sizes[1]:.3f}",
                           "bytes_format2": f"{sizes[2]:.3f}",
                           "difference": f"{sizes[2] - sizes[1]:+.3f}"})  # fmt: skip
    codec.stream_format = 2


FIELDS = ["codec", "format", "batch", "compress_sps", "decompress_sps", "tail_sps",
          "decompress_over_tail", "coding_compress_sps", "coding_decompress_sps",
          "coding_both_sps", "compressai_raw_both_sps", "payload_bytes"]  # fmt: skip


def report(row: dict, writer) -> None:
    writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    extra = ""
    if "coding_both_sps" in row:
        extra = (f"  coding only: compress {row['coding_compress_sps']:8.0f}  decompress "
                 f"{row['coding_decompress_sps']:8.0f}  both {row['coding_both_sps']:8.0f}  "
                 f"(CompressAI raw both {row['compressai_raw_both_sps']:8.0f})")
    print(f"{row['codec']:32s} format {row['format']}  batch {row['batch']:4d}  compress "
          f"{row['compress_sps']:8.0f}/s  decompress {row['decompress_sps']:8.0f}/s  tail "
          f"{row['tail_sps']:6.0f}/s  decompress/tail {row['decompress_over_tail']:5.2f}x  "
          f"payload {row['payload_bytes']:.2f} B{extra}", flush=True)


def main(argv=None) -> int:
    from flowcodec.codecs.zoo import list_pretrained, load_pretrained_codec
    from flowcodec.family import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_receive")
    ap.add_argument("--batches", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the new path")
    ap.add_argument("--old-repeats", type=int, default=1, help="timed rounds of the old path")
    ap.add_argument("--codecs", nargs="+", default=TASK + TOKEN)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = set(list_pretrained())
    x_all = images(max(args.batches))
    families = {}
    with open(out / "speed.csv", "w", newline="") as fs, \
            open(out / "bytes.csv", "w", newline="") as fb:  # fmt: skip
        writer = csv.DictWriter(fs, FIELDS, extrasaction="ignore")
        bytes_writer = csv.DictWriter(fb, ["codec", "rate", "bytes_format1", "bytes_format2",
                                           "difference"])  # fmt: skip
        writer.writeheader()
        bytes_writer.writeheader()
        for name in args.codecs:
            if name not in shipped:
                print(f"{name}: not shipped, skipped")
                continue
            codec = load_pretrained_codec(name).eval()
            token = name.startswith("cifar10vit")
            fam_name = "cifar10-vit" if token else "cifar10"
            if fam_name not in families:
                families[fam_name] = load_pretrained(fam_name).eval()
            fam = families[fam_name]
            point = 2 if token else (1 if tuple(codec.feature_shape)[1] == 16 else 2)
            head, tail = fam.split(3, point)
            for b in args.batches:
                x = x_all[:b]
                (bench_token if token else bench_task)(name, codec, head, tail, x, args,
                                                       writer, bytes_writer)  # fmt: skip
                fs.flush()
                fb.flush()
    print(f"wrote {out / 'speed.csv'} and {out / 'bytes.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
