"""Store a trained ViT family in the zoo as float16, with its accuracy measured after rounding.

``flowcodec train-family --family cifar10-vit --out runs/vit/cifar10-vit-family`` writes
float32 weights (4 MB); the zoo keeps float16 (2 MB). This rounds the weights, evaluates
every member on the full test set, and writes ``flowcodec/zoo/cifar10-vit-family.*`` with
both accuracies (``test_accuracy`` after rounding, ``float32_test_accuracy`` before) and
the training record of the source checkpoint.

    FLOWCODEC_DATA=../shared/data python -m experiments.finalize_vit_family \\
        runs/vit/cifar10-vit-family
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="the float32 family checkpoint (path without suffix)")
    ap.add_argument("--out", default=None, help="default: the zoo's cifar10-vit-family")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from flowcodec.data import load_dataset
    from flowcodec.family import evaluate_family, load_family, save_family
    from flowcodec.family.checkpoint import read_config
    from flowcodec.family.pretrained import ZOO_DIR

    torch.set_num_threads(args.threads)
    rec = read_config(args.source)
    fam = load_family(args.source).eval()
    _, test = load_dataset("cifar10")
    before = evaluate_family(fam, test)
    with torch.no_grad():
        for t in fam.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    after = evaluate_family(fam, test)
    extra = {k: v for k, v in rec.get("extra", {}).items()
             if k not in ("members", "test_accuracy", "stored_as")}  # fmt: skip
    out = args.out or str(ZOO_DIR / f"{rec['config']['name']}-family")
    path = save_family(fam, out, None, half=True, test_accuracy=after,
                       float32_test_accuracy=before, **extra)  # fmt: skip
    back = evaluate_family(load_family(out).eval(), test)
    if back != after:
        print(f"reloaded accuracies {back} differ from {after}", file=sys.stderr)
        return 1
    for k, (a, b) in enumerate(zip(before, after), 1):
        print(f"member {k}: {100 * a:.2f} % (float32) -> {100 * b:.2f} % (float16 weights)")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
