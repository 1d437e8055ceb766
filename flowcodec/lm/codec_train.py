"""Training and measuring the language family's hidden-state codec
(:class:`~flowcodec.lm.codec.HiddenStateCodec`).

:func:`train_hidden_codec` trains a codec against the frozen family: the larger member's
output on the decoded states is distilled towards its output on the true states, plus
``lambda * bits`` for each rate point; :func:`evaluate_hidden_codec` measures the whole
bits-per-token curve from real bytes against the member's loss on the validation text, and
:func:`write_curve` writes it as JSON and CSV.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowcodec.errors import ConfigError
from flowcodec.lm.codec import TEXT_BITS_PER_CHAR, HiddenStateCodec

__all__ = ["HiddenCodecTrainConfig", "HiddenCodecTrainResult", "train_hidden_codec",
           "evaluate_hidden_codec", "write_curve"]


# --- training ----------------------------------------------------------------------------------
@dataclass
class HiddenCodecTrainConfig:
    """Settings of :func:`train_hidden_codec` (plain values, saved with the checkpoint).

    ``lams``: the rate weight of each rate point, in nats (of the distillation loss per
    token) per bit per token, rate point 0 (the lowest rate) first; their count is the
    codec's ``rates``. Each step draws ``batch_size`` windows of ``context`` tokens (the
    family's by default) and gives an equal share of them to every rate point (so
    ``batch_size`` is rounded up to a multiple of the rate points). The rate term is off for
    the first ``rate_warmup`` share of the run and ramps in over the next one. ``seconds``
    is a wall-clock budget: the learning rate's cosine follows whichever of steps and
    seconds runs out first (as in :func:`flowcodec.lm.train.lr_at`); the entropy models'
    densities and the rate points' gains learn at ``fast_lr`` times that rate."""

    lams: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003)
    latent: int = 32
    hidden: int = 256
    condition: bool = True
    steps: int = 2000
    batch_size: int = 16
    context: int | None = None
    lr: float = 2e-3
    min_lr: float = 1e-4
    fast_lr: float = 5.0
    warmup: int = 50
    rate_warmup: float = 0.1
    kd: float = 1.0
    ce: float = 0.0
    mse: float = 0.1
    temperature: float = 1.0
    grad_clip: float = 1.0
    seconds: float | None = None
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 16
    checkpoint_every: int = 100
    device: str = "cpu"
    progress: bool = True

    @property
    def rates(self) -> int:
        return len(self.lams)

    def validate(self, family_context: int) -> None:
        """ConfigError naming every bad field."""
        bad = []
        if not self.lams or any(not isinstance(v, int | float) or not math.isfinite(v) or v < 0
                                for v in self.lams):  # fmt: skip
            bad.append(f"lams={self.lams!r} (numbers >= 0, one per rate point)")
        elif len(self.lams) > 127:
            bad.append(f"lams: {len(self.lams)} rate points, at most 127")
        for name in ("latent", "hidden", "steps", "batch_size", "eval_every", "eval_windows",
                     "checkpoint_every"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad.append(f"{name}={v!r} (an int >= 1)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            bad.append(f"warmup={self.warmup!r} (an int >= 0)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            bad.append(f"lr={self.lr!r}, min_lr={self.min_lr!r} (0 <= min_lr <= lr, lr > 0)")
        if not 0 <= self.rate_warmup < 0.5:
            bad.append(f"rate_warmup={self.rate_warmup!r} (in [0, 0.5))")
        for name in ("kd", "ce", "mse", "grad_clip", "fast_lr"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v >= 0:
                bad.append(f"{name}={v!r} (>= 0)")
        if self.kd == 0 and self.ce == 0:
            bad.append("kd and ce are both 0 (nothing ties the codec to the task)")
        if not self.temperature > 0:
            bad.append(f"temperature={self.temperature!r} (> 0)")
        if self.context is not None and (not isinstance(self.context, int)
                                         or not 1 <= self.context <= family_context):
            bad.append(f"context={self.context!r} (1..{family_context}, the family's)")
        if self.seconds is not None and not self.seconds > 0:
            bad.append(f"seconds={self.seconds!r} (> 0 or None)")
        if bad:
            raise ConfigError("bad HiddenCodecTrainConfig: " + "; ".join(bad))


@dataclass
class HiddenCodecTrainResult:
    """Steps run, seconds (resumed runs count their earlier time) and the history of
    periodic checks ``[{"step", "seconds", "loss", "kd", "bits_per_token", "eval"}]``."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


class _StateOf:
    """What :mod:`flowcodec.lm.train`'s training-state helpers need of a model, for a codec
    (its state dict and its config as a plain dict)."""

    def __init__(self, codec: HiddenStateCodec) -> None:
        self.codec = codec
        self.config = codec.config()

    def state_dict(self):
        return self.codec.state_dict()

    def load_state_dict(self, state):
        return self.codec.load_state_dict(state)


def _lr(step: int, cfg: HiddenCodecTrainConfig, elapsed: float) -> tuple[float, float]:
    """(learning rate, share of the run done) at ``step`` after ``elapsed`` seconds."""
    t = step / cfg.steps
    if cfg.seconds:
        t = max(t, elapsed / cfg.seconds)
    t = min(1.0, t)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup, t
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)), t


def _windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return ids[starts.unsqueeze(1) + torch.arange(context + 1)]


@torch.no_grad()
def _probe(codec, head, tail, val_ids, context: int, windows: int, dev) -> list[dict]:
    """Eval-mode forward on ``windows`` validation windows: the member's loss through the
    codec at each rate point and the *estimated* bits per token (real bytes come from
    :func:`evaluate_hidden_codec`)."""
    from flowcodec.lm.data import eval_windows

    was = codec.training
    codec.eval()
    w = _windows(val_ids, eval_windows(val_ids, context, windows), context).to(dev)
    x, y = w[:, :-1], w[:, 1:]
    h = head(x)
    base = F.cross_entropy(tail(h).flatten(0, 1), y.flatten()).item()
    out = []
    for r in range(codec.rates):
        o = codec(h, rate=r, ids=x)
        loss = F.cross_entropy(tail(o.features).flatten(0, 1), y.flatten()).item()
        out.append({"rate": r, "loss": round(loss, 4), "increase": round(loss - base, 4),
                    "est_bits_per_token": round(float(o.bits.sum()) / x.numel(), 2)})
    codec.train(was)
    return out


def train_hidden_codec(family, point: int, member: int | None = None,
                       train_ids: torch.Tensor | None = None, val_ids: torch.Tensor | None = None,
                       cfg: HiddenCodecTrainConfig | None = None,
                       codec: HiddenStateCodec | None = None,
                       checkpoint: str | os.PathLike | None = None,
                       resume: bool = False) -> tuple[HiddenStateCodec, HiddenCodecTrainResult]:
    """Train a hidden-state codec for split ``point`` of ``family``, for member ``member``'s
    tail (default the largest). Returns the codec (eval mode, tables frozen) and the result.

    Teacher forcing on random windows of ``train_ids``: the frozen head gives the states
    ``h`` and the member's tail on them the teacher's logits; the loss per rate point is

        kd * T^2 KL(teacher || tail(codec(h))) + ce * CE(tail(codec(h)), next)
            + mse * ||codec(h) - h||^2 / Var(h) + ramp * lams[r] * bits per token

    plus the entropy models' quantile loss. The family is frozen and left as it was (modes
    and ``requires_grad`` restored). ``codec``: continue training this one (default: a new
    codec from ``cfg`` started from the family's embeddings). ``checkpoint``: a path stem
    where the training state (``-state.safetensors`` / ``-state.json``, with SHA-256) is
    written every ``cfg.checkpoint_every`` steps; ``resume=True`` continues from it."""
    from flowcodec.family.lm import LanguageFamily
    from flowcodec.lm.data import sample_windows
    from flowcodec.lm.train import _load_state, _save_state, _state_paths
    from flowcodec.progress import tqdm
    from flowcodec.training import Frozen, kd_loss

    if not isinstance(family, LanguageFamily):
        raise ConfigError(f"train_hidden_codec needs a LanguageFamily, got {type(family).__name__}")
    member = family.num_members if member is None else member
    family._check_point(member, point)
    if point < 1 or point >= member:
        raise ConfigError(f"split point must be in 1..{member - 1} for member {member} (the "
                          f"codec replaces stages 1..point), got {point}")  # fmt: skip
    cfg = cfg or HiddenCodecTrainConfig()
    cfg.validate(family.context)
    if train_ids is None:
        raise ConfigError("train_hidden_codec needs train_ids (the training text as ids)")
    if resume and checkpoint is None:
        raise ConfigError("resume=True needs a checkpoint path")
    context = cfg.context or family.context
    dev = torch.device(cfg.device)
    if codec is None:
        codec = HiddenStateCodec(family.feature_shape(point), point=point, latent=cfg.latent,
                                 hidden=cfg.hidden, rates=cfg.rates, vocab=family.vocab,
                                 condition=cfg.condition).init_from(family)  # fmt: skip
    if not isinstance(codec, HiddenStateCodec) or codec.rates != cfg.rates:
        raise ConfigError(f"codec must be a HiddenStateCodec with {cfg.rates} rate points "
                          f"(one per lam)")  # fmt: skip
    if tuple(codec.feature_shape) != (family.context, family.dim) or codec.point != point:
        raise ConfigError(f"codec for {codec.feature_shape} at point {codec.point} does not "
                          f"fit this family's point {point} ({family.context}, {family.dim})")
    rates = cfg.rates
    per = -(-cfg.batch_size // rates)  # windows per rate point
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    frozen = Frozen(family)
    fam_device = next(family.parameters()).device
    try:
        family.to(dev)
        codec.to(dev).train()
        head, tail = family.split(member, point)
        head.eval()
        tail.eval()
        # the entropy models' densities and the gains learn faster than the transforms (a
        # short run must move the rate from the models' wide start to where lams put it)
        aux = [p for n, p in codec.named_parameters() if n.endswith("quantiles")]
        fast = [p for n, p in codec.named_parameters() if not n.endswith("quantiles")
                and (n.startswith("entropy_bottlenecks.") or n in ("gain", "inv_gain"))]
        seen = {id(p) for p in aux + fast}
        main = [p for p in codec.parameters() if id(p) not in seen]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": fast, "lr": cfg.fast_lr * cfg.lr},
                                {"params": aux, "lr": 1e-2}])  # fmt: skip
        step, spent, history = 0, 0.0, []
        saved = _StateOf(codec)
        if resume and _state_paths(checkpoint)[1].is_file():
            step, spent, history = _load_state(checkpoint, saved, opt, gen)
        # the states' spread, for the mse term (one fixed batch of the training text)
        probe_gen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            x0, _ = sample_windows(train_ids, 8, context, probe_gen)
            h0 = head(x0.to(dev))
            var = float(h0.var(dim=(0, 1)).mean().clamp_min(1e-8))
        t0 = time.perf_counter() - spent
        bar = tqdm(total=cfg.steps, initial=step, desc="train lm-hidden codec",
                   disable=not cfg.progress)  # fmt: skip
        recent: dict[str, list[float]] = {}
        while step < cfg.steps:
            elapsed = time.perf_counter() - t0
            if cfg.seconds is not None and elapsed >= cfg.seconds:
                break
            lr, done = _lr(step, cfg, elapsed)
            opt.param_groups[0]["lr"] = lr
            opt.param_groups[1]["lr"] = cfg.fast_lr * lr
            ramp = min(1.0, max(0.0, (done - cfg.rate_warmup) / max(cfg.rate_warmup, 1e-9)))
            x, y = sample_windows(train_ids, per * rates, context, gen)
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                h = head(x)
                teacher = tail(h) if cfg.kd else None
            feats, bits = [], []
            for r in range(rates):
                sl = slice(r * per, (r + 1) * per)
                o = codec(h[sl], rate=r, ids=x[sl])
                feats.append(o.features)
                bits.append(o.bits / context)  # bits per token, per window
            h_hat = torch.cat(feats)
            logits = tail(h_hat)
            loss = h_hat.new_zeros(())
            parts = {"kd": 0.0, "ce": 0.0, "mse": 0.0}
            for r in range(rates):
                sl = slice(r * per, (r + 1) * per)
                lg = logits[sl].flatten(0, 1)
                term = cfg.lams[r] * ramp * bits[r].mean()
                if cfg.kd:
                    kd = kd_loss(lg, teacher[sl].flatten(0, 1), cfg.temperature)
                    term = term + cfg.kd * kd
                    parts["kd"] += kd.item() / rates
                if cfg.ce:
                    ce = F.cross_entropy(lg, y[sl].flatten())
                    term = term + cfg.ce * ce
                    parts["ce"] += ce.item() / rates
                if cfg.mse:
                    mse = F.mse_loss(h_hat[sl], h[sl]) / var
                    term = term + cfg.mse * mse
                    parts["mse"] += mse.item() / rates
                loss = loss + term / rates
                recent.setdefault(f"bits_r{r}", []).append(bits[r].mean().item())
            opt.zero_grad(set_to_none=True)
            (loss + codec.aux_loss()).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(main + fast, cfg.grad_clip)
            opt.step()
            step += 1
            recent.setdefault("loss", []).append(loss.item())
            for k, v in parts.items():
                recent.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(recent['loss'][-20:]):.3f}",
                            kd=f"{np.mean(recent['kd'][-20:]):.3f}",
                            bits="/".join(f"{np.mean(recent[f'bits_r{r}'][-20:]):.0f}"
                                          for r in range(rates)))  # fmt: skip
            last = step == cfg.steps or (cfg.seconds is not None
                                         and time.perf_counter() - t0 >= cfg.seconds)
            if step % cfg.eval_every == 0 or last:
                rec = {"step": step, "seconds": round(time.perf_counter() - t0, 1)}
                for k, v in recent.items():
                    rec[k] = round(float(np.mean(v)), 4)
                recent = {}
                if val_ids is not None:
                    rec["eval"] = _probe(codec, head, tail, val_ids, context,
                                         cfg.eval_windows, dev)  # fmt: skip
                    bar.write("step {}: {}".format(step, "  ".join(
                        f"r{e['rate']}: +{e['increase']:.3f} nats @ {e['est_bits_per_token']:.1f} "
                        "b/tok" for e in rec["eval"])))  # fmt: skip
                history.append(rec)
            if checkpoint is not None and (step % cfg.checkpoint_every == 0 or last):
                _save_state(checkpoint, saved, opt, gen, step, time.perf_counter() - t0,
                            history, cfg)  # fmt: skip
        bar.close()
        seconds = time.perf_counter() - t0
        if checkpoint is not None:
            _save_state(checkpoint, saved, opt, gen, step, seconds, history, cfg)
    finally:
        family.to(fam_device)
        frozen.restore()
    codec.eval()
    codec.update(force=True)
    return codec, HiddenCodecTrainResult(step, seconds, history)


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_hidden_codec(family, codec: HiddenStateCodec, val_ids: torch.Tensor,
                          member: int | None = None, max_windows: int | None = None,
                          batch_size: int = 16, progress: bool = False,
                          flops: bool = True) -> dict:  # fmt: skip
    """The rate-loss curve of ``codec`` on ``val_ids``, teacher-forced, with real bytes.

    The text is cut into consecutive windows of the family's context (each starting without
    history, as :func:`flowcodec.lm.train.evaluate_lm` does; ``max_windows`` takes that many,
    evenly spaced). For each window the device's states at the codec's split point are
    compressed at each rate point (ids and positions as side information), decompressed,
    and run through the member's tail. Returns ``{"rows": [...], ...}`` with, per rate
    point: ``bits_per_token`` (``8 * len(to_bytes())`` per window over its tokens: header
    and framing included), ``session_bits_per_token`` (``to_compact()``: the header sent
    once per session), ``payload_bits_per_token``, ``est_bits_per_token`` (the entropy
    model's estimate), ``loss`` and ``loss_increase`` (nats per character against the
    member without the codec), ``top1_agreement`` (share of positions whose argmax equals
    the member's own); the device's own answer at equal device cost (``device_exit``: the
    loss and agreement of exit ``point``, the floor a codec must beat); the text baseline,
    the member's loss, and FLOPs per token (the
    shared blocks the edge skips, the codec's encoder and decoder; ``flops=False`` leaves
    them out, which spares the FLOP counter's import)."""
    from flowcodec.lm.data import eval_windows
    from flowcodec.progress import tqdm

    member = family.num_members if member is None else member
    point = codec.point
    family._check_point(member, point)
    if tuple(codec.feature_shape) != (family.context, family.dim):
        raise ConfigError(f"codec for {codec.feature_shape} does not fit this family "
                          f"({family.context}, {family.dim})")  # fmt: skip
    if codec.condition and codec.vocab != family.vocab:
        raise ConfigError(f"codec for vocab {codec.vocab}, family vocab {family.vocab}")
    context = family.context
    starts = eval_windows(val_ids, context, max_windows, " to evaluate a codec")
    fam_modes = [(m, m.training) for m in family.modules()]
    codec_was = codec.training
    family.eval()
    codec.eval()
    dev = next(family.parameters()).device
    head, tail = family.split(member, point)
    r_n = codec.rates
    sums = {k: torch.zeros(r_n, dtype=torch.float64)
            for k in ("full", "compact", "payload", "est", "nll", "agree")}  # fmt: skip
    base_nll, exit_nll, exit_agree, tokens = 0.0, 0.0, 0.0, 0
    t_code = 0.0
    try:
        bar = tqdm(total=len(starts), desc="eval lm-hidden codec", disable=not progress)
        for i in range(0, len(starts), batch_size):
            w = _windows(val_ids, starts[i : i + batch_size], context).to(dev)
            x, y = w[:, :-1], w[:, 1:]
            h = head(x)
            base = tail(h)
            base_nll += float(F.cross_entropy(base.flatten(0, 1).float(), y.flatten(),
                                              reduction="sum"))  # fmt: skip
            top = base.argmax(-1)
            own = family.exits[point - 1](h)  # the device's own answer at the split point
            exit_nll += float(F.cross_entropy(own.flatten(0, 1).float(), y.flatten(),
                                              reduction="sum"))  # fmt: skip
            exit_agree += float((own.argmax(-1) == top).sum())
            tokens += y.numel()
            for r in range(r_n):
                t = time.perf_counter()
                streams = codec.compress(h, rate=r, ids=x)
                h_hat = codec.decompress(streams, ids=x).to(dev)
                t_code += time.perf_counter() - t
                sums["full"][r] += sum(len(s.to_bytes()) for s in streams)
                sums["compact"][r] += sum(len(s.to_compact()) for s in streams)
                sums["payload"][r] += sum(len(s.packets[0]) for s in streams)
                sums["est"][r] += float(codec(h, rate=r, ids=x).bits.sum())
                lg = tail(h_hat)
                sums["nll"][r] += float(F.cross_entropy(lg.flatten(0, 1).float(), y.flatten(),
                                                        reduction="sum"))  # fmt: skip
                sums["agree"][r] += float((lg.argmax(-1) == top).sum())
            bar.update(len(w))
        bar.close()
    finally:
        for m, t in fam_modes:
            m.training = t
        codec.train(codec_was)
    loss0 = base_nll / tokens
    rows = []
    for r in range(r_n):
        loss = float(sums["nll"][r]) / tokens
        rows.append({"rate": r,
                     "bits_per_token": 8 * float(sums["full"][r]) / tokens,
                     "session_bits_per_token": 8 * float(sums["compact"][r]) / tokens,
                     "payload_bits_per_token": 8 * float(sums["payload"][r]) / tokens,
                     "est_bits_per_token": float(sums["est"][r]) / tokens,
                     "loss": loss, "loss_increase": loss - loss0,
                     "top1_agreement": float(sums["agree"][r]) / tokens})  # fmt: skip
    text = val_ids.numpy().astype(np.uint8).tobytes() if family.vocab <= 256 else None
    fl = codec.flops_per_token()
    counted = None
    if flops:
        counted = {"shared_blocks_skipped_by_edge": family.head_flops(point),
                   "member": family.info()[member - 1].flops,
                   "codec_encoder_device": fl["encoder"], "codec_decoder_edge": fl["decoder"]}
    return {"member": member, "point": point, "condition": codec.condition,
            "windows": len(starts), "tokens": tokens, "context": context,
            "loss_without_codec": loss0, "rows": rows,
            "device_exit": {"member": point, "loss": exit_nll / tokens,
                            "top1_agreement": exit_agree / tokens},
            "text_bits_per_char": TEXT_BITS_PER_CHAR,
            "text_zlib_bits_per_char": (8 * len(zlib.compress(text, 9)) / len(text)
                                        if text is not None else None),
            "flops_per_token": counted,
            "coding_seconds": round(t_code, 2)}  # fmt: skip


def write_curve(result: dict, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write an :func:`evaluate_hidden_codec` result as ``stem.json`` and ``stem.csv`` (one
    row per rate point, then the text baseline and the device's own exit); returns both
    paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jp, cp = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.csv"
    jp.write_text(json.dumps(result, indent=1))
    keys = ["rate", "bits_per_token", "session_bits_per_token", "payload_bits_per_token",
            "est_bits_per_token", "loss", "loss_increase", "top1_agreement"]
    with cp.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["scheme", *keys])
        for row in result["rows"]:
            wr.writerow(["codec", *(round(row[k], 5) if isinstance(row[k], float) else row[k]
                                    for k in keys)])  # fmt: skip
        wr.writerow(["text", "", result["text_bits_per_char"], "", "", "",
                     round(result["loss_without_codec"], 5), 0.0, 1.0])  # fmt: skip
        ex = result.get("device_exit")
        if ex:  # the device's own exit: no bits, the floor a codec must beat
            wr.writerow(["device-exit", "", 0, 0, 0, 0, round(ex["loss"], 5),
                         round(ex["loss"] - result["loss_without_codec"], 5),
                         round(ex["top1_agreement"], 5)])  # fmt: skip
    return jp, cp
