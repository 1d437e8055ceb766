"""The pieces every trainer in flowcodec shares (a ground module: torch only).

- :class:`Frozen`: modules put in eval mode with ``requires_grad`` off, and put back exactly
  as they were (every submodule's mode, every parameter's flag) when the training ends,
  whether it returned or raised: the user's model stays the user's.
- :func:`kd_loss`: Hinton's distillation term.
- :func:`lr_at`: the learning rate of a linear warm-up followed by a cosine decay.

Example
-------
>>> import torch
>>> from flowcodec.training import Frozen
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
>>> with Frozen(net):
...     net.training, net[0].weight.requires_grad
(False, False)
>>> net.training, net[0].weight.requires_grad
(True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Frozen", "kd_loss", "lr_at"]


class Frozen:
    """``modules`` in eval mode with gradients off until :meth:`restore` (or the end of a
    ``with`` block), which restores each submodule's mode and each parameter's flag."""

    def __init__(self, *modules: nn.Module) -> None:
        self._saved = [([(m, m.training) for m in mod.modules()],
                        [(p, p.requires_grad) for p in mod.parameters()])
                       for mod in modules]  # fmt: skip
        for mod in modules:
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)

    def restore(self) -> None:
        for modes, flags in self._saved:
            for m, training in modes:
                m.training = training
            for p, flag in flags:
                p.requires_grad_(flag)

    def __enter__(self) -> Frozen:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def kd_loss(logits: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Hinton's distillation term: ``t^2 * KL(softmax(teacher/t) || softmax(logits/t))``."""
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t  # fmt: skip


def lr_at(step: int, total: int, lr: float, warmup: int, floor: float = 0.02) -> float:
    """``lr`` ramped up linearly over ``warmup`` steps, then a cosine decay to ``floor * lr``
    at step ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
