"""The pieces every trainer in flowcodec shares (a ground module: torch only).

- :class:`Frozen`: modules put in eval mode with ``requires_grad`` off, and put back exactly
  as they were (every submodule's mode, every parameter's flag) when the training ends,
  whether it returned or raised: the user's model stays the user's.
- :func:`kd_loss`: Hinton's distillation term.
- :func:`lr_at`: the learning rate of a linear warm-up followed by a cosine decay.
- :class:`EpochLoop`: the loop itself (epochs of steps, progress bar, per-epoch means,
  history, time budget, resume); a trainer keeps only its batches, its step and its
  evaluation (docs/overview.md, "Where do I add ...").

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
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.errors import ConfigError

__all__ = ["EpochLoop", "Frozen", "kd_loss", "lr_at", "TrainRecord", "check_distill_settings"]


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


@dataclass
class TrainRecord:
    """What a training run returns: per-epoch history, time, epochs and steps run."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epochs: int = 0
    steps: int = 0

    def finish(self, loop: EpochLoop) -> None:
        """Close ``loop`` and take its time and steps; ``epochs``: the history's length."""
        loop.close()
        self.seconds = loop.elapsed
        self.epochs = len(self.history)
        self.steps = loop.step


def check_distill_settings(cfg) -> None:
    """The settings every distilling codec trainer has, checked: ``epochs`` and
    ``batch_size`` >= 1, ``lr`` > 0, ``stem_lr``, ``kd`` and ``beta`` >= 0, ``temperature``
    > 0 (ConfigError otherwise)."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.stem_lr < 0:
        raise ConfigError("epochs and batch_size must be >= 1, lr > 0, stem_lr >= 0")
    if cfg.kd < 0 or cfg.beta < 0 or cfg.temperature <= 0:
        raise ConfigError("kd and beta must be >= 0 and temperature > 0")


class EpochLoop:
    """The scaffolding of a training run, shared by every flowcodec trainer.

    A run is ``epochs`` epochs of ``per_epoch`` optimiser steps (``max_steps`` caps the
    total). The loop owns the step and epoch counters, the progress bar, the per-epoch
    means of whatever the objective reports, the history of epoch records and the time
    budget; the objective keeps only its batches, its step and its evaluation::

        loop = EpochLoop(per_epoch, epochs, desc="train my codec", time_budget=600)
        for epoch in loop.epochs():
            for x, y in loop.steps(data.batches(...)):
                loop.set_lr(opt, [1e-3], warmup=100)
                loss = ...; loss.backward(); opt.step()
                loop.add(len(y), loss=loss)
            rec = loop.record()                 # epoch, step, seconds and the means
            rec["eval"] = evaluate(...)         # anything the objective adds
            loop.commit(rec, line=f"epoch {epoch}: loss {rec['loss']:.3f}")
        loop.close()

    Time budget: after every epoch the rest of the run is fitted to the epochs that the
    remaining budget allows at the last epoch's pace (never more than planned; an epoch
    that ends with no time left ends the run), so a cosine schedule computed from
    :attr:`total` still ends annealed. ``reduce_sum`` / ``reduce_max`` (for example a
    :class:`~flowcodec.scale.ddp.Dist`'s ``all_sum`` / ``all_max``) make the epoch's means
    and its pace agree across data-parallel ranks. A resumed run calls :meth:`resume`.

    Example
    -------
    >>> loop = EpochLoop(per_epoch=3, epochs=2, desc="demo", progress=False)
    >>> for epoch in loop.epochs():
    ...     for b in loop.steps(range(3)):
    ...         loop.add(2, loss=float(b))
    ...     _ = loop.commit(loop.record())
    >>> loop.step, [r["loss"] for r in loop.history]
    (6, [1.0, 1.0])
    """

    def __init__(self, per_epoch: int, epochs: int, *, desc: str = "train",
                 progress: bool = True, time_budget: float | None = None,
                 max_steps: int | None = None, reduce_sum=None, reduce_max=None,
                 show: bool = True) -> None:  # fmt: skip
        from flowcodec.progress import tqdm

        if per_epoch < 1 or epochs < 1:
            raise ValueError(f"EpochLoop needs per_epoch >= 1 and epochs >= 1, got "
                             f"{per_epoch} and {epochs}")  # fmt: skip
        self.per_epoch, self.n_epochs = int(per_epoch), int(epochs)
        self.planned = self.n_epochs * self.per_epoch
        if max_steps is not None:
            self.planned = min(self.planned, int(max_steps))
        self.total = self.planned
        self.step = self.epoch = 0
        self.history: list[dict] = []
        self.time_budget = time_budget
        self.progress = bool(progress and show)
        self._sum, self._max = reduce_sum, reduce_max
        self._bar = tqdm(total=self.total, desc=desc, disable=not self.progress, leave=False)
        self.start = time.perf_counter()
        self._t_epoch = self.start
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}

    def resume(self, epoch: int, history: list, step: int | None = None,
               total: int | None = None) -> None:
        """Continue after a saved state's ``epoch`` (its ``step`` and ``total`` default to
        whole epochs of the plan)."""
        self.epoch, self.history = int(epoch), list(history)
        self.step = int(step) if step is not None else min(self.planned, epoch * self.per_epoch)
        if total is not None:
            self.total = int(total)
        self._bar.total, self._bar.n = self.total, self.step
        self._bar.refresh()

    @property
    def elapsed(self) -> float:
        """Seconds since the loop started (or :meth:`epochs` was first entered)."""
        return time.perf_counter() - self.start

    def epochs(self):
        """Yield epoch numbers (from 1, or after the resumed epoch) while steps remain."""
        self.start = time.perf_counter()
        while self.step < self.total and self.epoch < self.n_epochs:
            self.epoch += 1
            self._sums, self._counts = {}, {}
            self._t_epoch = time.perf_counter()
            yield self.epoch

    def steps(self, batches):
        """Yield batches of one epoch until the run's total is reached; counts the steps."""
        if self.step >= self.total:
            return
        for batch in batches:
            yield batch
            self.step += 1
            self._bar.update(1)
            if self.step >= self.total:
                break

    def set_lr(self, opt, bases, warmup: int) -> None:
        """The first ``len(bases)`` parameter groups of ``opt`` get :func:`lr_at` of this
        step (linear warm-up over ``warmup`` steps, cosine decay to :attr:`total`)."""
        for g, base in zip(opt.param_groups, bases):
            g["lr"] = lr_at(self.step, self.total, base, warmup)

    def add(self, n: float, **values) -> None:
        """Add ``values`` (tensors or numbers) of a batch of ``n`` samples to the epoch's
        means (weighted by ``n``)."""
        for k, v in values.items():
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            self._sums[k] = self._sums.get(k, 0.0) + v * n
            self._counts[k] = self._counts.get(k, 0.0) + n

    def means(self) -> dict:
        """The epoch's means so far (summed over ranks when ``reduce_sum`` is given)."""
        keys = list(self._sums)
        sums = [self._sums[k] for k in keys]
        counts = [self._counts[k] for k in keys]
        if self._sum is not None and keys:
            both = self._sum(sums + counts)
            sums, counts = both[:len(keys)], both[len(keys):]
        return {k: s / max(c, 1e-12) for k, s, c in zip(keys, sums, counts)}

    def record(self, **extra) -> dict:
        """The epoch's record: ``epoch``, ``step``, ``seconds``, the means, then ``extra``."""
        return {"epoch": self.epoch, "step": self.step,
                "seconds": round(self.elapsed, 2), **self.means(), **extra}  # fmt: skip

    def commit(self, rec: dict, line: str | None = None, **postfix) -> dict:
        """Append ``rec`` to the history, show ``line`` (and ``postfix`` on the bar), and
        fit the rest of the run to the time budget. Returns ``rec``."""
        self.history.append(rec)
        if postfix:
            self._bar.set_postfix(**postfix)
        if line is not None and self.progress:
            self._bar.write(line)
        if self.time_budget is not None and self.step < self.total:
            took = time.perf_counter() - self._t_epoch
            if self._max is not None:  # every rank must stop at the same step
                took = max(self._max([took]))
            left = int(max(0.0, self.time_budget - self.elapsed) / max(took, 1e-6))
            self.total = min(self.planned, (self.epoch + left) * self.per_epoch)
            self._bar.total = self.total
        return rec

    def close(self) -> None:
        self._bar.close()
