"""Joint training of every exit of a family, and evaluation.

The loss is a weighted sum of the exits' cross-entropies, so the shared trunk learns
features that every member can finish from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily

__all__ = ["TrainConfig", "TrainResult", "train_family", "evaluate_family", "accuracy"]


@dataclass
class TrainConfig:
    """How to train a family. ``exit_weights`` defaults to equal weights."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (Nesterov, one-cycle) or "adamw"
    label_smoothing: float = 0.0
    exit_weights: list[float] | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")


@dataclass
class TrainResult:
    """Test accuracy of each member after training, and the wall time it took."""

    accuracies: list[float]
    seconds: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_family(
    family: EarlyExitFamily, data: ArrayDataset, batch_size: int = 1000, device: str = "cpu"
) -> list[float]:
    """Top-1 accuracy of every member (exit) on ``data``."""
    was = family.training
    family.eval()
    correct = torch.zeros(family.num_members)
    for x, y in data.batches(batch_size, device=device):
        for i, logits in enumerate(family(x)):
            correct[i] += (logits.argmax(1) == y).sum().item()
    family.train(was)
    return (correct / len(data)).tolist()


@torch.no_grad()
def accuracy(model: nn.Module, data: ArrayDataset, batch_size: int = 1000, device="cpu") -> float:
    """Top-1 accuracy of a module mapping inputs to logits."""
    was = model.training
    model.eval()
    correct = 0
    for x, y in data.batches(batch_size, device=device):
        correct += (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return correct / len(data)


def train_family(
    family: EarlyExitFamily,
    train: ArrayDataset,
    test: ArrayDataset | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train all exits jointly; returns test accuracy per member (if ``test`` is given)."""
    from flowcodec.progress import tqdm

    cfg = config or TrainConfig()
    weights = cfg.exit_weights or [1.0] * family.num_members
    if len(weights) != family.num_members:
        raise ConfigError(f"exit_weights needs {family.num_members} values, got {len(weights)}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    family.to(dev).train()
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    decay, no_decay = [], []
    for p in family.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25, anneal_strategy="linear"
    )
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    use_amp = dev.type == "cuda"
    wsum = sum(weights)
    history = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="train family", disable=not cfg.progress, leave=False)
    for epoch in range(cfg.epochs):
        run_loss, seen = 0.0, 0
        for x, y in train.batches(cfg.batch_size, shuffle=True, train=True, generator=gen,
                                  device=dev):  # fmt: skip
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                outs = family(x)
                loss = sum(w * crit(o.float(), y) for w, o in zip(weights, outs)) / wsum
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
        rec = {"epoch": epoch + 1, "loss": run_loss / seen}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    accs = evaluate_family(family, test, device=dev) if test is not None else []
    family.eval()
    return TrainResult(accs, seconds, history)
