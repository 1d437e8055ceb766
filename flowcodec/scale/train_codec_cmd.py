"""``flowcodec train-codec``: train one learned codec at a split point of a trained family.

The command form of :func:`flowcodec.codecs.train.train_codec`. It runs as a plain command
or under ``torchrun --nproc-per-node N``: every rank trains on its share of each global
batch with DistributedDataParallel (gloo on CPU, NCCL on GPU), and rank 0 writes the codec
checkpoint (safetensors + JSON, loadable with ``load_codec``) and prints the result.

    flowcodec train-codec --family digits --point 1 --codec factorized \\
        --kwargs '{"latent": 8, "hidden": 32}' --lam 1.0 --epochs 10 --out runs/codec
    torchrun --standalone --nproc-per-node 2 -m flowcodec.cli train-codec ... --threads 1

Rank 0 writes the training state after every epoch to ``OUT.state.safetensors`` and
``OUT.state.json`` (codec weights, optimizer tensors, generator states, epoch, history:
:func:`flowcodec.scale.ddp.save_state`). ``--resume`` continues after the last completed
epoch and ends where the uninterrupted run would have; the state files are removed once
the codec is saved. ``torchrun --max-restarts 3 ... train-codec --resume`` restarts a job
whose rank died from its last epoch by itself.
"""

from __future__ import annotations

import json
import sys

__all__ = ["add_parser"]


def _cmd(args) -> int:
    import torch

    from flowcodec.codecs.train import evaluate_codec, train_codec
    from flowcodec.codecs.zoo import save_codec
    from flowcodec.data import load_dataset
    from flowcodec.errors import ConfigError
    from flowcodec.family import load_pretrained
    from flowcodec.family.pretrained import family_dataset
    from flowcodec.scale.ddp import PeerLost, from_env, lost_message, state_paths
    from flowcodec.sweeps import codec_from_spec

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--kwargs is not a JSON object: {e}") from e
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    dist = from_env(args.device)
    device = dist.device(args.device)
    if not device.startswith("cuda"):
        torch.set_num_threads(max(1, args.threads))
    resumed = _saved_epoch(args.out) if args.resume else None
    try:
        fam = load_pretrained(args.family, progress=False)
        member = args.member or fam.receiver(args.point)
        train, test = load_dataset(family_dataset(args.family))
        torch.manual_seed(args.seed)
        codec = codec_from_spec({"codec": args.codec, "kwargs": kwargs}, fam, args.point)
        res = train_codec(codec, fam, member, args.point, train, None, lam=args.lam,
                          beta=args.beta, epochs=args.epochs, device=device,
                          drop_prob=args.drop_prob, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, progress=not args.no_progress and dist.is_main,
                          dist=dist, checkpoint=args.out, resume=args.resume)  # fmt: skip
    except (PeerLost, RuntimeError) as e:
        if not isinstance(e, PeerLost):
            if not dist.active:
                raise
            e = PeerLost(lost_message(dist, e))  # a collective failed: a rank stopped
        print(f"flowcodec train-codec: error: {e}", file=sys.stderr)
        return 3
    finally:
        dist.close()
    if not dist.is_main:
        return 0
    codec.to("cpu").update(force=True)
    head, tail = fam.to("cpu").split(member, args.point)
    ev = evaluate_codec(codec, head, tail, test)
    extra = {"family": args.family, "member": member, "point": args.point, "lam": args.lam,
             "epochs": res.epochs, "seed": args.seed, "ranks": dist.world,
             "test_accuracy": ev.accuracy, "bytes_per_image": ev.bytes_per_image,
             "history": res.history, "train_seconds": round(res.seconds, 1)}  # fmt: skip
    if resumed:
        extra["resumed_from_epoch"] = resumed
    path = save_codec(codec, args.out, kwargs, extra=extra, half=False)
    for f in state_paths(args.out):  # finished: nothing left to resume
        f.unlink(missing_ok=True)
    print(f"{args.codec} at point {args.point}: {100 * ev.accuracy:.2f}% at "
          f"{ev.bytes_per_image:.1f} B/image (measured), trained in {res.seconds:.1f} s on "
          f"{dist.world} process(es); saved {path}")  # fmt: skip
    return 0


def _saved_epoch(out) -> int | None:
    """The last completed epoch of the training state at ``out`` (None: no state)."""
    from flowcodec.errors import CheckpointError
    from flowcodec.scale.ddp import state_paths

    meta = state_paths(out)[1]
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta}: not a training state ({e})") from e


def add_parser(sub) -> None:
    """Add ``train-codec`` to the ``flowcodec`` command's subparsers."""
    from flowcodec.config import positive_int
    from flowcodec.family.pretrained import image_families
    from flowcodec.sweeps import add_common_arguments

    p = sub.add_parser(
        "train-codec", help="train a learned codec at a split point of a trained family "
        "(runs under torchrun with DDP too)",
        description="Train one learned codec for the task at a split point of a trained "
        "family (the family is frozen), measure its accuracy and real bytes on the test set, "
        "and save it (safetensors + JSON). Under `torchrun --nproc-per-node N` every rank "
        "trains on its share of each batch with DistributedDataParallel; rank 0 saves "
        "(docs/scale.md).")  # fmt: skip
    p.add_argument("--family", default="digits", choices=image_families(),
                   help="trained family (default digits)")
    p.add_argument("--member", type=positive_int, default=None,
                   help="receiver member (default: the largest)")
    p.add_argument("--point", type=positive_int, default=1, help="split point (default 1)")
    p.add_argument("--codec", default="factorized", help="registered codec (default factorized)")
    p.add_argument("--kwargs", default="{}", help="codec arguments as a JSON object")
    p.add_argument("--lam", type=float, default=1.0, help="rate weight per kbit (default 1.0)")
    p.add_argument("--beta", type=float, default=1.0, help="feature-distillation weight")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="global batch (64)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument("--drop-prob", type=float, default=0.0, help="packet drop during training")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", required=True, help="checkpoint path without suffix")
    add_common_arguments(p)  # --threads (default 2), --no-progress
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state OUT.state.* written after the "
                        "last completed epoch (after a killed run or rank)")  # fmt: skip
    p.set_defaults(func=_cmd)
