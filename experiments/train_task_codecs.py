"""Train the low-rate, variable-rate task codecs shipped in the zoo (CPU or GPU).

    python -m experiments.train_task_codecs --point 2 --out cifar10-task_p2  # 2 CPU cores
    python -m experiments.train_task_codecs --point 1 --grid 4 --latent 16 --out cifar10-task_p1
    python -m experiments.train_task_codecs --point 2 --device cuda --epochs 60 --out ...
    python -m experiments.train_task_codecs --point 1 --lift-from cifar10-task_p2_ctx \
        --epochs 12 --stem-lr 2e-4 --out cifar10-task_p1_lift  # decoder only, 40 min

Builds a :class:`~flowcodec.codecs.task.TaskCodec` at split point ``--point`` of the shipped
CIFAR-10 family, starts its encoder's stem from the family's exit branch at that point
(the device already has it), trains it with :func:`~flowcodec.codecs.train_task.train_task_codec`
(live augmentation, logit distillation from member 3, a feature term, one rate weight per
rate point), rounds the transforms to float16, freezes the CDF tables, writes
``flowcodec/zoo/codecs/<out>.{safetensors,json}`` with the whole history, and prints the
measured accuracy and bytes of every rate point on ``--eval`` test images.
Progress (weights + history after each epoch) goes to ``--progress-dir``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

# the encoder's stem at each split point of the CIFAR-10 family: its exit branch's conv blocks
STEMS = {1: [(128, True), (128, False)], 2: [(256, True)]}


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import evaluate_codec
    from flowcodec.codecs.train_task import TaskTrainConfig, train_task_codec
    from flowcodec.codecs.zoo import CODEC_ZOO, round_half, save_codec
    from flowcodec.data import load_dataset
    from flowcodec.errors import ConfigError
    from flowcodec.family import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", type=int, choices=sorted(STEMS), required=True)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--views", type=int, default=1,
                    help="input views coded per image (2: the image and its mirror image; "
                         "the receiver averages the features decoded from each)")
    ap.add_argument("--grid", type=int, default=1,
                    help="latent map side (1: a vector; 4: a 4x4 map of --latent channels)")
    ap.add_argument("--packets", type=int, default=1)
    ap.add_argument("--lams", type=float, nargs="+", default=[3.0, 1.5, 0.8, 0.4, 0.2],
                    help="rate weight per kbit for each rate point, lowest rate first")
    ap.add_argument("--kd", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=3300, help="training time budget")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--drop-prob", type=float, default=0.0)
    ap.add_argument("--no-bf16", action="store_true", help="train in float32")
    ap.add_argument("--no-init", action="store_true", help="do not start from the exit branch")
    ap.add_argument("--extra-blocks", type=int, default=0,
                    help="conv3x3-BN-ReLU blocks (same width, no pooling) added to the encoder's "
                         "stem after the exit branch's blocks (more device FLOPs)")
    ap.add_argument("--warm-start", default=None,
                    help="start from a trained task codec of the zoo (its weights where shapes "
                         "match; --extra-blocks start as the identity, so step 0 is that codec)")
    ap.add_argument("--lift-from", default=None,
                    help="a trained task codec of the zoo at a later split point: build the "
                         "codec at --point from it (its encoder after a copy of the trunk's "
                         "stages in between, its decoder followed by a Lift back to --point's "
                         "shape) and train only the decoder, so its bytes are the source's")
    ap.add_argument("--extend-from", default=None,
                    help="a trained task codec of the zoo at --point: start from it with the "
                         "rate points of --ladder (flowcodec.codecs.train_task.extend_rates)")
    ap.add_argument("--ladder", default=None,
                    help="with --extend-from: comma-separated SOURCE_RATE:LOG2_GAIN_SHIFT, one "
                         "per rate point, e.g. 0:-1,0:0,1:0,4:1 (as many as --lams)")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="share of the steps before the rate term ramps in (0 for a warm start)")
    ap.add_argument("--stem-lr", type=float, default=5e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=10000, help="test images to score at the end")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="train on this many training images only (a quick check of a setup)")
    ap.add_argument("--cache-views", type=int, default=0,
                    help="train on this many augmented copies of the training set run through "
                         "the head and member 3 once (features float16, teacher logits), "
                         "one copy per epoch, instead of running the head live every step")
    ap.add_argument("--cache-file", default=None,
                    help="where the copies are kept (safetensors; reused when it exists)")
    ap.add_argument("--family", default="cifar10",
                    help="the family: a trained family's name (default cifar10) or a "
                         "checkpoint stem (e.g. runs/air/cifar10-air-family); the encoder's "
                         "stem starts from its exit branch only for cifar10 (else --no-init)")
    ap.add_argument("--receiver", type=int, default=None,
                    help="the member that decodes and finishes the task, and whose logits the "
                         "codec distils (default: the largest member that passes through "
                         "--point; for cifar10 grown with `--grow air`, member 4 at point 1)")
    ap.add_argument("--zoo-dir", default=None,
                    help="where the codec is written (default flowcodec/zoo/codecs)")
    ap.add_argument("--progress-dir", default="runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--finalize", action="store_true",
                    help="do not train: finish a run from its last progress checkpoint "
                         "(runs/<out>.progress.*), e.g. one stopped by hand")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "/" in args.family or args.family.endswith(".json"):
        from flowcodec.family import load_family

        fam = load_family(args.family)
    else:
        fam = load_pretrained(args.family)
    if fam.config.get("name") != "cifar10" and not (args.no_init or args.lift_from
                                                    or args.extend_from or args.warm_start):
        raise SystemExit(f"--family {args.family}: its exit branches are not a stem this "
                         "encoder can start from; add --no-init")  # fmt: skip
    if args.receiver is None:
        args.receiver = fam.receiver(args.point)
    try:
        fam.split(args.receiver, args.point)  # refuses a receiver off the point's path
    except ConfigError as err:
        raise SystemExit(f"--receiver {args.receiver}: {err}") from err
    print(f"receiver: member {args.receiver} from split point {args.point}")
    train, test = load_dataset("cifar10")
    if args.train_subset:
        train = train.subset(args.train_subset, seed=args.seed)
    shape = tuple(fam.feature_shape(args.point))
    stem = STEMS[args.point] + [(STEMS[args.point][-1][0], False)] * args.extra_blocks
    kwargs = {"latent": args.latent, "hidden": args.hidden, "stem": stem,
              "rates": len(args.lams), "packets": args.packets,
              **({"grid": args.grid} if args.grid != 1 else {}),
              **({"views": args.views} if args.views != 1 else {})}
    if args.lift_from:
        from flowcodec.codecs.train_task import lift_codec

        codec, kwargs = lift_codec(args.lift_from, fam, args.point)
        print(f"lift from {args.lift_from} to point {args.point}: stem {kwargs['stem']} "
              f"(the symbols equal the source's at every rate point)")
    elif args.extend_from:
        from flowcodec.codecs.train_task import extend_rates

        ladder = [tuple(e.split(":")) for e in (args.ladder or "").split(",") if e]
        if len(ladder) != len(args.lams):
            raise SystemExit(f"--ladder has {len(ladder)} points, --lams {len(args.lams)}")
        codec, kwargs = extend_rates(args.extend_from, ladder, packets=args.packets)
        print(f"rate points from {args.extend_from}: {ladder}")
    else:
        codec = build_codec("task", shape, **kwargs)
        if args.warm_start:
            from flowcodec.codecs.train_task import warm_start

            print(f"warm start: {warm_start(codec, args.warm_start)}")
        elif not args.no_init:
            copied = codec.g_a.load_stem_from(fam.exits[args.point - 1])
            print(f"encoder stem: {copied} layers from the family's exit {args.point}")
    cfg = TaskTrainConfig(lams=tuple(args.lams), kd=args.kd, beta=args.beta, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, drop_prob=args.drop_prob,
                          stem_lr=args.stem_lr, warmup=args.warmup,
                          bf16=not args.no_bf16, seed=args.seed, time_budget=args.seconds,
                          decoder_only=bool(args.lift_from))
    val = test.subset(1000, seed=123)
    cache = None
    if args.cache_views and not args.finalize:
        cache = _views(fam, args, train)
    if args.finalize:
        res = _resume(codec, f"{args.progress_dir}/{args.out}")
    else:
        res = train_task_codec(codec, fam, args.receiver, args.point, train, val, cfg,
                               device=args.device,
                               checkpoint=f"{args.progress_dir}/{args.out}", cache=cache)
    codec.to("cpu")
    round_half(codec).eval()
    codec.update(force=True)
    head, tail = fam.to("cpu").eval().split(args.receiver, args.point)
    data = test if args.eval >= len(test) else test.subset(args.eval, seed=0)
    measured = []
    for r in range(codec.rates if args.eval > 0 else 0):
        ev = evaluate_codec(codec.at_rate(r), head, tail, data)
        measured.append({"rate": r, "accuracy": ev.accuracy, "bytes": ev.bytes_per_image,
                         "session_bytes": ev.session_bytes_per_image,
                         "payload_bytes": ev.payload_bytes_per_image, "n": ev.n})
        print(f"{args.out} rate {r}: {100 * ev.accuracy:.2f}% at "
              f"{ev.session_bytes_per_image:.2f} B "
              f"(session framing; self-contained {ev.bytes_per_image:.2f} B; payload "
              f"{ev.payload_bytes_per_image:.2f} B; {ev.n} test images)")
    extra = {"train": {**asdict(cfg), "device": args.device, "threads": args.threads,
                       "seconds": round(res.seconds, 1), "epochs": res.epochs,
                       "steps": res.steps,
                       "init_from_exit": not (args.no_init or args.extend_from
                                              or args.lift_from or args.warm_start),
                       "cache_views": args.cache_views,
                       "warm_start": args.warm_start, "lift_from": args.lift_from,
                       "extend_from": args.extend_from, "ladder": args.ladder,
                       "history": res.history},
             "measured": measured, "encoder_flops": codec.encoder_flops(),
             "point": args.point, "member": args.receiver, "family": args.family}
    zoo = Path(args.zoo_dir) if args.zoo_dir else CODEC_ZOO
    if args.lift_from:  # the tensors it shares with its source are loaded from there
        from flowcodec.codecs.zoo import save_codec_variant

        path = save_codec_variant(codec, zoo / args.out, args.lift_from, kwargs, extra)
    else:
        path = save_codec(codec, zoo / args.out, kwargs, extra)
    print(f"saved {path} after {res.seconds:.0f} s, {res.epochs} epochs")
    print(json.dumps(measured))
    return 0


def _views(fam, args, train):
    """The cached copies of ``train`` at ``--point`` (loaded from ``--cache-file`` when it
    holds at least ``--cache-views`` copies, else computed and written there)."""
    import os
    import time

    import torch

    from flowcodec.codecs.train import cache_views, load_views, save_views

    if args.cache_file and os.path.exists(args.cache_file):
        cache = load_views(args.cache_file, args.cache_views)
        if len(cache) >= args.cache_views:
            print(f"feature cache: {len(cache)} copies from {args.cache_file}")
            return cache
    head, tail = fam.to(args.device).eval().split(args.receiver, args.point)
    t0 = time.perf_counter()
    cache = cache_views(head, tail, train, args.cache_views,
                        torch.Generator().manual_seed(args.seed + 1), device=args.device)
    print(f"feature cache: {args.cache_views} copies in {time.perf_counter() - t0:.0f} s")
    if args.cache_file:
        save_views(cache, args.cache_file)
    return cache


def _resume(codec, prefix: str):
    """Load a run's last per-epoch checkpoint into ``codec``; its history as a result."""
    from pathlib import Path

    from safetensors.torch import load_file

    from flowcodec.codecs.train_task import TaskTrainResult

    state = load_file(f"{prefix}.progress.safetensors")
    missing, unexpected = codec.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(("_offset", "_quantized_cdf", "_cdf_length"))
                         for k in missing):  # fmt: skip
        raise SystemExit(f"{prefix}: does not fit this codec: {missing} {unexpected}")
    hist = json.loads(Path(f"{prefix}.progress.json").read_text())["history"]
    last = hist[-1]
    return TaskTrainResult(history=hist, seconds=last["seconds"], epochs=len(hist),
                           steps=last["step"])


if __name__ == "__main__":
    raise SystemExit(main())
