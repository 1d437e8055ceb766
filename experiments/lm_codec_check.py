"""Speculative decoding through the hidden-state codec on validation prompts: how often its
greedy output agrees with the large member's.

    FLOWCODEC_DATA=../shared/data python -m experiments.lm_codec_check \
        --codec runs/lm/hidden-codec --prompts 10 --new 64 --gamma 4

For each of ``--prompts`` validation prompts (``--prompt-len`` characters, evenly spaced over
the validation text) generates ``--new`` greedy tokens edge-only (the largest member) and,
for each rate point of the codec (``--rates``, default all), with
``generate_speculative_codec`` (member ``--draft`` drafts ``--gamma`` tokens and sends their
states at the codec's split point through the codec; the edge runs only the remaining
blocks). Reports per rate point: prompts whose output is identical to edge-only greedy, the
mean length of the agreeing prefix, the share of positions whose token agrees, tokens per
edge pass, and bytes per generated token up (ids + codec) and down, beside exact speculative
decoding's (ids only: its edge recomputes the shared blocks) and the draft member's own
greedy output (device only: the agreement a codec must beat). Writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json


def _agreement(outputs: list[list[int]], refs, new: int) -> dict:
    """Identical outputs, mean agreeing prefix and share of agreeing positions."""
    prefix = [next((j for j, (a, b) in enumerate(zip(o, r.tokens)) if a != b), new)
              for o, r in zip(outputs, refs)]  # fmt: skip
    same = sum(o == r.tokens for o, r in zip(outputs, refs))
    agree = sum(sum(a == b for a, b in zip(o, r.tokens)) for o, r in zip(outputs, refs))
    return {"identical": same, "mean_agreeing_prefix": sum(prefix) / len(outputs),
            "position_agreement": agree / (new * len(outputs))}


def main(argv=None) -> int:
    import torch

    from flowcodec.lm import speculative as sp
    from flowcodec.lm.codec import load_hidden_codec
    from flowcodec.lm.data import CharVocab, load_shakespeare, validation_prompts
    from flowcodec.lm.train import load_lm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="family stem (default: the shipped one)")
    ap.add_argument("--codec", required=True, help="codec stem (from `flowcodec lm codec train`)")
    ap.add_argument("--rates", type=int, nargs="*", default=None)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--draft", type=int, default=1)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowcodec.lm.cli import _weights

    fam = load_lm(_weights(args.weights)).float().eval()
    codec = load_hidden_codec(args.codec)
    rates = list(range(codec.rates)) if args.rates is None else args.rates
    _, val, _ = load_shakespeare(None, CharVocab(fam.chars))
    prompts = [ids for _, ids in validation_prompts(val, args.prompts, args.prompt_len)]
    refs = [sp.generate_edge(fam, p, args.new) for p in prompts]
    exact = [sp.generate_speculative(fam, p, args.new, draft=args.draft, gamma=args.gamma)
             for p in prompts]  # fmt: skip
    tokens = args.new * len(prompts)
    local = [sp.generate_device(fam, p, args.new, member=args.draft) for p in prompts]
    summary = {"prompts": len(prompts), "new_tokens": args.new, "gamma": args.gamma,
               "draft": args.draft, "point": codec.point,
               "exact": {"identical": sum(e.tokens == r.tokens for e, r in zip(exact, refs)),
                         "up_bytes_per_token": sum(e.total_up for e in exact) / tokens,
                         "down_bytes_per_token": sum(e.total_down for e in exact) / tokens,
                         "tokens_per_edge_pass": tokens / sum(e.edge_passes for e in exact)},
               "device_only": _agreement([t.tokens for t in local], refs, args.new),
               "rates": []}  # fmt: skip
    rows = []
    for r in rates:
        same = prefix = agree = up = codec_up = down = passes = 0
        for i, (p, ref) in enumerate(zip(prompts, refs)):
            tr = sp.generate_speculative_codec(fam, p, args.new, codec, draft=args.draft,
                                               gamma=args.gamma, rate=r)  # fmt: skip
            k = next((j for j, (a, b) in enumerate(zip(tr.tokens, ref.tokens)) if a != b),
                     args.new)  # fmt: skip
            pos = sum(a == b for a, b in zip(tr.tokens, ref.tokens))
            same += tr.tokens == ref.tokens
            prefix += k
            agree += pos
            up += tr.total_up
            codec_up += sum(x.codec_bytes for x in tr.rounds)
            down += tr.total_down
            passes += tr.edge_passes
            rows.append({"rate": r, "prompt": i, "identical": tr.tokens == ref.tokens,
                         "agreeing_prefix": k, "agreeing_positions": pos,
                         "bytes_up": tr.total_up, "bytes_down": tr.total_down,
                         "edge_passes": tr.edge_passes})  # fmt: skip
        row = {"rate": r, "identical": same, "mean_agreeing_prefix": prefix / len(prompts),
               "position_agreement": agree / tokens, "tokens_per_edge_pass": tokens / passes,
               "up_bytes_per_token": up / tokens, "codec_bytes_per_token": codec_up / tokens,
               "down_bytes_per_token": down / tokens}  # fmt: skip
        summary["rates"].append(row)
        print(json.dumps(row))
    print(json.dumps({k: v for k, v in summary.items() if k != "rates"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
