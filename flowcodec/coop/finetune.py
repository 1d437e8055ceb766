"""The single-view baseline at its strongest: the largest member fine-tuned on device views.

Cooperative fusion is trained on the generator's views; the shipped largest member never
saw one. So that fusion is not credited with merely adapting to the views, the baseline
"one view, uncompressed, through the largest member" uses a copy of that member fine-tuned
on single device views for as long as the fusion trains (``--coop PATH`` takes the fusion
run's time and view config from its checkpoint):

- each training sample (augmented as the family's training augments it) is shown through
  one device position drawn at random per sample and step, from the same seeded view
  generator (:meth:`~flowcodec.coop.views.ViewGenerator.view`); epoch ``e`` offsets the
  view ids by ``e * N``, so every epoch sees other windows and other sensor noise;
- the whole member trains (SGD with Nesterov momentum, or AdamW; a linear warm-up and a
  cosine decay), optionally distilled from the shipped member on the whole image
  (``kd``: ``(1 - kd) CE + kd T^2 KL(member(x) || student(view))``);
- channels-last tensors, a time budget (``time_budget``: the number of steps is refitted
  while training), a progress bar, and the training state after every epoch (``resume``).

The family passed in is not changed: the student is a copy of its member; the teacher is
the member itself, frozen for the run and restored afterwards. The result is saved as
float16 safetensors plus JSON (kind ``"member-views"``), with the view config, the
training settings, and the accuracy per device position of the shipped and the fine-tuned
member on test views. :func:`load_finetuned` rebuilds it on a family of the same config.

``python -m flowcodec.coop.finetune --family cifar10 --coop runs/coop/cifar10-coop4b
--out runs/coop/member3-views`` (or ``flowcodec finetune-coop ...``).

Example
-------
>>> FinetuneConfig(epochs=2, lr=0.01).check().epochs
2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flowcodec.coop.views import ViewConfig, ViewGenerator
from flowcodec.data import ArrayDataset, crop_flip
from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.family.base import EarlyExitFamily, Member
from flowcodec.training import Frozen, kd_loss, lr_at

__all__ = ["FinetuneConfig", "FinetuneResult", "KIND", "finetune_member", "view_accuracy",
           "save_finetuned", "load_finetuned", "read_coop_record", "add_arguments", "run",
           "main"]

#: The ``kind`` of a fine-tuned member's checkpoint.
KIND = "member-views"
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune_member` (plain values: saved with the checkpoint).

    ``kd``: weight of the distillation from the member on the whole image (0: labels only).
    ``time_budget``: seconds of training (the evaluations on test views before and after
    are not counted; a resumed run counts the seconds its earlier runs trained).
    ``eval_n``: test images whose views score each device position after training.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    kd: float = 0.0
    temperature: float = 4.0
    warmup: int = 100  # steps of the linear warm-up (at most 5 % of the steps)
    seed: int = 0
    time_budget: float | None = None
    eval_n: int = 2000
    channels_last: bool = True

    def check(self) -> FinetuneConfig:
        bad = []
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad.append(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad.append(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            bad.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            bad.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.label_smoothing < 1:
            bad.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.kd <= 1 or not self.temperature > 0:
            bad.append(f"kd must be in [0, 1] and temperature > 0, got kd={self.kd!r}, "
                       f"temperature={self.temperature!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            bad.append(f"warmup must be an int >= 0 (steps), got {self.warmup!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            bad.append(f"time_budget must be > 0 seconds, got {self.time_budget!r}")
        if isinstance(self.eval_n, bool) or not isinstance(self.eval_n, int) or self.eval_n < 0:
            bad.append(f"eval_n must be an int >= 0, got {self.eval_n!r}")
        if bad:
            raise ConfigError("fine-tuning on views: " + "; ".join(bad))
        return self


@dataclass
class FinetuneResult:
    """What :func:`finetune_member` measured: ``history`` one dict per epoch (``loss``,
    ``accuracy`` on the training views, ``seconds``); ``before`` / ``after``: accuracy per
    device position on test views of the shipped / fine-tuned member (empty without a
    test set); ``seconds`` of training (all runs of a resumed training together)."""

    history: list[dict] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    epochs: int = 0
    images_per_s: float = 0.0


def _student(family: EarlyExitFamily, member: int) -> Member:
    """A copy of member ``member`` that shares nothing with ``family`` (the stages on its
    path, ``family.path(member)``: ``1..member`` for a chain). Not ``family.member``: that
    would set the family's modules to its own mode, and the caller's modes are kept."""
    stages = [copy.deepcopy(family.stages[q - 1]) for q in family.path(member) if q > 0]
    return Member(stages, copy.deepcopy(family.exits[member - 1]), member)


@torch.no_grad()
def view_accuracy(model: torch.nn.Module, views: ViewGenerator, data: ArrayDataset,
                  batch_size: int = 250) -> list[float]:
    """Accuracy of ``model`` on each device position's view of ``data`` (view ids are the
    positions in ``data``, as the benchmark numbers them)."""
    was = model.training
    model.eval()
    correct = torch.zeros(views.devices)
    at = 0
    for x, y in data.batches(batch_size):
        idx = torch.arange(at, at + len(y))
        at += len(y)
        v = views(x, idx)
        for k in range(views.devices):
            correct[k] += (model(v[:, k]).argmax(1) == y).sum()
    model.train(was)
    return (correct / max(1, len(data))).tolist()


def finetune_member(family: EarlyExitFamily, views: ViewGenerator, train: ArrayDataset,
                    test: ArrayDataset | None = None, cfg: FinetuneConfig | None = None,
                    member: int | None = None, checkpoint: str | Path | None = None,
                    resume: bool = False, progress: bool = True) -> tuple[Member, FinetuneResult]:
    """Fine-tune a copy of member ``member`` (default the largest) of ``family`` on single
    device views of ``train``; returns the fine-tuned copy (eval mode, contiguous) and what
    was measured. ``checkpoint`` (a path without suffix) gets the training state after
    every epoch; ``resume`` continues from it."""
    from flowcodec.progress import tqdm
    from flowcodec.scale.ddp import load_state, save_state

    cfg = (cfg or FinetuneConfig()).check()
    member = family.num_members if member is None else member
    if not isinstance(views, ViewGenerator):
        raise ConfigError(f"views must be a ViewGenerator, got {type(views).__name__}")
    if tuple(train.input_shape) != tuple(family.input_shape):
        raise ConfigError(f"training images are {tuple(train.input_shape)}, the family takes "
                          f"{tuple(family.input_shape)}")
    n = len(train)
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise ConfigError(f"{n} training samples, fewer than one batch ({cfg.batch_size})")
    student = _student(family, member)
    student.requires_grad_(True)  # a copy: trainable whatever the given family's flags are
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    res = FinetuneResult()
    frozen = Frozen(family)
    try:
        teacher = family.member(member).eval()
        if test is not None and cfg.eval_n:
            test = test.sample(cfg.eval_n)  # not the first N: the split is stored by class
            res.before = view_accuracy(teacher, views, test)
        student = student.to(memory_format=fmt).train()
        decay = [p for p in student.parameters() if p.ndim > 1]
        rest = [p for p in student.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        opt = (torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
               if cfg.optimizer == "sgd" else torch.optim.AdamW(groups, lr=cfg.lr))
        total = planned = cfg.epochs * per_epoch
        step, epoch, spent = 0, 0, 0.0
        if checkpoint is not None and resume:
            saved = load_state(checkpoint, student, opt, None, gen)
            if saved is not None:
                epoch, res.history = int(saved["epoch"]), list(saved["history"])
                extra = saved["extra"]
                step, spent = int(extra["step"]), float(extra.get("seconds", 0.0))
                if int(extra.get("planned", -1)) == planned:  # same plan: its refitted steps
                    total = int(extra["total"])
        warmup = min(cfg.warmup, max(1, total // 20))
        bar = tqdm(total=total, initial=step, desc="fine-tune on views", disable=not progress,
                   leave=False)
        start, done_here = time.perf_counter(), 0
        while step < total:
            epoch += 1
            student.train()
            order = torch.randperm(n, generator=gen)
            sums = {"loss": 0.0, "correct": 0.0}
            seen = 0
            for s in range(0, per_epoch * cfg.batch_size, cfg.batch_size):
                if step >= total:
                    break
                idx = order[s:s + cfg.batch_size]
                xb = train.images[idx]
                if train.augment:
                    xb = crop_flip(xb, gen)
                x = train.normalize(xb)
                y = train.labels[idx]
                pos = torch.randint(0, views.devices, (len(idx),), generator=gen)
                v = views.view(x, idx + (epoch - 1) * n, pos).contiguous(memory_format=fmt)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, cfg.lr, warmup)
                logits = student(v)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if cfg.kd:
                    with torch.no_grad():
                        soft = teacher(x.contiguous(memory_format=fmt)).float()
                    loss = (1 - cfg.kd) * loss + cfg.kd * kd_loss(logits, soft, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                done_here += 1
                seen += len(y)
                sums["loss"] += float(loss.detach()) * len(y)
                sums["correct"] += float((logits.detach().argmax(1) == y).sum())
                bar.update(1)
                if cfg.time_budget is not None and done_here % 25 == 0:
                    total = _refit(cfg.time_budget, spent, start, done_here, step, total)
                    bar.total = total
            elapsed = spent + time.perf_counter() - start
            res.history.append({"epoch": epoch, "step": step,
                                "loss": sums["loss"] / max(1, seen),
                                "accuracy": sums["correct"] / max(1, seen),
                                "seconds": round(elapsed, 1)})
            if progress:
                h = res.history[-1]
                bar.write(f"epoch {epoch}: loss {h['loss']:.3f}, training views "
                          f"{100 * h['accuracy']:.1f}%, {h['seconds']:.0f}s")
            if cfg.time_budget is not None and step < total:
                total = _refit(cfg.time_budget, spent, start, done_here, step, total)
                bar.total = total
            if checkpoint is not None:
                save_state(checkpoint, student, opt, None, gen, epoch, res.history,
                           {"step": step, "total": total, "planned": planned,
                            "seconds": elapsed})
        bar.close()
        res.seconds = spent + time.perf_counter() - start
        res.steps, res.epochs = step, epoch
        here = time.perf_counter() - start
        res.images_per_s = done_here * cfg.batch_size / max(here, 1e-9)
        student = student.to(memory_format=torch.contiguous_format).eval()
        if test is not None and cfg.eval_n:
            res.after = view_accuracy(student, views, test)
        return student, res
    finally:
        frozen.restore()


def _refit(budget: float, spent: float, start: float, done_here: int, step: int,
           total: int) -> int:
    """The step count that ends within ``budget`` seconds at the rate measured so far."""
    now = time.perf_counter() - start
    per_step = now / max(1, done_here)
    left = max(0.0, budget - spent - now)
    return min(total, step + int(left / max(per_step, 1e-9)))


def _view_key(record: dict) -> dict:
    """What a view config must share with another for a fine-tuned member to fit it (the
    seed only fixes which windows a sample id gets, so it may differ)."""
    return {k: v for k, v in record.items() if k != "seed"}


def save_finetuned(model: Member, path: str | Path, family: EarlyExitFamily,
                   views: ViewConfig, extra: dict | None = None) -> Path:
    """Write a fine-tuned member as ``PATH.safetensors`` (float16) + ``PATH.json`` (kind
    :data:`KIND`; the family config, the member index and the view config)."""
    from flowcodec.family.checkpoint import save_checkpoint

    cfg = {"family": family.config, "member": int(model.index), "views": views.record()}
    return save_checkpoint(model, path, KIND, cfg, extra, half=True)


def load_finetuned(path: str | Path, family: EarlyExitFamily,
                   views: ViewConfig | None = None) -> Member:
    """The member saved by :func:`save_finetuned`, rebuilt on a copy of ``family``'s member
    (the family itself is not changed), in eval mode. CheckpointError when the file holds
    something else, was made for another family, or (``views`` given) for other views
    than ``views`` (the seed may differ)."""
    from flowcodec.family.checkpoint import load_into, load_state, read_config

    meta = read_config(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: holds a {meta.get('kind')!r}, not a {KIND!r}")
    c = meta.get("config")
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: bad config {c!r}")
    if c.get("family") != family.config:
        raise CheckpointError(f"{path}: made for family {c.get('family')}, got {family.config}")
    member = c.get("member")
    if isinstance(member, bool) or not isinstance(member, int) \
            or not 1 <= member <= family.num_members:
        raise CheckpointError(f"{path}: member must be an int in 1..{family.num_members}, got "
                              f"{member!r}")
    if views is not None and _view_key(c.get("views") or {}) != _view_key(views.record()):
        raise CheckpointError(f"{path}: fine-tuned on views {c.get('views')}, not on "
                              f"{views.record()} (only the seed may differ)")
    model = _student(family, member)
    load_into(model, load_state(path), what=f"member {member} of {family.config}")
    return model.eval()


# --- the command ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to ``p`` (``flowcodec.cli`` reuses them)."""
    p.add_argument("--family", default="cifar10",
                   help="trained family (data set of the same name); its largest member is "
                        "fine-tuned")
    p.add_argument("--coop", default=None,
                   help="a cooperative checkpoint (train-coop's --out): take its view config, "
                        "and its training time (cache and epochs) as the time budget unless "
                        "--seconds is given")
    p.add_argument("--devices", type=int, default=4, help="device positions K (without --coop)")
    p.add_argument("--area", type=float, default=ViewConfig.area,
                   help="share of the image each window covers (without --coop)")
    p.add_argument("--jitter", type=float, default=ViewConfig.jitter,
                   help="largest relative change of a window's side (without --coop)")
    p.add_argument("--noise", type=float, default=ViewConfig.noise,
                   help="sensor noise, normalised-input units (without --coop)")
    p.add_argument("--view-seed", type=int, default=0, help="view seed (without --coop)")
    helps = {"epochs": "epochs (at most: a time budget may stop earlier)",
             "batch_size": "views per step", "lr": "peak learning rate",
             "weight_decay": "weight decay of the weights (not of biases and norms)",
             "optimizer": f"one of {list(OPTIMIZERS)}",
             "label_smoothing": "label smoothing of the cross-entropy",
             "kd": "weight of distillation from the member on the whole image (0: off)",
             "temperature": "distillation temperature", "warmup": "warm-up steps",
             "seed": "seed of the order, the positions and the augmentation",
             "eval_n": "test images scoring each position before and after (0: none)"}
    for name, f in FinetuneConfig.__dataclass_fields__.items():
        if name in ("time_budget", "channels_last"):
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{helps[name]} (default {f.default})")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep tensors contiguous (channels-last is faster on CPUs)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget of the training in seconds")
    p.add_argument("--train-n", type=int, default=None, help="train on a subset (smoke runs)")
    p.add_argument("--out", required=True, help="checkpoint path without suffix")
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state saved beside --out")
    from flowcodec.sweeps import add_common_arguments

    add_common_arguments(p, threads=None)  # --threads (default: torch's), --no-progress


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowcodec.coop.finetune",
                                description="Fine-tune the largest member on single device "
                                            "views: the single-view baseline of cooperative "
                                            "inference (docs/cooperative.md).")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """``python -m`` entry point: parse ``argv`` and :func:`run`."""
    return run(_parser().parse_args(argv))


def read_coop_record(path) -> tuple[ViewConfig, float | None]:
    """The view config and the training seconds (cache included) of a coop checkpoint."""
    from flowcodec.family.checkpoint import read_config

    meta = read_config(path)
    if meta.get("kind") != "coop":
        raise CheckpointError(f"{path}: holds a {meta.get('kind')!r}, not a coop model")
    extra = meta.get("extra") or {}
    rec = dict(extra.get("views") or {})
    rec.pop("views", None)
    try:
        vcfg = ViewConfig(**rec).check()
    except TypeError as e:
        raise CheckpointError(f"{path}: bad view record {extra.get('views')}: {e}") from e
    secs = [extra.get(k) for k in ("seconds", "cache_seconds")]
    seconds = sum(secs) if all(isinstance(s, (int, float)) for s in secs) else None
    return vcfg, seconds


def run(a: argparse.Namespace) -> int:
    """Run the command with parsed options ``a`` (what ``flowcodec.cli`` calls)."""
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    if a.threads:
        torch.set_num_threads(a.threads)
    seconds, budget_from = a.seconds, "--seconds" if a.seconds else None
    if a.coop:
        vcfg, coop_seconds = read_coop_record(a.coop)
        if seconds is None and coop_seconds:
            seconds, budget_from = coop_seconds, str(a.coop)
    else:
        vcfg = ViewConfig(devices=a.devices, area=a.area, jitter=a.jitter, noise=a.noise,
                          seed=a.view_seed)
    views = ViewGenerator(vcfg)
    cfg = FinetuneConfig(**{k: getattr(a, k) for k in FinetuneConfig.__dataclass_fields__
                            if k not in ("time_budget", "channels_last")},
                         time_budget=seconds, channels_last=not a.no_channels_last).check()
    fam = load_pretrained(a.family, progress=not a.no_progress).eval()
    train, test = load_dataset(a.family)
    if a.train_n:
        train = train.subset(a.train_n, seed=cfg.seed)
    model, res = finetune_member(fam, views, train, test, cfg, checkpoint=a.out,
                                 resume=a.resume, progress=not a.no_progress)
    best = max(range(len(res.after)), key=lambda k: res.after[k]) if res.after else None
    extra = {"train": asdict(cfg), "budget_from": budget_from, "history": res.history,
             "seconds": round(res.seconds, 1), "steps": res.steps, "epochs": res.epochs,
             "images_per_s": round(res.images_per_s, 1), "train_n": len(train),
             "eval_n": min(cfg.eval_n, len(test)), "shipped_view_accuracy": res.before,
             "view_accuracy": res.after, "best_position": best}
    path = save_finetuned(model, a.out, fam, vcfg, extra)
    print(json.dumps({"checkpoint": str(path), "epochs": res.epochs, "steps": res.steps,
                      "seconds": round(res.seconds, 1),
                      "images_per_s": round(res.images_per_s, 1),
                      "shipped_view_accuracy": [round(v, 4) for v in res.before],
                      "view_accuracy": [round(v, 4) for v in res.after]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
