"""Aligners: let a model that is not a family member feed a larger one.

A small model trained on its own has hidden features that mean nothing to a larger
model. An :class:`Aligner` maps the small model's features at a chosen layer into the
larger model's hidden space at a chosen layer. It is trained with both models frozen, by
feature distillation (MSE to the larger model's own features on the same input) plus
the task loss of the larger model's tail fed through the aligner.

Example
-------
>>> import torch
>>> from flowcodec.family.aligner import Aligner
>>> a = Aligner((8, 8, 8), (32, 4, 4))
>>> tuple(a(torch.randn(2, 8, 8, 8)).shape)
(2, 32, 4, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.training import EpochLoop, Frozen

__all__ = ["Aligner", "AlignResult", "train_aligner"]


class Aligner(nn.Module):
    """Map features ``(B, *in_shape)`` to ``(B, *out_shape)`` (both ``(C, H, W)``).

    3x3 conv-BN-ReLU at the input resolution, resampling to the output resolution
    (adaptive average pooling down, nearest up), then a 1x1 conv to the output width.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int],
                 hidden: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise ConfigError("Aligner needs (C, H, W) shapes for input and output")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        hid = hidden or max(in_shape[0], out_shape[0])
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], hid, 3, padding=1, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(hid, out_shape[0], 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[1:]) != self.in_shape:
            raise ConfigError(f"Aligner expects (B, {self.in_shape}), got {tuple(h.shape)}")
        z = self.body(h)
        size = self.out_shape[1:]
        if z.shape[-2:] != size:
            if z.shape[-2] >= size[0]:
                z = nn.functional.adaptive_avg_pool2d(z, size)
            else:
                z = nn.functional.interpolate(z, size=size, mode="nearest")
        return self.out(z)


@dataclass
class AlignResult:
    """Accuracy of the larger model on its own and fed through the aligner."""

    large_alone: float
    through_aligner: float
    small_alone: float | None = None


def train_aligner(
    aligner: Aligner,
    small_head: nn.Module,
    large_head: nn.Module,
    large_tail: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    epochs: int = 10,
    lr: float = 2e-3,
    distill_weight: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> AlignResult:
    """Train ``aligner`` so that ``large_tail(aligner(small_head(x)))`` solves the task.

    ``small_head``, ``large_head`` and ``large_tail`` stay frozen (eval mode) and are given
    back as they were (modes and ``requires_grad``). The loss is
    ``CE(large_tail(a), y) + distill_weight * MSE(a, large_head(x))``.
    """
    from flowcodec.family.train import accuracy

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    frozen = Frozen(*(m.to(device) for m in (small_head, large_head, large_tail)))
    try:
        aligner.to(device).train()
        opt = torch.optim.Adam(aligner.parameters(), lr=lr)
        loop = EpochLoop(-(-len(train) // batch_size), epochs, desc="train aligner",
                         progress=progress)  # fmt: skip
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, loop.total)
        ce = nn.CrossEntropyLoss()
        for _ in loop.epochs():
            batches = train.batches(batch_size, shuffle=True, train=True, generator=gen,
                                    device=device)  # fmt: skip
            for x, y in loop.steps(batches):
                with torch.no_grad():
                    hs, hl = small_head(x), large_head(x)
                a = aligner(hs)
                loss = ce(large_tail(a), y) + distill_weight * nn.functional.mse_loss(a, hl)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loop.add(len(y), loss=loss)
            loop.commit(loop.record())
        loop.close()
        aligner.eval()
        fed = nn.Sequential(small_head, aligner, large_tail)
        alone = nn.Sequential(large_head, large_tail)
        return AlignResult(accuracy(alone, test, device=device), accuracy(fed, test, device=device))
    finally:
        frozen.restore()



def standalone_digits_model(classes: int = 10) -> nn.Sequential:
    """A small digits CNN that is not a family member (for the aligner experiment).

    Its first two blocks give features ``(16, 4, 4)``; the rest is its own classifier.
    """
    from flowcodec.family.zoo import conv_bn

    return nn.Sequential(
        conv_bn(1, 8), conv_bn(8, 16, pool=True),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


def align_digits(family, point: int = 2, epochs: int = 15, seed: int = 0,
                 progress: bool = True) -> AlignResult:  # fmt: skip
    """Train a standalone small digits model, then an aligner from its 2-block features
    into ``family`` member ``family.receiver(point)`` (the largest member through ``point``:
    the last, ``K``, in a chain) at split ``point``; report the three accuracies."""
    from flowcodec.data import load_digits
    from flowcodec.family.base import EarlyExitFamily
    from flowcodec.family.train import TrainConfig, accuracy, train_family

    train, test = load_digits()
    torch.manual_seed(seed)
    small = standalone_digits_model()
    # Train the standalone model on its own (it is a one-member "family" for the trainer).
    solo = EarlyExitFamily([small[:2]], [small[2:]], (1, 8, 8))
    train_family(solo, train, None, TrainConfig(epochs=30, batch_size=64, lr=3e-3,
                 weight_decay=1e-4, optimizer="adamw", seed=seed, progress=progress))  # fmt: skip
    small_acc = accuracy(small, test)
    k = family.receiver(point)  # the largest member through point (the last, in a chain)
    large_head, large_tail = family.split(k, point)
    aligner = Aligner((16, 4, 4), family.feature_shape(point))
    res = train_aligner(aligner, small[:2], large_head, large_tail, train, test, epochs=epochs,
                        seed=seed, progress=progress)  # fmt: skip
    res.small_alone = small_acc
    return res
