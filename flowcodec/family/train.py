"""Joint training of every exit of a family, and evaluation.

The loss is a weighted sum of the exits' cross-entropies, so the shared trunk learns
features that every member can finish from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.training import EpochLoop

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
    amp: bool | None = None  # bfloat16 autocast; None: on CUDA only (it also helps on CPUs)
    distill: float = 0.0  # weight of the teacher's soft targets (needs train_family(teacher=))
    temperature: float = 4.0  # softmax temperature of the distillation term

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if not 0.0 <= self.distill <= 1.0 or not self.temperature > 0:
            raise ConfigError("distill must be in [0, 1] and temperature positive")
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
    dist=None,
    checkpoint=None,
    resume: bool = False,
    on_epoch=None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train all exits jointly; returns test accuracy per member (if ``test`` is given).

    ``dist`` (a :class:`flowcodec.scale.ddp.Dist`, from ``from_env()`` under torchrun):
    this process trains its share of every global batch in DistributedDataParallel; rank 0
    draws the progress bar and writes the state. ``checkpoint`` (a path without suffix):
    the training state is written there after every epoch; with ``resume`` a saved state
    is loaded and training continues after its last epoch (docs/scale.md).
    ``on_epoch(record)`` is called after every epoch with its history record.
    ``teacher`` (a module mapping the same inputs to logits, kept frozen in eval mode) with
    ``config.distill = a > 0``: every exit's loss is ``(1 - a) CE + a T^2 KL(teacher_T ||
    exit_T)`` at temperature ``T`` (Hinton et al.'s distillation), on the same augmented
    batch.
    """
    from flowcodec.scale.ddp import Dist, load_state, save_state

    dist = dist or Dist()
    cfg = config or TrainConfig()
    weights = cfg.exit_weights or [1.0] * family.num_members
    if len(weights) != family.num_members:
        raise ConfigError(f"exit_weights needs {family.num_members} values, got {len(weights)}")
    if cfg.distill > 0 and teacher is None:
        raise ConfigError("config.distill > 0 needs a teacher module")
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
    crit = _criterion(cfg, teacher, dev)
    use_amp = dev.type == "cuda" if cfg.amp is None else bool(cfg.amp)
    wsum = sum(weights)
    loop = EpochLoop(steps_per_epoch, cfg.epochs, desc="train family", progress=cfg.progress,
                     show=dist.is_main,
                     reduce_sum=dist.all_sum if dist.active else None)  # fmt: skip
    if checkpoint is not None and resume:
        saved = load_state(checkpoint, family, opt, sched, gen)
        if saved is not None:
            loop.resume(int(saved["epoch"]), saved["history"])
    model = dist.wrap(family)
    try:
        _epochs(loop, cfg, train, gen, dev, dist, model, family, weights, wsum, crit, use_amp,
                opt, sched, checkpoint, on_epoch, save_state)  # fmt: skip
    except RuntimeError as e:
        from flowcodec.scale.ddp import PeerLost, lost_message

        if not dist.active or isinstance(e, PeerLost):
            raise
        raise PeerLost(lost_message(dist, e)) from e  # a collective failed: a rank stopped
    loop.close()
    history, seconds = loop.history, loop.elapsed
    accs = evaluate_family(family, test, device=dev) if test is not None else []
    family.eval()
    return TrainResult(accs, seconds, history)


def _criterion(cfg: TrainConfig, teacher: nn.Module | None, dev: torch.device):
    """``crit(exit_logits, labels, inputs)`` -> one loss per exit: cross-entropy, mixed with
    distillation from one teacher pass per batch if asked."""
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if teacher is None or cfg.distill == 0:
        return lambda outs, y, x: [ce(o, y) for o in outs]
    from flowcodec.training import kd_loss

    teacher = teacher.to(dev).eval().requires_grad_(False)
    a, t = cfg.distill, cfg.temperature

    def crit(outs, y, x):
        with torch.no_grad():
            soft = teacher(x).float()
        return [(1 - a) * ce(o, y) + a * kd_loss(o, soft, t) for o in outs]

    return crit


def _epochs(loop, cfg, train, gen, dev, dist, model, family, weights, wsum, crit, use_amp,
            opt, sched, checkpoint, on_epoch, save_state) -> None:  # fmt: skip
    for epoch in loop.epochs():
        batches = train.batches(cfg.batch_size, shuffle=True, train=True, generator=gen,
                                device=dev)  # fmt: skip
        for x, y in loop.steps(batches):
            x, y = dist.shard(x, y)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                outs = model(x)
                losses = crit([o.float() for o in outs], y, x)
                loss = sum(w * v for w, v in zip(weights, losses)) / wsum
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loop.add(len(y), loss=loss.item())
        rec = {"epoch": epoch, "loss": loop.means()["loss"]}
        loop.commit(rec, loss=f"{rec['loss']:.3f}")
        if checkpoint is not None and dist.is_main:
            save_state(checkpoint, family, opt, sched, gen, epoch, loop.history,
                       {"world": dist.world})  # fmt: skip
        dist.barrier()
        if on_epoch is not None:
            on_epoch(rec)
