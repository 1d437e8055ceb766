"""Save a trained family under another registered name that builds the same network.

    python -m experiments.rename_family runs/cloud/cifar10-air4-family cifar10-cloud \
        flowcodec/zoo/cifar10-cloud-family

``train-family --family cifar10 --grow air`` and ``train-family --family cifar10-cloud`` run
the same training (same recipe, seed and source family); the first saves the result under
the config ``cifar10(cloud="air")``, the second under ``cifar10-cloud``. This copies a
checkpoint from one name to the other: the weights are copied unchanged (float16 stays
float16), every member's output is checked to be bit-identical on random inputs before
saving, and the saved record (measured accuracies, history, hardware) is kept with a note
of where it came from.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from flowcodec.family import build_family, load_family
    from flowcodec.family.checkpoint import read_config, save_checkpoint
    from flowcodec.family.pretrained import RECIPES

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="checkpoint path without suffix")
    ap.add_argument("name", help="the registered family name to save it under")
    ap.add_argument("out", help="where to write it (path without suffix)")
    args = ap.parse_args(argv)
    record = read_config(args.source)
    src = load_family(args.source).eval()
    fam = build_family(args.name, **RECIPES.get(args.name, {}).get("family", {})).eval()
    fam.load_state_dict(src.state_dict())
    x = torch.randn(8, *src.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(src(x), fam(x), strict=True):
            if not torch.equal(a, b):
                raise SystemExit(f"{args.name} does not compute what {args.source} does")
    extra = dict(record.get("extra", {}))
    extra["renamed_from"] = {"path": str(args.source), "config": record["config"]}
    half = extra.get("stored_as") == "float16"
    path = save_checkpoint(fam, args.out, "family", fam.config, extra, half=half)
    print(f"saved {path} as {fam.config} ({'float16' if half else 'float32'} weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
