"""Training a variable-rate :class:`~flowcodec.codecs.task.TaskCodec` for the task.

Every step draws a fresh augmented batch (live crops and flips: no cached views), runs the
frozen head to the split point and the larger member on the true features (the teacher),
and trains the codec at one rate point (cycled step by step) on

    CE(tail(codec(h)), y) + kd * T^2 KL(teacher || student) + beta * ||h_hat - h||^2 / E[h^2]
        + ramp(step) * lams[r] * kbit/image

The rate term is off for the first ``warmup`` share of the steps and ramps in over the next
one (a rate term from the first step collapses a small bottleneck). ``bf16=True`` runs the
family and the codec's transforms under CPU/GPU bfloat16 autocast (the entropy models stay
in float32); on this project's CPUs with AVX-512 BF16 it doubles the step rate.

Example
-------
>>> from flowcodec.codecs.train_task import TaskTrainConfig
>>> TaskTrainConfig(lams=(2.0, 1.0, 0.5)).rates
3
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flowcodec.codecs.task import TaskCodec
from flowcodec.codecs.train import collect_features
from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.training import (
    EpochLoop,
    Frozen,
    TrainRecord,
    check_distill_settings,
    kd_loss,
    lr_at,
)

__all__ = ["TaskTrainConfig", "TaskTrainResult", "train_task_codec", "eval_task_forward",
           "fit_context", "warm_start", "save_progress", "stage_stem", "lift_codec",
           "extend_rates"]


@dataclass
class TaskTrainConfig:
    """Settings of :func:`train_task_codec` (all plain values: saved with the checkpoint)."""

    lams: tuple[float, ...] = (3.0, 1.5, 0.8, 0.4, 0.2)  # rate weight per kbit, rate 0 first
    kd: float = 1.0
    temperature: float = 2.0
    beta: float = 0.1
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    stem_lr: float = 5e-4
    warmup: float = 0.1
    drop_prob: float = 0.0
    drop_share: float = 0.5  # share of steps that simulate packet loss (when drop_prob > 0)
    bf16: bool = False
    seed: int = 0
    time_budget: float | None = None
    eval_every: int = 1
    eval_n: int = 1000
    # train only the receiver's decoder (new layers at lr, the rest of it at stem_lr): the
    # encoder, gains and entropy models stay frozen in eval mode, so the bytes do not change
    decoder_only: bool = False

    @property
    def rates(self) -> int:
        return len(self.lams)

    def check(self) -> None:
        if not self.lams or any(not math.isfinite(v) or v < 0 for v in self.lams):
            raise ConfigError(f"lams must be non-negative numbers, got {self.lams}")
        check_distill_settings(self)
        if not 0 <= self.drop_prob < 1 or not 0 <= self.drop_share <= 1:
            raise ConfigError("drop_prob must be in [0, 1) and drop_share in [0, 1]")
        if not 0 <= self.warmup < 0.5:
            raise ConfigError("warmup must be in [0, 0.5)")


@dataclass
class TaskTrainResult(TrainRecord):
    """Per-epoch history (losses, estimated bits per rate point, forward-pass accuracy)."""


@torch.no_grad()
def eval_task_forward(codec: TaskCodec, head, tail, data: ArrayDataset, n: int | None = None,
                      device="cpu") -> list[dict]:  # fmt: skip
    """Accuracy and *estimated* bytes per rate point from ``forward`` in eval mode (rounded
    latents; real bytes come from ``evaluate_codec``)."""
    codec.eval()
    out = []
    for r in range(codec.rates):
        correct, bits, seen = 0, 0.0, 0
        for x, y in data.sample(n).batches(500, device=device):
            o = codec(codec.device_features(head, x), rate=r)
            correct += int((tail(o.features).argmax(1) == y).sum())
            bits += float(o.bits.sum())
            seen += len(y)
        out.append({"rate": r, "accuracy": correct / seen, "est_bytes": bits / seen / 8})
    return out


def train_task_codec(codec: TaskCodec, family, member: int, point: int, train: ArrayDataset,
                     test: ArrayDataset | None = None, cfg: TaskTrainConfig | None = None,
                     device: str = "cpu", progress: bool = True,
                     checkpoint: str | Path | None = None,
                     cache: list | None = None) -> TaskTrainResult:  # fmt: skip
    """Train ``codec`` at split ``point`` of ``family`` for member ``member``'s tail.

    The family is frozen and left as it was (modes and ``requires_grad`` restored).
    ``checkpoint`` (a path without suffix) gets the codec's weights (safetensors) and the
    history (JSON) after every epoch, so a long run can be inspected while it trains.
    ``cache``: augmented copies of ``train`` already through the head and the teacher
    (what :func:`~flowcodec.codecs.train.cache_views` returns for this member and point);
    epoch ``e`` then trains on copy ``(e - 1) % len(cache)`` instead of running the head
    live (one-view codecs only).
    """
    cfg = cfg or TaskTrainConfig(lams=tuple([0.5] * codec.rates))
    cfg.check()
    if cfg.rates != codec.rates:
        raise ConfigError(f"{cfg.rates} lams for a codec with {codec.rates} rate points")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"{len(train)} training samples, fewer than one batch")
    if cache is not None:
        _check_cache(cache, codec, cfg.batch_size)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    codec_flags = [p.requires_grad for p in codec.parameters()]
    frozen = Frozen(family.to(dev))
    try:
        head, tail = family.split(member, point)
        feats = collect_features(head, train, n=2000, device=dev)
        codec.to("cpu").fit(feats)
        power = float(feats.pow(2).mean())
        codec.to(dev)
        if cfg.decoder_only:  # main: the decoder's last module (e.g. a Lift); stem: the rest
            for p in codec.parameters():
                p.requires_grad_(False)
            dec = list(codec.g_s.children())
            main = list((dec[-1] if len(dec) > 1 else codec.g_s).parameters())
            ids = {id(p) for p in main}
            stem = [p for p in codec.g_s.parameters() if id(p) not in ids] + [codec.inv_gain]
            aux = []
            for p in main + stem:
                p.requires_grad_(True)
        else:
            stem = [p for n, p in codec.named_parameters() if n.startswith("g_a.stem")]
            aux = [p for n, p in codec.named_parameters() if n.endswith("quantiles")]
            seen_ids = {id(p) for p in stem + aux}
            main = [p for p in codec.parameters() if id(p) not in seen_ids]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": stem, "lr": cfg.stem_lr},
                                {"params": aux, "lr": 1e-2}])  # fmt: skip
        base_lrs = [cfg.lr, cfg.stem_lr]
        views = getattr(codec, "views", 1)
        per_epoch = (len(train) if cache is None else len(cache[0][1])) // cfg.batch_size
        res = TaskTrainResult()
        amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        loop = EpochLoop(per_epoch, cfg.epochs, desc="train task codec", progress=progress,
                         time_budget=cfg.time_budget)  # fmt: skip
        res.history = loop.history  # the same list: commit appends each epoch's record
        for epoch in loop.epochs():
            if cfg.decoder_only:  # rounded latents, frozen encoder; only g_s trains
                codec.eval()
                codec.g_s.train()
            else:
                codec.train()
            for m in codec.g_a.stem.modules():  # keep the stem's BN statistics fixed
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
            batches = _task_batches(train, cache, epoch, cfg.batch_size, gen, dev)
            for x, y, t_cached in loop.steps(batches):
                step, total = loop.step, loop.total
                r = step % codec.rates
                loop.set_lr(opt, base_lrs, min(200, total // 20))
                ramp = min(1.0, max(0.0, (step / total - cfg.warmup) / max(cfg.warmup, 1e-9)))
                drop = cfg.drop_prob if float(torch.rand((), generator=gen)) < cfg.drop_share \
                    else 0.0
                with torch.no_grad(), torch.autocast(**amp):
                    # the views' features (B, V*C, H, W); V = 1: head(x); cached: x is h
                    h = x if t_cached is not None else codec.device_features(head, x)
                    per_view = h.reshape(len(h) * views, -1, *h.shape[2:])  # (B*V, C, H, W)
                    teacher = (t_cached if t_cached is not None else
                               tail(per_view).float().reshape(len(h), views, -1).mean(1)
                               if cfg.kd else None)  # fmt: skip
                    target = per_view.float().reshape(len(h), views, *per_view.shape[1:]).mean(1)
                h = h.float()
                with torch.autocast(**amp):
                    out = codec(h, rate=r, drop_prob=drop, generator=gen)
                    logits = tail(out.features).float()
                task = F.cross_entropy(logits, y)
                kd = kd_loss(logits, teacher, cfg.temperature) if cfg.kd else logits.new_zeros(())
                distill = F.mse_loss(out.features.float(), target) / power
                kbits = out.bits.mean() / 1000
                rate_w = 0.0 if cfg.decoder_only else ramp * cfg.lams[r]  # frozen rate
                loss = task + cfg.kd * kd + cfg.beta * distill + rate_w * kbits
                opt.zero_grad(set_to_none=True)
                (loss if cfg.decoder_only else loss + codec.aux_loss()).backward()
                torch.nn.utils.clip_grad_norm_(main + stem, 5.0)
                opt.step()
                loop.add(len(y), loss=loss, task=task, kd=kd, distill=distill)
                loop.add(1, **{f"kbits_r{r}": kbits})  # a mean over this rate's steps
            rec = loop.record()
            if test is not None and cfg.eval_every and epoch % cfg.eval_every == 0:
                with torch.autocast(**amp):
                    rec["eval"] = eval_task_forward(codec, head, tail, test, cfg.eval_n, dev)
            ev = " ".join(f"r{e['rate']}:{100 * e['accuracy']:.1f}%/{e['est_bytes']:.1f}B"
                          for e in rec.get("eval", []))  # fmt: skip
            loop.commit(rec, line=f"epoch {epoch}: loss {rec['loss']:.3f} task {rec['task']:.3f} "
                                  f"kd {rec['kd']:.3f} {rec['seconds']:.0f}s {ev}",
                        loss=f"{rec['loss']:.3f}")  # fmt: skip
            if checkpoint is not None:
                save_progress(codec, cfg, res, checkpoint)
        res.finish(loop)
        codec.eval()
        return res
    finally:
        frozen.restore()
        for p, f in zip(codec.parameters(), codec_flags):
            p.requires_grad_(f)


def _check_cache(cache: list, codec: TaskCodec, batch_size: int) -> None:
    if getattr(codec, "views", 1) != 1:
        raise ConfigError("a feature cache trains one-view codecs only "
                          f"(this codec codes {codec.views} views)")  # fmt: skip
    if not cache:
        raise ConfigError("the feature cache is empty")
    for i, view in enumerate(cache):
        if len(view) != 3 or tuple(view[0].shape[1:]) != tuple(codec.feature_shape):
            raise ConfigError(f"feature cache copy {i}: expected (features, labels, teacher "
                              f"logits) with features of shape {tuple(codec.feature_shape)}, "
                              f"got {[tuple(v.shape) for v in view]}")  # fmt: skip
        if not len(view[0]) == len(view[1]) == len(view[2]) or len(view[1]) < batch_size:
            raise ConfigError(f"feature cache copy {i}: {len(view[1])} samples with "
                              f"{len(view[0])} features and {len(view[2])} teacher rows; "
                              f"need equal counts and at least one batch ({batch_size})")


def _task_batches(train: ArrayDataset, cache, epoch: int, batch_size: int, gen, dev):
    """``(x, y, None)`` of live augmented batches, or ``(h, y, teacher_logits)`` of one
    cached copy (copy ``(epoch - 1) % len(cache)``)."""
    if cache is None:
        for x, y in train.batches(batch_size, shuffle=True, train=True, generator=gen,
                                  device=dev, drop_last=True):  # fmt: skip
            yield x, y, None
        return
    from flowcodec.codecs.train import _cached_batches

    yield from _cached_batches(cache[(epoch - 1) % len(cache)], batch_size, gen, dev)


def save_progress(codec, cfg, res, path) -> None:
    """Write a training run's weights (safetensors; empty tables left out) and its config and
    history (JSON) to ``<path>.progress.*``: what ``--finalize`` resumes from."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()
             if v.numel() > 0}  # fmt: skip
    save_file(state, str(path.with_suffix(".progress.safetensors")))
    path.with_suffix(".progress.json").write_text(json.dumps(
        {"config": asdict(cfg), "history": res.history}, indent=1))


def fit_context(codec: TaskCodec, head, train: ArrayDataset, steps: int = 1500,
                batch_size: int = 1024, lr: float = 3e-3, passes: int = 1, seed: int = 0,
                device="cpu", progress: bool = True) -> list[dict]:  # fmt: skip
    """Fit the channel-wise context models of a trained ``codec`` (built with
    ``context=True``; its transforms and factorized tables frozen, ``update()`` done).

    The symbols each rate point sends are computed once for ``passes`` augmented copies of
    ``train``; each rate point's context model then minimises their code length. Returns,
    per rate point, the mean bits per sample under the factorized tables and under the
    context model on those symbols (estimates; real bytes come from ``compress``).
    """
    from flowcodec.progress import tqdm

    if not codec.context:
        raise ConfigError("fit_context needs a codec built with context=True")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    codec.to(dev).eval()
    head.to(dev).eval()
    ks: list[list[torch.Tensor]] = [[] for _ in range(codec.rates)]
    with torch.no_grad():
        for _ in range(passes):
            for x, _y in tqdm(train.batches(500, shuffle=True, train=True, generator=gen,
                                            device=dev), disable=not progress, leave=False,
                              desc="context symbols"):  # fmt: skip
                h = codec.device_features(head, x).float()
                for r in range(codec.rates):
                    ks[r].append(codec.symbols(h, r))
    report = []
    for r in range(codec.rates):
        k = torch.cat(ks[r]).float().to(dev)
        ctx = codec.contexts[r]
        ctx.train()
        opt = torch.optim.Adam(ctx.parameters(), lr=lr)
        for step in tqdm(range(steps), disable=not progress, leave=False, desc=f"context r{r}"):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, min(100, steps // 10))
            idx = torch.randint(0, len(k), (batch_size,), generator=gen).to(dev)
            loss = codec.context_bits(k[idx], r).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ctx.eval()
        with torch.no_grad():
            sample = k[:20000]
            lo, hi = codec.support(r)
            rows, _ = codec._tables(r)
            fact = 0.0
            for i in range(codec.n_sym):
                row = torch.tensor(rows[i], dtype=torch.float64)
                p = (row[1:] - row[:-1]) / 65536
                fact += float(-torch.log2(p[(sample[:, i] - lo[i]).long().cpu()]).sum())
            report.append({"rate": r, "factorized_bits": fact / len(sample),
                           "context_bits": float(codec.context_bits(sample, r).mean())})
    codec._ctx64_cache = None
    return report


@torch.no_grad()
def warm_start(codec: TaskCodec, source: TaskCodec | str) -> str:
    """Start ``codec`` from a trained task codec (an object or a zoo name): its weights are
    copied wherever names and shapes match, and every stem block ``codec`` has in addition
    starts as the identity (a 3x3 convolution with a centred identity kernel and a
    BatchNorm that passes its input through; the stem's inputs are non-negative, so the
    block's ReLU changes nothing). ``codec`` then computes exactly what ``source`` does, and
    training goes on from there. Returns a one-line summary.

    Raises :class:`ConfigError` for a new layer that has no identity (e.g. a wider block).
    """
    if isinstance(source, str):
        from flowcodec.codecs.zoo import load_pretrained_codec

        name, source = source, load_pretrained_codec(source)
    else:
        name = type(source).__name__
    src = {k: v.float() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    dst = codec.state_dict()
    tables = ("_offset", "_quantized_cdf", "_cdf_length")  # rebuilt by update()
    taken = {k: v for k, v in src.items() if k in dst and v.shape == dst[k].shape}
    fresh = sorted({k.rsplit(".", 1)[0] for k in dst
                    if k not in taken and not k.endswith(tables)})  # fmt: skip
    for mod_name in fresh:
        m = codec.get_submodule(mod_name)
        if not (mod_name.startswith("g_a.stem.") and (
                isinstance(m, torch.nn.BatchNorm2d) or
                (isinstance(m, torch.nn.Conv2d) and m.in_channels == m.out_channels))):
            raise ConfigError(f"warm start from {name}: new layer {mod_name} "
                              f"({type(m).__name__}) has no identity start")  # fmt: skip
    codec.load_state_dict(taken, strict=False)
    for mod_name in fresh:
        m = codec.get_submodule(mod_name)
        if isinstance(m, torch.nn.Conv2d):
            m.weight.zero_()
            for i in range(m.out_channels):
                m.weight[i, i, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1.0
            if m.bias is not None:
                m.bias.zero_()
        else:
            m.weight.fill_(1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0 - m.eps)
    return f"{len(taken)} tensors from {name}; identity start: {', '.join(fresh) or 'none'}"


def stage_stem(stages) -> tuple[list, list]:
    """Task-codec stem entries that compute a family's trunk ``stages`` (modules made of
    conv3x3-BN-ReLU layers, 2x2 max-pools and residual blocks), and the stages' conv/BN
    layers in the order the stem holds them. ConfigError for any other layer."""
    from torch import nn

    from flowcodec.family.zoo import Residual

    entries: list = []
    layers: list = []

    def walk(m: nn.Module) -> None:
        if isinstance(m, Residual):
            entries.append(["res", 0])
            layers.extend(x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.BatchNorm2d)))
        elif isinstance(m, nn.Sequential):
            for child in m.children():
                walk(child)
        elif isinstance(m, nn.Conv2d):
            entries.append([m.out_channels, False])
            layers.append(m)
        elif isinstance(m, nn.MaxPool2d) and entries and entries[-1][0] != "res":
            entries[-1][1] = True
        elif isinstance(m, nn.BatchNorm2d):
            layers.append(m)
        elif not isinstance(m, nn.ReLU):
            raise ConfigError(f"a task codec's stem cannot copy a {type(m).__name__} layer")

    for stage in stages:
        walk(stage)
    return entries, layers


@torch.no_grad()
def lift_codec(source: TaskCodec | str, family, point: int) -> tuple[TaskCodec, dict]:
    """A task codec at split ``point`` of ``family`` built from a trained task codec of a
    later split point (an object or a zoo name): its stem is a copy of the trunk's stages in
    between (in a branching family, those on the path to the later point, ``family.path``;
    ConfigError when the source's point is on no path through ``point``) followed by the
    source's stem, its entropy models and gains are the source's, and its decoder is the
    source's followed by a fresh :class:`~flowcodec.codecs.task.Lift` back to ``point``'s
    shape. It sends exactly the source's symbols (checked here on random inputs; ConfigError
    otherwise), so training only its decoder (``TaskTrainConfig(decoder_only=True)``) keeps
    the source's bytes. Returns ``(codec, kwargs)``, the kwargs that rebuild it."""

    if isinstance(source, str):
        from flowcodec.codecs.zoo import load_pretrained_codec

        source = load_pretrained_codec(source)
    source = source.float().eval()
    if source.grid != 1 or source.via is not None:
        raise ConfigError("lift_codec: the source must have a vector latent and no lift")
    was_training = family.training
    family.eval()
    try:
        return _lift(source, family, point)
    finally:
        family.train(was_training)


def _lift(source: TaskCodec, family, point: int) -> tuple[TaskCodec, dict]:
    from flowcodec.codecs import build_codec

    x = torch.rand(4, *family.input_shape, generator=torch.Generator().manual_seed(0))
    n = len(family.stages)
    shapes = [tuple(family.feature_shape(q)) for q in range(n)]
    same = [q for q in range(point + 1, n) if shapes[q] == tuple(source.feature_shape)]
    if not 0 <= point < n or not same:
        raise ConfigError(f"lift_codec: the source's features {source.feature_shape} are at no "
                          f"split point of the family after {point}")  # fmt: skip
    # the stages in between are those of member q's path (family.path(q)) after point
    later = [q for q in same if point in family.path(q)]
    if not later:
        raise ConfigError(
            f"lift_codec: the source's features {source.feature_shape} are at split point(s) "
            f"{same} after point {point}, on no path through it ("
            + "; ".join(f"member {q}: path {family.path(q)}" for q in same)
            + f"); point {point}'s features are finished by member {family.receiver(point)} "
            f"(family.receiver({point})), on another branch")  # fmt: skip
    q = later[0]
    between = list(family.split(q, point)[1].stages)  # member q's stages after point
    entries, _ = stage_stem(between)
    kwargs = {k: v for k, v in source.config().items() if k not in ("name", "feature_shape")}
    if "context" in kwargs:
        kwargs["context_hidden"] = kwargs.pop("context")
        kwargs["context"] = True
    kwargs.update(stem=entries + [list(e) for e in source.stem_spec],
                  via=list(source.feature_shape))  # fmt: skip
    codec = build_codec("task", shapes[point], **kwargs)
    # the stages' conv/BN layers, then the source's stem, into the stem in order
    copied = codec.g_a.load_stem_from(torch.nn.ModuleList([*between, source.g_a.stem]))
    ours = [m for m in codec.g_a.stem.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]  # fmt: skip
    if copied != len(ours):
        raise ConfigError("lift_codec: the stages' layers do not line up with the stem")
    codec.g_a.proj.load_state_dict(source.g_a.proj.state_dict())
    codec.g_s[0].load_state_dict(source.g_s.state_dict())
    tables = ("_offset", "_quantized_cdf", "_cdf_length")  # rebuilt by update()
    rest = {k: v for k, v in source.state_dict().items()
            if k.startswith(("gain", "inv_gain", "entropy_bottlenecks.", "contexts."))
            and not k.endswith(tables)}  # fmt: skip
    codec.load_state_dict(rest, strict=False)
    codec.conceal.zero_()
    codec.update(force=True)
    codec.eval()
    h1 = family.features(x, point)
    h2 = family.features(x, q)
    for r in range(codec.rates):
        if not torch.equal(codec.symbols(h1, r), source.symbols(h2, r)):
            raise ConfigError(f"lift_codec: the built encoder does not send the source's "
                              f"symbols at rate point {r} (a stage layer it cannot copy?)")
    return codec, kwargs



@torch.no_grad()
def extend_rates(source: TaskCodec | str, ladder, packets: int | None = None) -> tuple[TaskCodec,
                                                                                         dict]:
    """A task codec whose rate point ``j`` starts as ``source``'s rate point ``ladder[j][0]``
    with its gain multiplied by ``2 ** ladder[j][1]`` (``+1``: a quantisation step half as
    wide, about one more bit for every channel in use), from a trained ``source`` (an object
    or a zoo name; its context models are not copied). Every other weight is the source's.

    The entropy model of a moved rate point is rescaled exactly: a factorized prior's first
    layer multiplies its input by ``softplus(m)``, so ``softplus(m') = softplus(m) / s`` models
    ``s * y`` as the source modelled ``y``; its quantiles are scaled by ``s``. A ladder that
    keeps every point of the source (shift 0) then codes those points as the source does, and
    training goes on from there (e.g. to learn the new points' rate and the decoder's use of
    them). Returns ``(codec, kwargs)``, the kwargs that rebuild it.
    """
    from flowcodec.codecs import build_codec

    if isinstance(source, str):
        from flowcodec.codecs.zoo import load_pretrained_codec

        source = load_pretrained_codec(source)
    source = source.float().eval()
    try:
        ladder = [(int(r), float(k)) for r, k in ladder]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"extend_rates: ladder must list (source rate, log2 gain shift) "
                          f"pairs, got {ladder!r}") from e  # fmt: skip
    if not ladder or any(not 0 <= r < source.rates or not math.isfinite(k) or abs(k) > 16
                         for r, k in ladder):  # fmt: skip
        raise ConfigError(f"extend_rates: ladder entries need a source rate in "
                          f"0..{source.rates - 1} and a shift in [-16, 16], got {ladder}")
    kwargs = {k: v for k, v in source.config().items()
              if k not in ("name", "feature_shape", "context")}  # fmt: skip
    kwargs["rates"] = len(ladder)
    if packets is not None:
        kwargs["packets"] = int(packets)
    codec = build_codec("task", source.feature_shape, **kwargs)
    src = source.state_dict()
    per_rate = ("gain", "inv_gain", "entropy_bottlenecks.", "contexts.")
    codec.load_state_dict({k: v for k, v in src.items() if not k.startswith(per_rate)},
                          strict=False)  # fmt: skip
    codec.conceal.copy_(source.conceal)
    for j, (r, k) in enumerate(ladder):
        shift = k * math.log(2.0)
        codec.gain[j] = source.gain[r] + shift
        codec.inv_gain[j] = source.inv_gain[r] - shift
        eb, sb = codec.entropy_bottlenecks[j], source.entropy_bottlenecks[r]
        eb.load_state_dict({n: v for n, v in sb.state_dict().items()
                            if not n.endswith(("_offset", "_quantized_cdf", "_cdf_length"))},
                           strict=False)  # fmt: skip
        scale = 2.0 ** k
        m0 = F.softplus(sb._matrix0) / scale
        eb._matrix0.copy_(torch.log(torch.expm1(m0)))  # softplus^-1
        eb.quantiles.copy_(sb.quantiles * scale)
    codec.update(force=True)
    return codec.eval(), kwargs
