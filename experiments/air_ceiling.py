"""What one view reaches on this copy of CIFAR-10 with airbench's own network and recipe.

Issue 26 asks for a cloud member at 94 % (one view). airbench's network (Keller Jordan,
KellerJordan/cifar10-airbench: block widths 64/256/256, about 2 M parameters) is published at
about 93.2 % with one view after about 10 epochs on the original CIFAR-10 arrays. This script
trains that network alone (no exits, no family), with the project's implementation of the
recipe (:func:`flowcodec.family.air.train_air`), on the data the project ships (JPEG, quality
about 75), and prints the one-view test accuracy after every epoch: the ceiling the recipe gives
here at this length, against which the family routes of docs/family.md are read.

    FLOWCODEC_DATA=../shared/data python -m experiments.air_ceiling --epochs 10 \
        --out runs/ceiling/air94

Writes ``<out>.json`` (per-epoch history, final accuracy float32 and its standard error,
seconds, hardware) and ``<out>.safetensors`` (the weights, float32).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from flowcodec.data import load_dataset
from flowcodec.family.air import AirConfig, ConvGroup, _head, train_air
from flowcodec.family.base import EarlyExitFamily
from flowcodec.flops import count_flops


def airbench_net(widths=(64, 256, 256), classes: int = 10) -> EarlyExitFamily:
    """airbench's network as a one-member family: whitening conv 3 -> 24 (2 x 2, frozen),
    GELU, three conv groups (31 -> 15 -> 7 -> 3 pixels), global max pool, linear, x 1/9."""
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    trunk = nn.Sequential(whiten, nn.GELU(), ConvGroup(24, widths[0]),
                          ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]))
    return EarlyExitFamily([trunk], [nn.Sequential(*_head(widths[2], classes))], (3, 32, 32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256])
    p.add_argument("--lr", type=float, default=11.5, help="per 1,024 examples (airbench: 11.5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="data root (default: FLOWCODEC_DATA)")
    p.add_argument("--out", default="runs/ceiling/air94")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test = load_dataset("cifar10", root=a.data)
    net = airbench_net(tuple(a.widths))
    flops = count_flops(net.member(1), (3, 32, 32))
    params = sum(q.numel() for q in net.parameters())
    print(f"airbench net {a.widths}: {params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOPs")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = AirConfig(epochs=a.epochs, lr=a.lr, exit_weights=[1.0], seed=a.seed)
    t0 = time.perf_counter()
    res = train_air(net, train, test, cfg, checkpoint=str(out), resume=a.resume)
    acc = float(res.accuracies[0])
    se = math.sqrt(acc * (1 - acc) / len(test.labels))
    rec = {"widths": a.widths, "epochs": a.epochs, "lr": a.lr, "seed": a.seed,
           "params": params, "mflops": round(flops / 1e6, 1), "test_accuracy": acc,
           "standard_error": se, "test_images": len(test.labels),
           "seconds": round(time.perf_counter() - t0, 1), "hardware": "CPU",
           "history": res.history}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(rec, indent=1, default=str))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(out.with_suffix(".safetensors")))
    print(f"one view, {len(test.labels)} test images: {100 * acc:.2f} % "
          f"(standard error {100 * se:.2f}); {rec['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
