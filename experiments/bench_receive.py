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
``compress`` and ``decompress``; the coding alone, timed directly (from the integer
symbols to the payloads and back, without the analysis and synthesis networks: for the
task codecs the context model included, for the token codecs the position, assignment or
size codes, the stream framing and the stream checks included); CompressAI's raw rANS
coder on the same symbols and tables (one string per sample; for the token codecs the sent
tokens' latents, without side information); and the mean payload bytes of both formats
(at every rate point of the task codecs). Writes ``speed.csv`` and ``bytes.csv`` to
``--out``.
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


def per_call(fn, repeats: int, least: float = 0.05) -> float:
    """CPU seconds of one call of ``fn``: the best of ``repeats`` rounds, each of as many
    calls as take about ``least`` seconds (so a call of a fraction of a millisecond, the
    coding of one sample, is not timed alone)."""
    t = time.process_time()
    fn()
    once = max(time.process_time() - t, 1e-6)
    n = max(1, min(1000, round(least / once)))

    def many():
        for _ in range(n):
            fn()

    return best_of(many, repeats) / n


def sent_symbols(s) -> list[torch.Tensor]:
    """Each sample's sent token latents ``(k, M)``, token-major, from a token codec's
    :class:`~flowcodec.codecs.token.TokenSymbols` ``s``: every merged token (token-merge),
    or the kept tokens (token-prune)."""
    if s.where.dtype == torch.bool:  # token-prune: the kept tokens
        return [s.sym[b][:, s.where[b]].T for b in range(len(s.sym))]
    return [s.sym[b].T for b in range(len(s.sym))]


def received_symbols(d) -> list[torch.Tensor]:
    """:func:`sent_symbols` of what a token codec's ``_decode_symbols`` read back
    (:class:`~flowcodec.codecs.token.TokenDecoded` ``d``)."""
    if d.where.dtype == torch.bool:  # token-prune: the received tokens
        return [d.sym[b][d.where[b]] for b in range(len(d.sym))]
    return list(d.sym)


def token_raw(codec, s, repeats: int) -> float:
    """Samples/s of CompressAI's rANS coder alone (as :func:`compressai_raw`, one string per
    sample) compressing and decompressing a token codec's sent latent symbols with the same
    tables and CDF indexes (``s``: the codec's ``_analysis`` output; no side information)."""
    from flowcodec.codecs.entropy import _ext, _tables

    ans = _ext("ans")
    cdf, lengths, offsets = _tables(codec._y_model())
    sent = sent_symbols(s)
    k = [q.reshape(-1).tolist() for q in sent]
    idx = [s.cidx[b].expand_as(q).reshape(-1).tolist() for b, q in enumerate(sent)]

    def enc():
        return [ans.RansEncoder().encode_with_indexes(q, i, cdf, lengths, offsets)
                for q, i in zip(k, idx)]  # fmt: skip

    strings = enc()

    def dec():
        return [ans.RansDecoder().decode_with_indexes(q, i, cdf, lengths, offsets)
                for q, i in zip(strings, idx)]  # fmt: skip

    assert dec() == k
    return len(s.sym) / (per_call(enc, repeats) + per_call(dec, repeats))


def bench_token(name, codec, head, tail, x, args, writer, bytes_writer) -> None:
    """As :func:`bench_task`. The coding alone is timed directly: the codec's
    ``_code_symbols`` (side codes, token payloads, framing) on the symbols its
    ``_analysis`` gave once for the batch, and its ``_decode_symbols`` (stream checks, side
    codes, token payloads) on the streams ``compress`` wrote; ``compress`` is
    ``_code_symbols(_analysis(h))`` and ``decompress`` is
    ``_synthesis(_decode_symbols(streams))``, so what is left out is the networks."""
    with torch.no_grad():
        h = head(x)
        feats = codec(h).features
        t_tail = best_of(lambda: tail(feats), args.repeats)
        syms = codec._analysis(h)
    raw = token_raw(codec, syms, args.repeats)
    n = len(x)
    sizes = {}
    for fmt in (1, 2):
        codec.stream_format = fmt
        reps = args.repeats if fmt == 2 else args.old_repeats
        streams = codec.compress(h)
        # the coding path writes what compress writes and reads back what it coded
        assert [q.to_bytes() for q in codec._code_symbols(syms)] == \
            [q.to_bytes() for q in streams]  # fmt: skip
        back = received_symbols(codec._decode_symbols(streams))
        assert all(torch.equal(a.long(), b.long())
                   for a, b in zip(back, sent_symbols(syms), strict=True))  # fmt: skip
        t_c = best_of(lambda: codec.compress(h), reps)
        t_d = best_of(lambda s=streams: codec.decompress(s), reps)
        t_cc = per_call(lambda: codec._code_symbols(syms), reps)
        t_dc = per_call(lambda s=streams: codec._decode_symbols(s), reps)
        sizes[fmt] = payload(streams)
        row = {"codec": name, "format": fmt, "batch": n, "compress_sps": n / t_c,
               "decompress_sps": n / t_d, "tail_sps": n / t_tail,
               "decompress_over_tail": t_tail / t_d, "coding_compress_sps": n / t_cc,
               "coding_decompress_sps": n / t_dc, "coding_both_sps": n / (t_cc + t_dc),
               "compressai_raw_both_sps": raw, "payload_bytes": sizes[fmt]}  # fmt: skip
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
