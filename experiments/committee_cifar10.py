"""Receivers that answer together: several members of a family finishing the same features.

A branching family has more than one member past a split point (``cifar10-cloud``: members
3 and 4 both read split point 1). Each finishes the features alone, or they answer as a
committee: the mean of their class probabilities. This prints, on the full CIFAR-10 test
set with one view, each receiver's accuracy from ``--point`` and every committee's, and
optionally a network on the whole image (``--extra``, e.g. an ``airbench`` checkpoint) as
one more voter.

    FLOWCODEC_DATA=../shared/data python -m experiments.committee_cifar10 \\
        --family runs/cloud/cifar10-air4-family --point 1 --extra runs/ceiling/air94
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main(argv=None) -> int:
    from flowcodec.data import load_dataset
    from flowcodec.family import load_family

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, help="a saved family (checkpoint stem)")
    ap.add_argument("--point", type=int, default=1)
    ap.add_argument("--extra", default=None, help="a saved family whose largest member votes "
                                                  "from the whole image")  # fmt: skip
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    fam = load_family(a.family).eval()
    members = [k for k in range(1, fam.num_members + 1) if a.point in fam.path(k)]
    members = [k for k in members if k > a.point]  # members that finish features from there
    extra = load_family(a.extra).eval() if a.extra else None
    _, test = load_dataset("cifar10", root=a.data)
    probs: dict[str, list] = {f"member {k}": [] for k in members}
    if extra is not None:
        probs["whole-image net"] = []
    with torch.no_grad():
        for x, _ in test.batches(500):
            h = fam.features(x, a.point)
            for k in members:
                probs[f"member {k}"].append(fam.split(k, a.point)[1](h).softmax(1))
            if extra is not None:
                probs["whole-image net"].append(extra.member(extra.num_members)(x).softmax(1))
    p = {k: torch.cat(v) for k, v in probs.items()}
    y = test.labels
    print(f"{len(y)} test images, one view, receivers of split point {a.point}:")
    for n in range(1, len(p) + 1):
        for combo in itertools.combinations(p, n):
            acc = (torch.stack([p[c] for c in combo]).mean(0).argmax(1) == y).float().mean()
            print(f"  {' + '.join(combo):45s} {100 * float(acc):6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
