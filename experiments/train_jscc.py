"""Train a JSCC codec (analog or 16-point discrete) at split point 2 of the CIFAR-10 family.

    python -m experiments.train_jscc --out cifar10-jscc_p2 --seconds 1500      # 2 CPU cores
    python -m experiments.train_jscc --constellation qam16 --init runs/cifar10-jscc_p2 \\
        --out cifar10-jscc16_p2 --seconds 600 --no-zoo
    python -m experiments.train_jscc --views 4 --init cifar10-jscc_p2 --out cifar10-jscc_p2v4

Builds a :class:`~flowcodec.codecs.jscc.JSCCCodec` (``--symbols`` complex channel uses at
most, FiLM by the SNR and the channel uses), warm-starts it from a trained codec
(``--init``: a shipped codec's name or a checkpoint path; by default the shipped task
codec ``cifar10-task_p2``, whose 32-number latent becomes the 16 complex symbols, its
decoder's first layer rescaled from the task codec's latent scale to unit-power symbols),
trains it through AWGN, Rayleigh fading and OFDM/TDL-A at SNRs uniform in -5..20 dB with
:func:`~flowcodec.codecs.jscc_train.train_jscc` (task + distillation + feature loss),
rounds its weights to float16, measures on ``--schedule-n`` test images which channel
uses each SNR needs (the fewest of ``--levels`` within ``--tolerance`` points of all
``--symbols``: the schedule), and writes the checkpoint (``flowcodec/zoo/codecs/<out>``,
or ``runs/<out>`` with ``--no-zoo``) with the whole history.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, eval_jscc, train_jscc
    from flowcodec.codecs.zoo import (
        CODEC_ZOO,
        load_codec,
        load_pretrained_codec,
        round_half,
        save_codec,
    )
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="cifar10", choices=["cifar10", "digits"])
    ap.add_argument("--point", type=int, default=2)
    ap.add_argument("--symbols", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--stem", type=int, default=256, help="encoder stem channels")
    ap.add_argument("--levels", type=int, nargs="+", default=[4, 8, 12, 16])
    ap.add_argument("--views", type=int, default=1, choices=[1, 2, 3, 4],
                    help="input views coded into each transmission (JSCCCodec views)")
    ap.add_argument("--constellation", default="analog",
                    choices=["analog", "qam16", "psk16", "learned16"])
    ap.add_argument("--init", default="cifar10-task_p2",
                    help="codec to start from: a shipped name or a checkpoint path ('' none)")
    ap.add_argument("--init-rate", type=int, default=4, help="rate point of a task codec init")
    ap.add_argument("--snr-min", type=float, default=-5.0)
    ap.add_argument("--snr-max", type=float, default=20.0)
    ap.add_argument("--channels", default='{"awgn": 0.5, "rayleigh": 0.3, "ofdm-tdla": 0.2}')
    ap.add_argument("--kd", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=1500, help="training time budget")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stem-lr", type=float, default=2e-4)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps (smoke tests)")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule-snrs", type=float, nargs="+",
                    default=[-5.0, 0.0, 5.0, 10.0, 15.0, 20.0])
    ap.add_argument("--schedule-n", type=int, default=1000)
    ap.add_argument("--tolerance", type=float, default=0.5, help="points (schedule)")
    ap.add_argument("--no-zoo", action="store_true", help="write to runs/ instead of the zoo")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fam = load_pretrained(args.family)
    train, test = load_dataset(args.family)
    head, tail = fam.split(3, args.point)
    shape = tuple(fam.feature_shape(args.point))
    kwargs = {"symbols": args.symbols, "hidden": args.hidden, "stem": [[args.stem, True]],
              "constellation": args.constellation, "levels": args.levels,
              **({"views": args.views} if args.views > 1 else {})}  # fmt: skip
    codec = build_codec("jscc", shape, **kwargs)
    init_note = None
    if args.init:
        src = load_pretrained_codec(args.init) if "/" not in args.init else load_codec(args.init)
        copied = codec.load_task_codec(src)
        if src.name == "task":
            _rescale_from_task(codec, src, head, train, args.init_rate)
        init_note = f"{args.init}: {len(copied)} tensors"
        print(f"warm start from {init_note}")
    cfg = JSCCTrainConfig(snr_range=(args.snr_min, args.snr_max),
                          channels=json.loads(args.channels), kd=args.kd, beta=args.beta,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          stem_lr=args.stem_lr, bf16=not args.no_bf16, seed=args.seed,
                          time_budget=args.seconds, eval_n=500,
                          max_steps=args.max_steps)  # fmt: skip
    val = test.subset(1000, seed=123)
    prefix = f"runs/{args.out}"
    res = train_jscc(codec, fam, 3, args.point, train, val, cfg, checkpoint=prefix)
    codec.to("cpu")
    round_half(codec).eval()
    sched_data = test.subset(min(args.schedule_n, len(test)), seed=7)
    table = {}
    for n in sorted(set(args.levels) | {args.symbols}):
        table[n] = eval_jscc(codec, head, tail, sched_data, args.schedule_snrs, uses=n,
                             seed=args.seed)  # fmt: skip
    schedule = []
    for i, s in enumerate(args.schedule_snrs):
        best = table[args.symbols][i]["accuracy"]
        ok = [n for n in sorted(table) if table[n][i]["accuracy"] >= best - args.tolerance / 100]
        schedule.append([s, ok[0]])
        print(f"{s:g} dB: " + " ".join(f"{n}:{100 * table[n][i]['accuracy']:.1f}%"
                                         for n in sorted(table)) + f" -> {ok[0]} uses")
    schedule[0][0] = -1e9  # the lowest entry serves every SNR below it too
    kwargs["schedule"] = schedule
    final = build_codec("jscc", shape, **kwargs)
    final.load_state_dict(codec.state_dict())
    extra = {"train": {**asdict(cfg), "threads": args.threads, "seconds": round(res.seconds, 1),
                       "epochs": res.epochs, "steps": res.steps, "init": init_note,
                       "history": res.history},
             "schedule_measured": {str(n): t for n, t in table.items()},
             "encoder_flops": final.encoder_flops(), "point": args.point, "member": 3}
    dest = f"runs/{args.out}" if args.no_zoo else CODEC_ZOO / args.out
    path = save_codec(final, dest, kwargs, extra)
    print(f"saved {path} after {res.seconds:.0f} s, {res.epochs} epochs, {res.steps} steps; "
          f"schedule {schedule}")
    return 0


def _rescale_from_task(codec, task, head, train, rate: int) -> None:
    """Fold the task codec's latent scale into the decoder's first layer: the task decoder
    saw ``y * exp(gain + inv_gain)``, the JSCC decoder sees ``y * sqrt(k) / ||y||``."""
    import torch

    from flowcodec.codecs.train import collect_features

    with torch.no_grad():
        h = collect_features(head, train, n=1000)
        y = task.g_a(h).float()
        scale = (y.norm(dim=1) / (codec.symbols ** 0.5)).mean()
        g = (task.gain[rate] + task.inv_gain[rate]).exp()
        w = codec.g_s.mlp[0].weight
        w.mul_(g[None, :] * scale)
    print(f"decoder input rescaled by {float(scale):.3f} (latent rms per symbol)")


if __name__ == "__main__":
    raise SystemExit(main())
