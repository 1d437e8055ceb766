"""Fuzz the decoders of every registered codec with mutated streams whose CRCs are valid.

For each registered codec (and the shipped learned codecs) the script makes genuine
streams, mutates their packets (bit flips, byte writes, truncation, extension, random
payloads, zstd frames declaring huge sizes, empty packets), re-frames them so every CRC
is valid, and decodes them in both framings (self-contained ``to_bytes`` and session
``to_compact``) in child processes. It also splices genuine packets between samples and
codecs and reorders them *without* re-framing, and counts how many were accepted.

Every decode runs twice and the outputs are compared (determinism). A child that dies
(a crash) or stops answering (a hang, ``--timeout`` seconds per chunk) is counted; its
chunk is not retried. The table at the end has one row per codec.

With ``--checkpoints`` it also flips bits of every shipped checkpoint (weights and JSON;
``--ckpt-flips`` random flips of each file, plus every flip of the weights' first
``--ckpt-head`` bytes, the safetensors header) and loads it in a child process.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python experiments/fuzz_streams.py \\
        --minutes 8 --checkpoints

Exit status 1 when anything other than BitstreamError/CheckpointError was raised, or a
child crashed or hung, or a decode was not deterministic, or a spliced packet was accepted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter, defaultdict

# the codecs are the small instances of flowcodec.codecs.examples (SMALL_CODECS, on a
# SMALL_SHAPE = (16, 8, 8) map; token-map on 17 tokens of width 16, images on (3, 16, 16))
SHIPPED = ["cifar10-fact_l0p1", "cifar10-robust_l0p1", "cifar10-hyper_l0p1",
           "cifar10-binary_m16"]  # fmt: skip
MUTATIONS = ["flip", "flip2", "byte", "truncate", "extend", "random", "empty", "zstd_bomb",
             "duplicate"]  # fmt: skip


def _codecs():
    """(label, codec) for every registered codec that builds here, and shipped ones."""
    import torch

    from flowcodec.codecs import CODECS, build_codec
    from flowcodec.codecs.examples import SMALL_SHAPE as SHAPE
    from flowcodec.codecs.examples import build_small, small_shape
    from flowcodec.codecs.zoo import list_pretrained, load_pretrained_codec

    out = []
    g = torch.Generator().manual_seed(1)
    fit = torch.relu(torch.randn(32, *SHAPE, generator=g))
    for name in sorted(CODECS):
        shape = small_shape(name)
        try:  # seeded; the device-answer codecs (exit-*) get a small exit branch
            codec = build_small(name)
            codec.fit(torch.relu(torch.randn(32, *shape, generator=g)) if shape != SHAPE
                      else fit).eval()  # fmt: skip
            codec.update(force=True)
            codec.compress(torch.relu(torch.randn(2, *shape, generator=g)))
        except Exception as e:  # noqa: BLE001 - a codec that needs other settings is skipped
            print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        out.append((name, codec))
    torch.manual_seed(0)  # a multi-view task codec: two views' packets in one stream
    views = build_codec("task", SHAPE, latent=8, hidden=16, packets=2, views=2).fit(fit).eval()
    views.update(force=True)
    out.append(("task-views2", views))
    torch.manual_seed(0)  # a lifted task codec (residual stem, context model, decoder + lift)
    lift = build_codec("task", SHAPE, latent=8, hidden=16, packets=2, context=True,
                       stem=[["res", 0], [32, True]], via=[32, 4, 4]).fit(fit).eval()
    lift.update(force=True)
    out.append(("task-lift", lift))
    torch.manual_seed(0)  # token-merge with the hyperprior: z in packet 0, clusters after it
    tmh = build_codec("token-merge", SHAPE, clusters=8, latent=8, hidden=16, packets=2,
                      prior="hyperprior", hyper=4).fit(fit).eval()  # fmt: skip
    tmh.update(force=True)
    out.append(("token-merge-hyper", tmh))
    for name in SHIPPED:
        if name in list_pretrained():
            out.append((name, load_pretrained_codec(name)))
    return out


def _mutate(rng: random.Random, packet: bytes, kind: str) -> bytes:
    p = bytearray(packet)
    if kind in ("flip", "flip2") and p:
        for _ in range(1 if kind == "flip" else 2):
            bit = rng.randrange(8 * len(p))
            p[bit // 8] ^= 1 << (bit % 8)
    elif kind == "byte" and p:
        p[rng.randrange(len(p))] = rng.randrange(256)
    elif kind == "truncate":
        p = p[: rng.randrange(len(p) + 1)]
    elif kind == "extend":
        p += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == "random":
        p = bytearray(rng.randrange(256) for _ in range(rng.randrange(2 * len(p) + 9)))
    elif kind == "empty":
        p = bytearray()
    elif kind == "zstd_bomb":
        p = bytearray(bytes.fromhex("28b52ffde0") + struct.pack("<Q", 1 << rng.randrange(20, 63)))
    elif kind == "duplicate":
        p = p + p
    return bytes(p)


def _worker(label: str, seed: int, n_cases: int, conn) -> None:
    """Decode ``n_cases`` mutated streams of codec ``label``; send back counts."""
    import torch

    from flowcodec.bitstream import Bitstream, BitstreamError

    torch.set_num_threads(1)
    codec = dict(_codecs_cached())[label]
    rng = random.Random(seed)
    shape = codec.input_shape
    g = torch.Generator().manual_seed(seed)
    genuine = codec.compress(torch.relu(torch.randn(4, *shape, generator=g)))
    for i, s in enumerate(genuine):
        s.seq = seed * 4 + i
    counts: Counter = Counter()
    examples: dict = {}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    max_in = 0
    for _ in range(n_cases):
        src = genuine[rng.randrange(len(genuine))]
        packets = list(src.packets)
        j = rng.randrange(len(packets))
        kind = rng.choice(MUTATIONS)
        packets[j] = _mutate(rng, packets[j], kind)
        framing = rng.choice(["bytes", "compact"])
        stream = Bitstream(src.header, packets, src.seq)
        raw = stream.to_bytes() if framing == "bytes" else stream.to_compact()
        max_in = max(max_in, len(raw))
        outs = []
        for _rep in range(2):
            try:
                parsed = (Bitstream.from_bytes(raw) if framing == "bytes"
                          else Bitstream.from_compact(raw, src.header))  # fmt: skip
                outs.append(codec.decompress([parsed]))
            except BitstreamError:
                outs.append("BitstreamError")
            except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
                outs.append(f"{type(e).__name__}")
                examples.setdefault(type(e).__name__, (kind, raw.hex()[:200],
                                                       traceback.format_exc()[-600:]))
        a, b = outs
        if isinstance(a, str):
            counts[a if a == "BitstreamError" else "other_exception"] += 1
        else:
            counts["decoded"] += 1
            if not torch.isfinite(a).all():
                counts["non_finite"] += 1
        if isinstance(a, str) != isinstance(b, str) or (
                not isinstance(a, str) and not torch.equal(a, b)):  # fmt: skip
            counts["nondeterministic"] += 1
    # splices and reorders, never re-framed: each must come back lost or be refused
    for _ in range(max(1, n_cases // 20)):
        a, b = rng.sample(genuine, 2)
        framing = rng.choice(["sample", "session"])
        units = a.units(framing)
        off = 1 if framing == "sample" else 0
        j = rng.randrange(len(a.packets))
        if rng.random() < 0.5:
            units[off + j] = b.units(framing)[off + j]  # from another sample
        elif len(a.packets) > 1:
            k = (j + 1) % len(a.packets)
            units[off + j], units[off + k] = units[off + k], units[off + j]  # reordered
        else:
            continue
        got = Bitstream.from_units(a.header, units, framing, seq=a.seq)
        counts["splices"] += 1
        if got.packets[j] is not None and got.packets[j] != a.packets[j]:
            counts["splice_accepted"] += 1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send((dict(counts), examples, (rss - base_rss) * 1024, max_in))
    conn.close()


_CACHE: list = []


def _codecs_cached():
    if not _CACHE:
        _CACHE.extend(_codecs())
    return _CACHE


def _ckpt_worker(jobs, conn) -> None:
    """Load each (json_bytes, weights_bytes) flip; count outcomes."""
    import tempfile
    from pathlib import Path

    from flowcodec.codecs.zoo import load_codec
    from flowcodec.errors import CheckpointError

    counts: Counter = Counter()
    examples = {}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "c"
        for js, ws in jobs:
            base.with_suffix(".json").write_bytes(js)
            base.with_suffix(".safetensors").write_bytes(ws)
            try:
                load_codec(base)
                counts["loaded"] += 1
            except CheckpointError:
                counts["CheckpointError"] += 1
            except Exception as e:  # noqa: BLE001
                counts["other_exception"] += 1
                examples.setdefault(type(e).__name__, traceback.format_exc()[-600:])
    conn.send((dict(counts), examples))
    conn.close()


def _run_child(target, args, timeout):
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
        return "hang", None
    if result is None:
        return "crash", p.exitcode
    return "ok", result


def fuzz_checkpoints(rng: random.Random, flips: int, head: int, timeout: float) -> Counter:
    from flowcodec.codecs.zoo import CODEC_ZOO, list_pretrained

    total: Counter = Counter()
    for name in list_pretrained():
        if not (CODEC_ZOO / f"{name}.safetensors").is_file():
            continue  # a variant (JSON only): its weights are fuzzed under their own name
        js = (CODEC_ZOO / f"{name}.json").read_bytes()
        ws = (CODEC_ZOO / f"{name}.safetensors").read_bytes()
        jobs = []
        for target, data in (("json", js), ("weights", ws)):
            bits = [rng.randrange(8 * len(data)) for _ in range(flips)]
            if target == "weights":
                bits += list(range(8 * min(head, len(data))))
            for bit in bits:
                b = bytearray(data)
                b[bit // 8] ^= 1 << (bit % 8)
                jobs.append((bytes(b), ws) if target == "json" else (js, bytes(b)))
        status, res = _run_child(_ckpt_worker, (jobs,), timeout)
        total["flips"] += len(jobs)
        if status != "ok":
            total[status] += 1
            print(f"checkpoint {name}: child {status} ({res})")
            continue
        counts, examples = res
        total.update(counts)
        for k, v in examples.items():
            print(f"checkpoint {name}: {k}\n{v}")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time budget for streams")
    ap.add_argument("--chunk", type=int, default=400, help="cases per child process")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated codec labels to fuzz")
    ap.add_argument("--checkpoints", action="store_true")
    ap.add_argument("--ckpt-flips", type=int, default=150)
    ap.add_argument("--ckpt-head", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = random.Random(args.seed)
    t0 = time.time()
    codecs = [label for label, _ in _codecs_cached()]
    if args.only:
        codecs = [c for c in codecs if c in args.only.split(",")]
    print(f"codecs: {', '.join(codecs)}")
    rows: dict = defaultdict(Counter)
    mem: dict = defaultdict(int)
    big: dict = defaultdict(int)
    all_examples = {}
    seed = args.seed * 1_000_000
    while time.time() - t0 < 60 * args.minutes:
        for label in codecs:
            if time.time() - t0 >= 60 * args.minutes:
                break
            seed += 1
            status, res = _run_child(_worker, (label, seed, args.chunk), args.timeout)
            rows[label]["chunks"] += 1
            if status != "ok":
                rows[label][status] += 1
                print(f"{label}: child {status} (seed {seed}, exit {res})")
                continue
            counts, examples, rss, max_in = res
            rows[label].update(counts)
            mem[label] = max(mem[label], rss)
            big[label] = max(big[label], max_in)
            for k, v in examples.items():
                all_examples.setdefault((label, k), v)
    elapsed = time.time() - t0
    cols = ["cases", "decoded", "BitstreamError", "other_exception", "non_finite",
            "nondeterministic", "crash", "hang", "splices", "splice_accepted"]  # fmt: skip
    print(f"\n{'codec':22s} " + " ".join(f"{c:>16s}" for c in cols) + f" {'peak RSS growth':>16s}")
    total: Counter = Counter()
    for label in codecs:
        r = rows[label]
        r["cases"] = r["decoded"] + r["BitstreamError"] + r["other_exception"]
        total.update(r)
        print(f"{label:22s} " + " ".join(f"{r[c]:16d}" for c in cols)
              + f" {mem[label] / 2**20:13.1f} MiB")  # fmt: skip
    print(f"{'total':22s} " + " ".join(f"{total[c]:16d}" for c in cols))
    print(f"\n{total['cases']} mutated CRC-valid streams (each decoded twice) and "
          f"{total['splices']} splices/reorders in {elapsed:.0f} s "
          f"({total['cases'] / max(elapsed, 1e-9):.0f} streams/s), largest input "
          f"{max(big.values(), default=0)} bytes")  # fmt: skip
    for (label, k), v in all_examples.items():
        print(f"\n--- {label}: {k}\n{v}")
    bad = total["other_exception"] + total["crash"] + total["hang"] + total["nondeterministic"] \
        + total["splice_accepted"] + total["non_finite"]  # fmt: skip
    if args.checkpoints:
        t1 = time.time()
        ck = fuzz_checkpoints(rng, args.ckpt_flips, args.ckpt_head, args.timeout)
        print(f"\ncheckpoint bit flips: {dict(ck)} in {time.time() - t1:.0f} s")
        bad += ck["other_exception"] + ck["crash"] + ck["hang"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
