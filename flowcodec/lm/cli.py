"""Commands of the language family: ``python -m flowcodec.lm.cli train|generate|eval``.

``train`` trains the ``shakespeare-char`` family (resumable with ``--resume``, within
``--seconds``) and saves it as float16 safetensors plus JSON with the validation loss of
every member; ``generate`` runs one collaborative scheme on a prompt and prints the text
and its trace; ``eval`` prints the validation loss per member and the gating curve;
``sweep`` (:mod:`flowcodec.lm.sweep`) times every scheme over gamma, thresholds and link
settings and writes CSV, JSON, samples and plots.

Example
-------
>>> main(["train", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flowcodec.errors import CheckpointError, ConfigError, DataNotFoundError
from flowcodec.lm.data import CharVocab, load_shakespeare

__all__ = ["main", "build_parser"]


def _family_kwargs(args) -> dict:
    return dict(dim=args.dim, heads=args.heads, mlp_ratio=args.mlp_ratio,
                depths=list(args.depths), context=args.context, dropout=args.dropout)  # fmt: skip


def _weights(path: str | None) -> str:
    """``path``, or the shipped (or cached) family's stem; ConfigError when neither exists."""
    if path:
        return path
    from flowcodec.family.pretrained import pretrained_path

    shipped = pretrained_path("shakespeare-char")
    if not shipped.with_suffix(".safetensors").is_file():
        raise ConfigError("no trained shakespeare-char family is shipped or cached; train one "
                          "with `flowcodec lm train --out PATH` and pass --weights PATH")
    return str(shipped)


def cmd_train(args) -> int:
    from flowcodec.family import build_family
    from flowcodec.lm.train import LMTrainConfig, save_lm, train_lm

    train, val, vocab = load_shakespeare(args.data)
    torch.manual_seed(args.seed)
    fam = build_family("shakespeare-char", chars=vocab.chars, **_family_kwargs(args))
    cfg = LMTrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, min_lr=args.min_lr,
                        warmup=args.warmup, weight_decay=args.weight_decay,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                        seconds=args.seconds, seed=args.seed, device=args.device,
                        progress=not args.quiet)  # fmt: skip
    ckpt = args.checkpoint or f"{args.out}-run"
    res = train_lm(fam, train, val, cfg, checkpoint=ckpt, resume=args.resume)
    path = save_lm(fam, args.out, val, res)
    info = json.loads(Path(path).with_suffix(".json").read_text())["extra"]
    rows = zip(info["members"], info["val_loss_nats"], info["val_bits_per_char"], strict=True)
    print(f"{res.steps} steps in {res.seconds:.0f} s; saved {path}")
    print("member  params     MFLOPs/token  val nats/char  bits/char")
    for m, nats, bits in rows:
        print(f"{m['index']:>6}  {m['params']:>9,}  {m['flops'] / 1e6:>12.2f}  {nats:>13.4f}  "
              f"{bits:>9.4f}")  # fmt: skip
    return 0


def cmd_generate(args) -> int:
    from flowcodec.lm import speculative as sp
    from flowcodec.lm.train import load_lm

    fam = load_lm(_weights(args.weights))
    if args.float64:
        fam = fam.double()
    vocab = CharVocab(fam.chars)
    prompt = vocab.encode(args.prompt.replace("\\n", "\n")).tolist()
    common = dict(temperature=args.temperature, seed=args.seed)
    if args.scheme == "device":
        tr = sp.generate_device(fam, prompt, args.n, member=args.draft, **common)
    elif args.scheme == "edge":
        tr = sp.generate_edge(fam, prompt, args.n, member=args.target, **common)
    elif args.scheme == "speculative":
        tr = sp.generate_speculative(fam, prompt, args.n, draft=args.draft, target=args.target,
                                     gamma=args.gamma, **common)  # fmt: skip
    else:
        tr = sp.generate_gated(fam, prompt, args.n, draft=args.draft, target=args.target,
                               threshold=args.threshold, **common)  # fmt: skip
    print(vocab.decode(prompt) + vocab.decode(tr.tokens))
    print(json.dumps({"scheme": tr.scheme, "tokens": len(tr.tokens), "bytes_up": tr.total_up,
                      "bytes_down": tr.total_down, "round_trips": tr.round_trips,
                      "edge_passes": tr.edge_passes, "device_passes": tr.device_passes,
                      "edge_fraction": round(tr.edge_fraction, 4),
                      "tokens_per_edge_pass": round(tr.tokens_per_edge_pass, 3),
                      "min_margin": tr.min_margin}), file=sys.stderr)  # fmt: skip
    return 0


def cmd_eval(args) -> int:
    from flowcodec.lm.speculative import gated_loss, pass_times
    from flowcodec.lm.train import evaluate_lm, load_lm

    fam = load_lm(_weights(args.weights))
    _, val, _ = load_shakespeare(args.data, CharVocab(fam.chars))
    losses = evaluate_lm(fam, val)
    out = {"val_loss_nats": losses, "gated": []}
    for t in args.thresholds:
        out["gated"].append({"threshold": t, **gated_loss(fam, val, threshold=t)})
    big = fam.num_members
    out["pass_seconds"] = {"member_1": pass_times(fam, 1, (1,)),
                           f"member_{big}": pass_times(fam, big, (1, 2, 3, 5, 8))}  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcodec lm", allow_abbrev=False,
                                description="the shakespeare-char language family")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the family (resumable) and save it", allow_abbrev=False)
    t.add_argument("--out", required=True, help="weights path stem (writes .safetensors, .json)")
    t.add_argument("--data", default=None, help="tinyshakespeare.txt or its folder")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--checkpoint", default=None, help="training state stem (default OUT-run)")
    t.add_argument("--resume", action="store_true", help="continue from the training state")
    t.add_argument("--seconds", type=float, default=None, help="wall-clock budget")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--dim", type=int, default=192)
    t.add_argument("--heads", type=int, default=6)
    t.add_argument("--mlp-ratio", type=int, default=4)
    t.add_argument("--depths", type=int, nargs="+", default=[2, 2, 3])
    t.add_argument("--context", type=int, default=128)
    t.add_argument("--dropout", type=float, default=0.0)
    t.set_defaults(func=cmd_train)
    g = sub.add_parser("generate", help="generate with one scheme", allow_abbrev=False)
    g.add_argument("--weights", default=None,
                   help="a family saved by `train` (path stem; default: the shipped one)")
    g.add_argument("--prompt", default="ROMEO:\\n")
    g.add_argument("-n", type=int, default=100)
    g.add_argument("--scheme", choices=["device", "edge", "speculative", "gated"],
                   default="speculative")  # fmt: skip
    g.add_argument("--draft", type=int, default=1)
    g.add_argument("--target", type=int, default=None)
    g.add_argument("--gamma", type=int, default=4)
    g.add_argument("--threshold", type=float, default=0.5)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--float64", action="store_true", help="compute in float64")
    g.add_argument("--threads", type=int, default=None)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("eval", help="validation loss per member and gating", allow_abbrev=False)
    e.add_argument("--weights", default=None,
                   help="a family saved by `train` (path stem; default: the shipped one)")
    e.add_argument("--data", default=None)
    e.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.9])
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(func=cmd_eval)
    from flowcodec.lm import sweep_cli as sweep  # `flowcodec lm sweep`: options and command

    w = sub.add_parser("sweep", help="generate over gamma, thresholds and link settings: CSV, "
                       "JSON, samples and plots", allow_abbrev=False)  # fmt: skip
    sweep.add_arguments(w)
    w.set_defaults(func=sweep.command)
    from flowcodec.lm.codec_cli import add_codec_commands  # `flowcodec lm codec train|eval`

    add_codec_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args) -> int:
    """Run a parsed ``flowcodec lm ...`` command: its thread count, then its function; a
    ConfigError, CheckpointError or DataNotFoundError is printed as ``error: ...`` with exit
    status 2."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
