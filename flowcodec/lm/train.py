"""Training the language family: every exit at once, resumable, within a time budget.

The loss is a weighted mean of the exits' next-character cross-entropies (by default
weighted toward the last exit), so members share one trunk trained for all of them.
AdamW with a linear warmup and a cosine decay to ``min_lr``; float32 throughout.

A run with ``checkpoint="runs/lm"`` writes ``runs/lm-state.safetensors`` (weights,
optimizer moments, the sampler's random state) and ``runs/lm-state.json`` (step, elapsed
seconds, history, SHA-256 of the tensors) every ``checkpoint_every`` steps and at the end;
``resume=True`` continues from it and reaches the same weights as an uninterrupted run
(the batches come from one seeded generator whose state is saved).

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("shakespeare-char", dim=16, heads=2, depths=(1, 1), context=8,
...                    chars="ab")
>>> ids = torch.randint(0, 2, (500,))
>>> res = train_lm(fam, ids, ids[:100], LMTrainConfig(steps=3, batch_size=4, context=8,
...                warmup=1, progress=False))
>>> len(res.val_loss), res.steps
(2, 3)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.family.checkpoint import load_family, save_checkpoint, weights_sha256
from flowcodec.family.lm import LanguageFamily
from flowcodec.lm.data import eval_windows, sample_windows
from flowcodec.progress import tqdm

__all__ = ["LMTrainConfig", "LMTrainResult", "train_lm", "evaluate_lm", "save_lm", "load_lm",
           "lr_at"]  # fmt: skip

LN2 = math.log(2.0)


@dataclass
class LMTrainConfig:
    """Settings of :func:`train_lm`.

    ``context`` defaults to the family's; ``exit_weights`` (one per member) default to
    ``1, ..., 1, 2`` (the last exit counts twice), normalised to sum 1. ``seconds`` is a
    wall-clock budget (resumed runs count their earlier time): the learning rate's cosine
    follows it when it is the tighter limit, and training stops at the first step boundary
    past it. ``eval_windows``: validation windows of the periodic checks
    (the final evaluation reads the whole validation text)."""

    steps: int = 3000
    batch_size: int = 32
    context: int | None = None
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    exit_weights: tuple[float, ...] | None = None
    eval_every: int = 250
    eval_windows: int = 64
    checkpoint_every: int = 200
    seconds: float | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def validate(self, members: int, family_context: int) -> None:
        bad = []
        for name in ("steps", "batch_size", "eval_every", "eval_windows", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad.append(f"{name}={v!r} (an int >= 1)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            bad.append(f"warmup={self.warmup!r} (an int >= 0)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            bad.append(f"lr={self.lr!r}, min_lr={self.min_lr!r} (0 <= min_lr <= lr, lr > 0)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            bad.append("weight_decay and grad_clip must be >= 0")
        if self.context is not None and not 1 <= self.context <= family_context:
            bad.append(f"context={self.context!r} (1..{family_context}, the family's)")
        if self.exit_weights is not None and (
            len(self.exit_weights) != members or min(self.exit_weights) < 0
            or sum(self.exit_weights) <= 0
        ):  # fmt: skip
            bad.append(f"exit_weights={self.exit_weights!r} ({members} weights >= 0, sum > 0)")
        if self.seconds is not None and self.seconds <= 0:
            bad.append(f"seconds={self.seconds!r} (> 0 or None)")
        if bad:
            raise ConfigError("bad LMTrainConfig: " + "; ".join(bad))

    def weights(self, members: int) -> list[float]:
        w = list(self.exit_weights) if self.exit_weights else [1.0] * (members - 1) + [2.0]
        return [x / sum(w) for x in w]


@dataclass
class LMTrainResult:
    """Validation loss per member in nats per character (``val_loss``) and bits per
    character (``val_bits``), steps run, seconds (all runs together) and the history of
    periodic checks ``[{"step", "train_loss", "val_loss"}]``."""

    val_loss: list[float]
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def val_bits(self) -> list[float]:
        return [v / LN2 for v in self.val_loss]


def lr_at(step: int, cfg: LMTrainConfig, elapsed: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    With a time budget (``cfg.seconds``) the cosine follows whichever runs out first, the
    steps or the seconds (``elapsed`` of them spent), so a run stopped by its budget still
    ends annealed."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.seconds:
        t = max(t, min(1.0, elapsed / cfg.seconds))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate_lm(family: LanguageFamily, ids: torch.Tensor, context: int | None = None,
                batch_size: int = 32, max_windows: int | None = None) -> list[float]:  # fmt: skip
    """Mean next-character loss (nats) of every member over ``ids`` cut into consecutive
    windows of ``context`` characters (the family's by default; each window starts
    without history, the usual convention). ``max_windows`` takes evenly spaced windows."""
    context = context or family.context
    starts = eval_windows(ids, context, max_windows, " to evaluate")
    was = family.training
    family.eval()
    dev = next(family.parameters()).device
    totals = torch.zeros(family.num_members, dtype=torch.float64)
    count = 0
    try:
        for i in range(0, len(starts), batch_size):
            idx = starts[i : i + batch_size].unsqueeze(1) + torch.arange(context + 1)
            w = ids[idx].to(dev)
            for k, logits in enumerate(family(w[:, :-1])):
                totals[k] += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(),
                                             reduction="sum").double().cpu()  # fmt: skip
            count += w[:, 1:].numel()
    finally:
        family.train(was)
    return [float(t / count) for t in totals]


def _state_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(checkpoint)
    return p.parent / f"{p.name}-state.safetensors", p.parent / f"{p.name}-state.json"


def _save_state(checkpoint, family, opt, gen, step, seconds, history, cfg) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in family.state_dict().items()}
    for i, st in enumerate(_opt_states(opt)):
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    weights, meta = _state_paths(checkpoint)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_m = (p.parent / f"{p.name}.tmp" for p in (weights, meta))
    save_file(tensors, str(tmp_w))
    record = {"step": step, "seconds": seconds, "history": history, "config": asdict(cfg),
              "family": family.config, "sha256": weights_sha256(tmp_w)}  # fmt: skip
    tmp_m.write_text(json.dumps(record, indent=1))
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta)


def _opt_states(opt) -> list[dict]:
    return [opt.state.get(p, {}) for g in opt.param_groups for p in g["params"]]


def _load_state(checkpoint, family, opt, gen) -> tuple[int, float, list]:
    from safetensors.torch import load as load_bytes

    weights, meta = _state_paths(checkpoint)
    try:
        record = json.loads(meta.read_text())
        data = weights.read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the training state {meta}: {e}") from e
    if record.get("sha256") != weights_sha256(data):
        raise CheckpointError(f"{weights} does not match the SHA-256 in {meta.name}")
    if record.get("family") != json.loads(json.dumps(family.config)):
        raise CheckpointError(f"{meta} was made for family {record.get('family')}, "
                              f"not {family.config}")  # fmt: skip
    t = load_bytes(data)
    try:
        family.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            st = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"opt.{i}.")}
            if st:
                opt.state[p] = {k: (v if k != "step" else v.float()) for k, v in st.items()}
        gen.set_state(t["rng"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{weights} does not fit this family or optimizer: {e}") from e
    return int(record["step"]), float(record["seconds"]), list(record.get("history", []))


def train_lm(family: LanguageFamily, train_ids: torch.Tensor, val_ids: torch.Tensor,
             cfg: LMTrainConfig | None = None, checkpoint: str | os.PathLike | None = None,
             resume: bool = False) -> LMTrainResult:  # fmt: skip
    """Train every exit of ``family`` on random windows of ``train_ids``; returns the
    validation loss per member on the whole of ``val_ids`` (the family ends in eval mode).

    ``checkpoint``: where the training state is saved (see the module docstring);
    ``resume``: continue from it when it exists."""
    cfg = cfg or LMTrainConfig()
    cfg.validate(family.num_members, family.context)
    if resume and checkpoint is None:
        raise ConfigError("resume=True needs a checkpoint path")
    context = cfg.context or family.context
    weights = cfg.weights(family.num_members)
    family.to(cfg.device).train()
    decay = [p for p in family.parameters() if p.ndim >= 2]
    rest = [p for p in family.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    step, spent, history = 0, 0.0, []
    if resume and _state_paths(checkpoint)[1].is_file():
        step, spent, history = _load_state(checkpoint, family, opt, gen)
    t0 = time.perf_counter() - spent
    bar = tqdm(total=cfg.steps, initial=step, desc="train lm", disable=not cfg.progress)
    recent: list[float] = []
    while step < cfg.steps:
        if cfg.seconds is not None and time.perf_counter() - t0 >= cfg.seconds:
            break
        x, y = sample_windows(train_ids, cfg.batch_size, context, gen)
        x, y = x.to(cfg.device), y.to(cfg.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, time.perf_counter() - t0)
        loss = sum(w * F.cross_entropy(lg.flatten(0, 1), y.flatten())
                   for w, lg in zip(weights, family(x), strict=True))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(family.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        recent.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate_lm(family, val_ids, context, max_windows=cfg.eval_windows)
            history.append({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                            "train_loss": round(sum(recent) / len(recent), 4),
                            "val_loss": [round(v, 4) for v in val]})  # fmt: skip
            recent = []
            bar.set_postfix(val=" ".join(f"{v:.3f}" for v in val))
        if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save_state(checkpoint, family, opt, gen, step, time.perf_counter() - t0, history,
                        cfg)  # fmt: skip
    bar.close()
    if checkpoint is not None:
        _save_state(checkpoint, family, opt, gen, step, time.perf_counter() - t0, history, cfg)
    family.eval()
    val = evaluate_lm(family, val_ids, context)
    return LMTrainResult(val, step, time.perf_counter() - t0, history)


def save_lm(family: LanguageFamily, path: str | os.PathLike, val_ids: torch.Tensor | None = None,
            result: LMTrainResult | None = None, half: bool = True, **extra) -> Path:  # fmt: skip
    """Save the family (float16 weights by default) with its JSON config. With ``val_ids``
    the validation loss per member is measured on the weights as stored (after rounding
    to float16) and recorded as ``val_loss_nats`` and ``val_bits_per_char``."""
    info: dict = {"members": [vars(m) for m in family.info()], "flops": "per token"}
    if val_ids is not None:
        probe = _rounded_copy(family) if half else family
        val = evaluate_lm(probe, val_ids)
        info["val_loss_nats"] = [round(v, 4) for v in val]
        info["val_bits_per_char"] = [round(v / LN2, 4) for v in val]
    if result is not None:
        info.update(train_steps=result.steps, train_seconds=round(result.seconds, 1),
                    history=result.history)  # fmt: skip
    if half:
        info["stored_as"] = "float16"
    info.update(extra)
    return save_checkpoint(family, path, "family", family.config, info, half=half)


def _rounded_copy(family: LanguageFamily) -> LanguageFamily:
    from flowcodec.family.zoo import build_family

    cfg = {k: v for k, v in family.config.items() if k != "name"}
    copy = build_family(family.config["name"], **cfg)
    copy.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                          for k, v in family.state_dict().items()})  # fmt: skip
    return copy.to(next(family.parameters()).device).eval()


def load_lm(path: str | os.PathLike) -> LanguageFamily:
    """Load a family saved by :func:`save_lm` (checked against its SHA-256; eval mode)."""
    fam = load_family(path)
    if not isinstance(fam, LanguageFamily):
        raise CheckpointError(f"{path} holds a {type(fam).__name__}, not a language family")
    return fam
