"""Grow a family: train a new, larger last member on the frozen shared trunk.

The device members (stages ``1..p`` and their exits) are copied from a trained family and
never change, so their accuracy, their FLOPs and every codec trained on their features stay
valid. Only the new last stage and its exit are trained, from the features at split point
``p``. Because the trunk is frozen, those features are computed once, for a fixed number
of augmented copies of the training set (random crops and flips), and cached as float16;
every epoch then draws, for each image, one of its cached copies. On 2 CPU cores this makes
an epoch cost only the new stage's forward and backward passes.

Example
-------
>>> from flowcodec.family.grow import GrowConfig
>>> GrowConfig(epochs=2, views=2).views
2
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flowcodec.data import ArrayDataset, crop_flip
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily

__all__ = ["GrowConfig", "GrowResult", "grow_member", "cache_trunk_views"]


@dataclass
class GrowConfig:
    """How to train the new last stage.

    ``recipe="sgd"``: SGD with Nesterov momentum, a linear warm-up over ``warmup`` of the
    steps then a linear decay to zero, label smoothing, and an exponential moving average of
    the weights (``ema``, 0 turns it off) that is what gets evaluated and saved.

    ``recipe="air"``: the airbench-style optimiser of :func:`flowcodec.family.air.train_air`
    (``lr`` and ``weight_decay`` per 1,024 examples and decoupled, a ``bias_scaler`` x larger
    step for the fixed-scale batch norms' biases, a triangular schedule, a lookahead average
    every 5 steps in place of ``ema``; ``warmup`` is unused).

    ``distill`` > 0 (with a ``teacher`` passed to :func:`grow_member`): that share of the loss
    is the KL divergence from the teacher's softened answer on the same augmented view
    (temperature ``temperature``, scaled by its square), the rest the label-smoothed cross
    entropy. The teacher's logits are cached with the features, once per view.
    """

    epochs: int = 16
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    warmup: float = 0.15
    ema: float = 0.98
    views: int = 8
    pad: int = 2
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    time_budget_s: float | None = None
    recipe: str = "sgd"
    bias_scaler: float = 64.0
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        bad = [k for k in ("epochs", "batch_size", "views") if getattr(self, k) < 1]
        if self.recipe not in ("sgd", "air"):
            bad.append("recipe")
        if not 0 <= self.distill <= 1 or not self.temperature > 0:
            bad.append("distill/temperature")
        if not self.lr > 0:
            bad.append("lr")
        if not 0 <= self.ema < 1:
            bad.append("ema")
        if not 0 <= self.warmup < 1:
            bad.append("warmup")
        if self.pad < 0:
            bad.append("pad")
        if bad:
            raise ConfigError(f"GrowConfig: bad value for {', '.join(bad)} (epochs, batch_size, "
                              "views >= 1; lr > 0; ema, warmup in [0, 1); pad >= 0; recipe sgd "
                              "or air; distill in [0, 1]; temperature > 0)")  # fmt: skip


@dataclass
class GrowResult:
    """Test accuracy of every member after growing, the epochs done and the wall time."""

    accuracies: list[float]
    seconds: float
    epochs_done: int
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def cache_trunk_views(head: nn.Module, data: ArrayDataset, views: int, pad: int,
                      generator: torch.Generator, device="cpu", progress=True,
                      batch_size: int = 500, teacher: nn.Module | None = None):  # fmt: skip
    """``(views, N, *feature)`` float16 features of ``views`` augmented copies of ``data``
    (view 0 is flipped for no image and not shifted; the others are random crops and
    flips).

    ``teacher`` (a network from images to logits): the result is the pair ``(features,
    logits)``, the teacher's float16 ``(views, N, classes)`` logits on the very same
    augmented images."""
    from flowcodec.progress import tqdm

    cl = torch.device(device).type == "cpu"  # channels-last convolutions are faster on CPU

    def _ready(m: nn.Module) -> nn.Module:
        m = m.to(device).eval()
        return copy.deepcopy(m).to(memory_format=torch.channels_last) if cl else m

    head = _ready(head)
    teacher = _ready(teacher) if teacher is not None else None
    n = len(data)
    out = t_out = None
    with tqdm(total=views * math.ceil(n / batch_size), desc="cache trunk features",
              disable=not progress, leave=False) as bar:  # fmt: skip
        for v in range(views):
            for start in range(0, n, batch_size):
                xb = data.images[start : start + batch_size].to(device)
                if v > 0:
                    xb = crop_flip(xb, generator, pad=pad) if pad else _flip(xb, generator)
                xb = data.normalize(xb)
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                h = head(xb).half().cpu()
                if out is None:
                    out = torch.empty((views, n, *h.shape[1:]), dtype=torch.float16)
                out[v, start : start + len(h)] = h
                if teacher is not None:
                    t = teacher(xb).half().cpu()
                    if t_out is None:
                        t_out = torch.empty((views, n, t.shape[1]), dtype=torch.float16)
                    t_out[v, start : start + len(t)] = t
                bar.update(1)
    return out if teacher is None else (out, t_out)


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(3), x)


def _lr_at(step: int, total: int, cfg: GrowConfig) -> float:
    """The schedule's factor at ``step`` (each parameter group's base rate times this)."""
    if cfg.recipe == "air":
        from flowcodec.family.air import _triangle

        return _triangle(step, total)
    w = max(1, int(cfg.warmup * total))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def _optimizer(tail: nn.Module, cfg: GrowConfig):
    """``(optimizer, peak step size of each parameter group, lookahead or None)``."""
    if cfg.recipe == "air":
        from flowcodec.family.air import _BN, _Lookahead

        scale = 1024 * (1 + 1 / (1 - cfg.momentum))
        lr, wd = cfg.lr / scale, cfg.weight_decay * cfg.batch_size / scale
        bn = [m.bias for m in tail.modules() if isinstance(m, _BN)]
        ids = {id(q) for q in bn}
        other = [q for q in tail.parameters() if q.requires_grad and id(q) not in ids]
        lr_b = lr * cfg.bias_scaler
        groups = [{"params": bn, "lr": lr_b, "weight_decay": wd / lr_b},
                  {"params": other, "lr": lr, "weight_decay": wd / lr}]  # fmt: skip
        look = _Lookahead(tail)
    else:
        groups = [{"params": [q for q in tail.parameters() if q.ndim > 1], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay},
                  {"params": [q for q in tail.parameters() if q.ndim <= 1], "lr": cfg.lr,
                   "weight_decay": 0.0}]  # fmt: skip
        look = None
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True)
    return opt, [g["lr"] for g in groups], look


def _kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the answers softened by ``temperature``, times its square."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, 1),
                                nn.functional.log_softmax(teacher / t, 1), log_target=True,
                                reduction="batchmean") * t * t  # fmt: skip


@torch.no_grad()
def _accuracy(tail: nn.Module, feats: torch.Tensor, labels: torch.Tensor, dev,
              batch_size: int = 1000) -> float:  # fmt: skip
    was = tail.training
    tail.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        h = feats[s : s + batch_size].to(dev).float().contiguous(memory_format=torch.channels_last)
        correct += int((tail(h).argmax(1) == labels[s : s + batch_size].to(dev)).sum())
    tail.train(was)
    return correct / len(labels)


def grow_member(
    source: EarlyExitFamily,
    target: EarlyExitFamily,
    train: ArrayDataset,
    test: ArrayDataset | None = None,
    config: GrowConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_epoch=None,
    teacher: nn.Module | None = None,
) -> GrowResult:
    """Copy ``source``'s stages and exits ``1..k-1`` into ``target`` (a family of the same
    trunk whose member ``k`` is new and larger: it replaces the source's last member, or is
    added after it) and train ``target``'s last stage and exit on the frozen features of the
    split point that stage reads (``k-1``, or an earlier one when the stage branches).

    ``checkpoint`` (a path without suffix): the training state is written there after every
    epoch, and with ``resume`` a saved state is loaded and training continues after its
    last epoch. ``config.time_budget_s`` stops after the epoch that crosses it (resume to
    go on). ``teacher`` (images to logits; needed when ``config.distill`` > 0): the network
    whose answers the new member learns from besides the labels. Returns the test accuracy of
    every member of ``target``.
    """
    from flowcodec.progress import tqdm
    from flowcodec.scale.ddp import load_state, save_state

    cfg = config or GrowConfig()
    if cfg.distill > 0 and teacher is None:
        raise ConfigError("GrowConfig.distill > 0 needs a teacher")
    k = target.num_members
    if source.num_members not in (k - 1, k):
        raise ConfigError(f"source has {source.num_members} members, target {k}: the target "
                          "replaces the source's last member or adds one")  # fmt: skip
    p = target.parents[k - 1]  # the split point the new stage reads (k - 1 on a chain)
    for i in range(k - 1):
        try:
            target.stages[i].load_state_dict(source.stages[i].state_dict())
            target.exits[i].load_state_dict(source.exits[i].state_dict())
        except RuntimeError as err:
            raise ConfigError(f"member {i + 1} of the source does not fit the target: "
                              f"{str(err).splitlines()[0]}") from err  # fmt: skip
    dev = torch.device(cfg.device)
    target.to(dev)
    head, _ = target.split(k, p)
    head.eval().requires_grad_(False)
    tail = nn.Sequential(target.stages[k - 1], target.exits[k - 1]).to(dev)
    tail = tail.to(memory_format=torch.channels_last).train()
    air = cfg.recipe == "air"
    ema = torch.optim.swa_utils.AveragedModel(
        tail, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
        use_buffers=True) if cfg.ema > 0 and not air else None  # fmt: skip

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    cached = cache_trunk_views(head, train, cfg.views, cfg.pad, gen, dev, cfg.progress,
                               teacher=teacher if cfg.distill > 0 else None)  # fmt: skip
    feats, t_logits = cached if cfg.distill > 0 else (cached, None)
    labels = train.labels
    test_feats = (cache_trunk_views(head, test, 1, 0, gen, dev, cfg.progress)[0]
                  if test is not None else None)  # fmt: skip

    n = len(labels)
    steps = n // cfg.batch_size
    total = cfg.epochs * steps
    opt, bases, look = _optimizer(tail, cfg)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history: list[dict] = []
    first = 0
    holder = nn.ModuleDict({"tail": tail, **({"ema": ema} if ema is not None else {}),
                            **({"look": look} if look is not None else {})})  # fmt: skip
    if checkpoint is not None and resume:
        saved = load_state(checkpoint, holder, opt, None, gen)
        if saved is not None:
            first, history = int(saved["epoch"]), list(saved["history"])
    bar = tqdm(total=total, initial=first * steps, desc="grow member", disable=not cfg.progress,
               leave=False)  # fmt: skip
    done = first
    for epoch in range(first, cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        which = torch.randint(0, cfg.views, (n,), generator=gen)
        run_loss, seen = 0.0, 0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            h = feats[which[idx], idx].to(dev).float().contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(dev)
            step = epoch * steps + s
            for g, base in zip(opt.param_groups, bases, strict=True):
                g["lr"] = base * _lr_at(step, total, cfg)
            out = tail(h)
            loss = crit(out, y)
            if t_logits is not None:
                t = t_logits[which[idx], idx].to(dev).float()
                loss = (1 - cfg.distill) * loss + cfg.distill * _kd(out, t, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            # the air recipe's step sizes are per example summed (per 1,024 of them)
            (loss * len(y) if air else loss).backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(tail)
            if look is not None and (step + 1) % 5 == 0:
                look.update(tail, 0.95**5 * ((step + 1) / total) ** 3)
            run_loss += float(loss.detach()) * len(y)
            seen += len(y)
            bar.update(1)
        rec = {"epoch": epoch + 1, "loss": round(run_loss / seen, 4),
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if test_feats is not None:
            rec["test_accuracy"] = _accuracy(ema.module if ema is not None else tail,
                                             test_feats, test.labels, dev)  # fmt: skip
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('test_accuracy', 0):.4f}")
        done = epoch + 1
        if checkpoint is not None:
            save_state(checkpoint, holder, opt, None, gen, done, history,
                       {"config": asdict(cfg)})  # fmt: skip
        if on_epoch is not None:
            on_epoch(rec)
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
    bar.close()
    if ema is not None:
        tail.load_state_dict(ema.module.state_dict())
    if look is not None:
        look.update(tail, 1.0)  # the end of the run: the weights become the average
    target.eval()
    accs: list[float] = []
    if test is not None:
        from flowcodec.family.train import evaluate_family

        accs = evaluate_family(target, test, device=dev)
    return GrowResult(accs, time.perf_counter() - start, done, history)
