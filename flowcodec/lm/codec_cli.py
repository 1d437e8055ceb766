"""``flowcodec lm codec train|eval`` (also ``python -m flowcodec.lm.codec ...``): train a
hidden-state codec and measure its curve."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from flowcodec.lm.cli import _weights, run_parsed
from flowcodec.lm.codec import load_hidden_codec, save_hidden_codec
from flowcodec.lm.codec_train import (
    HiddenCodecTrainConfig,
    evaluate_hidden_codec,
    train_hidden_codec,  # fmt: skip
    write_curve,
)

__all__ = ["add_codec_commands", "main", "cmd_train", "cmd_eval"]


# --- commands ----------------------------------------------------------------------------------
def _load_family(weights: str | None):
    from flowcodec.lm.train import load_lm

    return load_lm(_weights(weights)).float().eval()


def cmd_train(args) -> int:
    from flowcodec.lm.data import CharVocab, load_shakespeare

    fam = _load_family(args.weights)
    train, val, _ = load_shakespeare(args.data, CharVocab(fam.chars))
    cfg = HiddenCodecTrainConfig(lams=tuple(args.lams), latent=args.latent, hidden=args.hidden,
                                 condition=not args.no_condition, steps=args.steps,
                                 batch_size=args.batch, lr=args.lr, seconds=args.seconds,
                                 seed=args.seed, kd=args.kd, ce=args.ce, mse=args.mse,
                                 eval_every=args.eval_every, progress=not args.quiet)  # fmt: skip
    codec, res = train_hidden_codec(fam, args.point, args.member, train, val, cfg,
                                    checkpoint=f"{args.out}-run", resume=args.resume)  # fmt: skip
    src = Path(_weights(args.weights))
    sha = json.loads(src.with_suffix(".json").read_text()).get("sha256") \
        if src.with_suffix(".json").is_file() else None  # fmt: skip
    extra = {"family": str(src), "family_sha256": sha, "point": args.point,
             "member": args.member or fam.num_members, "train": asdict(cfg),
             "train_steps": res.steps, "train_seconds": round(res.seconds, 1),
             "history": res.history}  # fmt: skip
    path = save_hidden_codec(codec, args.out, extra)
    print(f"{res.steps} steps in {res.seconds:.0f} s; saved {path}")
    if res.history and "eval" in res.history[-1]:
        for e in res.history[-1]["eval"]:
            print(f"rate {e['rate']}: {e['est_bits_per_token']:.1f} bits/token (estimate), "
                  f"loss {e['loss']:.4f} (+{e['increase']:.4f}) on {cfg.eval_windows} windows")
    return 0


def cmd_eval(args) -> int:
    from flowcodec.lm.data import CharVocab, load_shakespeare

    fam = _load_family(args.weights)
    codec = load_hidden_codec(args.codec)
    _, val, _ = load_shakespeare(args.data, CharVocab(fam.chars))
    res = evaluate_hidden_codec(fam, codec, val, member=args.member, max_windows=args.windows,
                                progress=not args.quiet)  # fmt: skip
    res["codec"] = str(args.codec)
    jp, cp = write_curve(res, args.out or f"{args.codec}-curve")
    print(f"member {res['member']} at split point {res['point']}, {res['windows']} windows "
          f"({res['tokens']} tokens); loss without the codec {res['loss_without_codec']:.4f}")
    print("rate  bits/token  session  payload  estimate  loss     increase  top-1 agree")
    for r in res["rows"]:
        print(f"{r['rate']:>4}  {r['bits_per_token']:>10.2f}  {r['session_bits_per_token']:>7.2f}"
              f"  {r['payload_bits_per_token']:>7.2f}  {r['est_bits_per_token']:>8.2f}  "
              f"{r['loss']:.4f}  {r['loss_increase']:>+8.4f}  {r['top1_agreement']:>11.4f}")
    ex = res["device_exit"]
    print(f"the device's own exit {ex['member']}: loss {ex['loss']:.4f} "
          f"(+{ex['loss'] - res['loss_without_codec']:.4f}), top-1 agree "
          f"{ex['top1_agreement']:.4f}")
    print(f"text: {res['text_bits_per_char']:.0f} bits/char (zlib -9 over the whole validation "
          f"text: {res['text_zlib_bits_per_char']:.2f})")
    fl = res["flops_per_token"]
    print(f"FLOPs/token: the edge skips {fl['shared_blocks_skipped_by_edge']:,} (shared blocks), "
          f"adds {fl['codec_decoder_edge']:,} (decoder); the device adds "
          f"{fl['codec_encoder_device']:,} (encoder)")
    print(f"wrote {jp} and {cp}")
    return 0


def add_codec_commands(sub) -> argparse.ArgumentParser:
    """Add ``codec train`` and ``codec eval`` to an argparse subparsers object (the
    ``flowcodec lm`` parser's); returns the ``codec`` parser."""
    c = sub.add_parser("codec", help="the hidden-state codec: train, eval", allow_abbrev=False)
    cs = c.add_subparsers(dest="codec_cmd", required=True)
    t = cs.add_parser("train", help="train a hidden-state codec and save it",
                      allow_abbrev=False)  # fmt: skip
    t.add_argument("--weights", default=None,
                   help="a family saved by `flowcodec lm train` (default: the shipped one)")
    t.add_argument("--point", type=int, default=1, help="split point (1..member - 1)")
    t.add_argument("--member", type=int, default=None, help="the edge's member (default largest)")
    t.add_argument("--out", required=True, help="codec path stem (writes .safetensors, .json)")
    t.add_argument("--data", default=None, help="tinyshakespeare.txt or its folder")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seconds", type=float, default=None, help="wall-clock budget")
    t.add_argument("--batch", type=int, default=16, help="windows per step (all rate points)")
    t.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.003, 0.001, 0.0003],
                   help="rate weight per rate point (nats per bit per token), lowest rate first")
    t.add_argument("--latent", type=int, default=32)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--no-condition", action="store_true",
                   help="do not use the token ids as side information")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--kd", type=float, default=1.0)
    t.add_argument("--ce", type=float, default=0.0)
    t.add_argument("--mse", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT-run-state.*")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
    e = cs.add_parser("eval", help="the rate-loss curve of a codec (JSON + CSV)",
                      allow_abbrev=False)  # fmt: skip
    e.add_argument("--weights", default=None,
                   help="a family saved by `flowcodec lm train` (default: the shipped one)")
    e.add_argument("--codec", required=True, help="codec path stem (from `codec train`)")
    e.add_argument("--member", type=int, default=None)
    e.add_argument("--data", default=None)
    e.add_argument("--windows", type=int, default=None,
                   help="evenly spaced validation windows (default: the whole text)")
    e.add_argument("--out", default=None, help="curve path stem (default CODEC-curve)")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowcodec.lm.codec", allow_abbrev=False,
                                description="the hidden-state codec of the language family")
    add_codec_commands(p.add_subparsers(dest="cmd", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_parsed(p.parse_args(argv if argv[:1] == ["codec"] else ["codec", *argv]))


if __name__ == "__main__":
    sys.exit(main())
