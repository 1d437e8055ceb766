"""Exact speculative decoding on validation prompts: greedy output against edge-only.

    FLOWCODEC_DATA=../shared/data python -m experiments.lm_speculative_check \
        --weights runs/lm/shakespeare-char-family --prompts 20 --new 64 --gamma 4

For each of ``--prompts`` validation prompts (64 characters, evenly spaced over the
validation text), generates ``--new`` greedy tokens edge-only (member 3) and with exact
speculative decoding (member 1 drafts ``--gamma``, member 3 verifies), and prints whether the
outputs are identical, the tokens per verification pass, the edge's passes against
edge-only's, bytes each way and the smallest top-two logit gap the edge decided on. A prompt
whose outputs differ is rerun in float64 (a near-tie rounded differently by the batched
verification pass, see docs/language.md). Writes the rows as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    import torch

    from flowcodec.lm import speculative as sp
    from flowcodec.lm.data import CharVocab, load_shakespeare, validation_prompts
    from flowcodec.lm.train import load_lm

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="family stem (default: the shipped one)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowcodec.lm.cli import _weights

    fam = load_lm(_weights(args.weights)).float().eval()
    _, val, _ = load_shakespeare(None, CharVocab(fam.chars))
    rows = []
    for i, (_, prompt) in enumerate(validation_prompts(val, args.prompts, args.prompt_len)):
        edge = sp.generate_edge(fam, prompt, args.new)
        spec = sp.generate_speculative(fam, prompt, args.new, gamma=args.gamma)
        same = edge.tokens == spec.tokens
        row = {"prompt": i, "identical": same, "edge_passes_edge_only": edge.edge_passes,
               "edge_passes_speculative": spec.edge_passes,
               "tokens_per_edge_pass": spec.tokens_per_edge_pass,
               "bytes_up": spec.total_up, "bytes_down": spec.total_down,
               "edge_only_bytes_up": edge.total_up, "edge_only_bytes_down": edge.total_down,
               "min_margin": spec.min_margin}  # fmt: skip
        if not same:
            f64 = fam.double()
            row["identical_float64"] = (sp.generate_edge(f64, prompt, args.new).tokens
                                        == sp.generate_speculative(f64, prompt, args.new,
                                                                   gamma=args.gamma).tokens)
            fam = fam.float()
        rows.append(row)
        print(json.dumps(row))
    tpp = sum(r["tokens_per_edge_pass"] for r in rows) / len(rows)
    summary = {"prompts": len(rows), "identical": sum(r["identical"] for r in rows),
               "identical_after_float64": sum(r.get("identical_float64", r["identical"])
                                              for r in rows),
               "mean_tokens_per_edge_pass": tpp,
               "edge_passes": sum(r["edge_passes_speculative"] for r in rows),
               "edge_passes_edge_only": sum(r["edge_passes_edge_only"] for r in rows),
               "gamma": args.gamma, "new_tokens": args.new}  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
