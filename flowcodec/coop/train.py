"""Joint training of the devices' task encoders and the edge fusion (cooperative inference).

The family stays frozen: each device's head and exit convolutions (its member's own), the
largest member's tail. What trains is each device kind's linear map to the latent, its gain
and entropy model, and the edge (per-kind decoders, pooling, synthesis decoder); with
``CoopConfig(tune_exit=True)`` also the devices' copies of their exit convolutions and exit
linear layer (plus ``own`` times the devices' own-answer cross-entropy), and with
``tune_tail=True`` the edge's copy of the largest member's tail (both at ``tune_lr``), on

    CE(tail(fuse(devices that arrived)), y) + kd * T^2 KL(member 3 on the full image || fused)
        + ramp(step) * lam * (sum of the devices' kbits per image)

with one shared ``lam`` for every device (the distributed rate-relevance trade-off), the
rate term off for the first ``warmup`` share of the steps and ramped in over the next one,
and *device dropout*: each device is left out of a sample's fusion with probability
``device_drop`` (at least one stays), so that the edge learns to answer from any subset.

Because what a device computes before its linear map is frozen, its pooled exit features of
``copies`` augmented copies of the training set are computed once (with the teacher's
logits on the full image) and cached; an epoch then costs only the edge's synthesis, the
tail's forward and backward, and small linear maps. ``--cache-file`` keeps the cache for
another run (safetensors). Training state is written after every epoch (``--resume``
continues a stopped run); ``--seconds`` fits the number of epochs to a time budget.

Example
-------
>>> TrainConfig(lam=0.5).check().lam
0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flowcodec.coop.fusion import CoopConfig, CoopModel, save_coop
from flowcodec.coop.views import ViewConfig, ViewGenerator, anchor_ids
from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.training import EpochLoop, kd_loss

__all__ = ["TrainConfig", "TrainResult", "build_cache", "train_coop", "evaluate_forward",
           "device_mask", "add_arguments", "run", "main"]


@dataclass
class TrainConfig:
    """Settings of :func:`train_coop` (plain values: saved with the checkpoint)."""

    lam: float = 0.5  # rate weight per kbit, shared by every device
    kd: float = 1.0
    temperature: float = 2.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    warmup: float = 0.15
    device_drop: float = 0.3
    copies: int = 2  # augmented copies of the training set in the feature cache (at most)
    cache_share: float = 0.35  # with a time budget: the most of it the cache may take
    seed: int = 0
    time_budget: float | None = None
    eval_n: int = 2000
    tune_lr: float = 2e-4  # pretrained parts that train (tune_exit / tune_tail models)
    own: float = 0.3  # weight of the devices' own-answer loss (tune_exit models only)

    def check(self) -> TrainConfig:
        bad = []
        if not math.isfinite(self.lam) or self.lam < 0:
            bad.append(f"lam must be >= 0, got {self.lam}")
        if self.kd < 0 or self.temperature <= 0:
            bad.append("kd must be >= 0 and temperature > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.copies < 1 or self.lr <= 0 \
                or self.tune_lr <= 0:
            bad.append("epochs, batch_size and copies must be >= 1, lr and tune_lr > 0")
        if not math.isfinite(self.own) or self.own < 0:
            bad.append(f"own must be >= 0, got {self.own}")
        if not 0 <= self.warmup < 0.5:
            bad.append(f"warmup must be in [0, 0.5), got {self.warmup}")
        if not 0 < self.cache_share <= 1:
            bad.append(f"cache_share must be in (0, 1], got {self.cache_share}")
        if not 0 <= self.device_drop < 1:
            bad.append(f"device_drop must be in [0, 1), got {self.device_drop}")
        if self.time_budget is not None and self.time_budget <= 0:
            bad.append("time_budget must be > 0 seconds")
        if bad:
            raise ConfigError("coop training: " + "; ".join(bad))
        return self


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cache_seconds: float = 0.0
    steps: int = 0
    epochs: int = 0
    images_per_s: float = 0.0


def device_mask(b: int, n: int, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``(b, n)``: each device kept with probability ``1 - drop``, at least one per row."""
    keep = torch.rand(b, n, generator=generator) >= drop
    none = ~keep.any(1)
    if none.any():
        pick = torch.randint(0, n, (b,), generator=generator)
        keep[none, pick[none]] = True
    return keep


@torch.no_grad()
def build_cache(model: CoopModel, kinds: tuple[str, ...], views: ViewGenerator,
                data: ArrayDataset, copies: int, generator: torch.Generator,
                train: bool = True, progress: bool = True, batch_size: int = 500,
                time_budget: float | None = None) -> dict:
    """Pooled device features of ``copies`` (augmented when ``train``) copies of ``data``:
    ``{"z{k}": (C, N, P_k) float16 per device slot k (with cells: the grid,
    ``(C, N, P_k, cells, cells)``; with ``tune_exit``, whose stems train, the features at
    the device's split point, :meth:`CoopModel.cache_shape`), "y": (C, N),
    "t": (C, N, classes) teacher logits on the full image}``. With ``time_budget``
    (seconds), copies after the first are made only while the next one is expected to end
    within it, so ``C`` may be less than ``copies``."""
    from flowcodec.progress import tqdm

    if len(kinds) != views.devices:
        raise ConfigError(f"{len(kinds)} device kinds for a view generator of "
                          f"{views.devices} devices")
    fam = model.family
    teacher = fam.member(model.cfg.member).eval()
    was = model.training
    model.eval()  # the frozen stems' batch norms use their running statistics
    n = len(data)
    zs = [[] for _ in kinds]
    ys, ts = [], []
    steps = copies * math.ceil(n / batch_size)
    with tqdm(total=steps, desc="cache device features", disable=not progress,
              leave=False) as bar:
        t0 = time.perf_counter()
        for c in range(copies):
            spent = time.perf_counter() - t0
            if c and time_budget is not None and spent * (c + 1) / c > time_budget:
                break
            at = 0
            for x, y in data.batches(batch_size, shuffle=False, train=train,
                                     generator=generator):
                idx = torch.arange(at, at + len(y)) + c * n
                at += len(y)
                v = views(x, idx)
                for k, kind in enumerate(kinds):
                    if model.cfg.tune_exit:
                        zs[k].append(model.device_features(kind, v[:, k]).half())
                    else:
                        zs[k].append(model.pooled(kind, v[:, k]).half())
                ys.append(y)
                ts.append(teacher(x).float())
                bar.update(1)
    model.train(was)
    made = len(ys) // math.ceil(n / batch_size)
    out = {f"z{k}": torch.cat(z).view(made, n, *model.cache_shape(kind))
           for k, (z, kind) in enumerate(zip(zs, kinds))}
    out["y"] = torch.cat(ys).view(made, n)
    out["t"] = torch.cat(ts).view(made, n, -1)
    return out


def _check_cache(cache: dict, kinds, model: CoopModel) -> None:
    need = [f"z{k}" for k in range(len(kinds))] + ["y", "t"]
    missing = [k for k in need if k not in cache]
    if missing:
        raise ConfigError(f"feature cache lacks {missing}")
    n = cache["y"].shape[1]
    for k, kind in enumerate(kinds):
        p = model.cache_shape(kind)
        if tuple(cache[f"z{k}"].shape[1:]) != (n, *p):
            raise ConfigError(f"feature cache z{k}: expected (copies, {n}, "
                              f"{', '.join(map(str, p))}), got {tuple(cache[f'z{k}'].shape)}")


def _pooled(model: CoopModel, kinds, zs):
    """Cache entries -> pooled features (the stems run here when they train)."""
    if not model.cfg.tune_exit:
        return zs
    return [model.pooled(kind, h=h) for kind, h in zip(kinds, zs)]


def _fuse(model: CoopModel, kinds, zs, mask, rate=None, anchors=None):
    lats, bits = [], []
    for kind, z in zip(kinds, zs):
        lat, b = model.latent(kind, z, rate)
        lats.append(lat)
        bits.append(b)
    return model.edge(lats, list(kinds), mask, anchors=anchors), torch.stack(bits, 1)


@torch.no_grad()
def evaluate_forward(model: CoopModel, kinds, cache: dict, n: int | None = None) -> dict:
    """Accuracy with every device, estimated bytes per device (rounded latents: the real
    bytes come from :mod:`flowcodec.coop.bench`), on copy 0 of a cache."""
    was = model.training
    model.eval()
    total = cache["y"].shape[1] if n is None else min(n, cache["y"].shape[1])
    correct, bits, agree = 0, 0.0, 0
    for s in range(0, total, 500):
        e = min(total, s + 500)
        zs = _pooled(model, kinds, [cache[f"z{k}"][0, s:e].float() for k in range(len(kinds))])
        out, b = _fuse(model, kinds, zs, None)
        y = cache["y"][0, s:e]
        correct += int((out.logits.argmax(1) == y).sum())
        agree += int((out.logits.argmax(1) == cache["t"][0, s:e].argmax(1)).sum())
        bits += float(b.sum())
    model.train(was)
    return {"accuracy": correct / total, "teacher_agreement": agree / total,
            "est_bytes_per_device": bits / total / len(kinds) / 8, "n": total}


def train_coop(model: CoopModel, kinds: tuple[str, ...], views: ViewGenerator,
               train: ArrayDataset, test: ArrayDataset | None = None,
               cfg: TrainConfig | None = None, checkpoint: str | Path | None = None,
               resume: bool = False, cache: dict | None = None, progress: bool = True,
               cache_file: str | Path | None = None) -> TrainResult:
    """Train ``model`` (devices of ``kinds``, one per view slot) on ``train``.

    The family is frozen and restored afterwards (modes and ``requires_grad``).
    ``checkpoint`` (a path without suffix) gets the training state after every epoch;
    ``resume`` continues from it. ``cache`` / ``cache_file``: a feature cache made by
    :func:`build_cache` (the file is written when missing, read when present)."""
    from flowcodec.scale.ddp import load_state, save_state

    cfg = (cfg or TrainConfig()).check()
    kinds = tuple(kinds)
    if len(kinds) != views.devices or len(kinds) > model.cfg.max_devices:
        raise ConfigError(f"{len(kinds)} device kinds for {views.devices} views and a model "
                          f"fusing up to {model.cfg.max_devices}")
    for k in kinds:
        model._kind(k)
    fam = model.family
    was, flags = fam.training, [p.requires_grad for p in fam.parameters()]
    fam.eval()
    for p in fam.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    res = TrainResult()
    try:
        model.set_prior(train.labels)
        t0 = time.perf_counter()
        if cache is None and cache_file is not None and Path(cache_file).is_file():
            cache = _load_cache(cache_file, cfg, views, model.cfg.cells, model.cfg.tune_exit)
        if cache is None:
            budget = None if cfg.time_budget is None else cfg.cache_share * cfg.time_budget
            cache = build_cache(model, kinds, views, train, cfg.copies, gen, True, progress,
                                time_budget=budget)
            if cache_file is not None:
                _save_cache(cache, cache_file, cfg, views, model.cfg.cells, model.cfg.tune_exit)
        _check_cache(cache, kinds, model)
        test_cache = None
        if test is not None and cfg.eval_n:
            sub = test.sample(cfg.eval_n)  # not the first N: the split is stored by class
            test_cache = build_cache(model, kinds, views, sub, 1, gen, False, False)
        res.cache_seconds = time.perf_counter() - t0
        copies, n = cache["y"].shape
        per_epoch = n // cfg.batch_size
        if per_epoch < 1:
            raise ConfigError(f"{n} training samples, fewer than one batch ({cfg.batch_size})")
        trainable = [p for p in model.parameters() if p.requires_grad]
        aux = [p for name, p in model.named_parameters() if name.endswith("quantiles")]
        tuned = model.pretrained_parameters()  # they start trained: a smaller step
        skip = {id(p) for p in aux + tuned}
        main = [p for p in trainable if id(p) not in skip]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": tuned, "lr": cfg.tune_lr},
                                {"params": aux, "lr": 1e-2}])
        budget = None if cfg.time_budget is None else cfg.time_budget - res.cache_seconds
        loop = EpochLoop(per_epoch, cfg.epochs, desc="train coop", progress=progress,
                         time_budget=budget)  # fmt: skip
        if checkpoint is not None and resume:
            saved = load_state(checkpoint, model, opt, None, gen)
            if saved is not None:
                same = int(saved["extra"].get("planned", -1)) == loop.planned  # its budget
                loop.resume(int(saved["epoch"]), saved["history"], int(saved["extra"]["step"]),
                            int(saved["extra"]["total"]) if same else None)  # fmt: skip
        res.history = loop.history
        trained = 0
        for epoch in loop.epochs():
            model.train()
            if not model.cfg.tune_exit:  # frozen stems keep their BN statistics
                for d in model.devices.values():
                    d.codec.g_a.stem.eval()
            c = (epoch - 1) % copies
            order = torch.randperm(n, generator=gen)
            for s in loop.steps(range(0, n - cfg.batch_size + 1, cfg.batch_size)):
                step, total = loop.step, loop.total
                idx = order[s:s + cfg.batch_size]
                zs = _pooled(model, kinds,
                             [cache[f"z{k}"][c, idx].float() for k in range(len(kinds))])
                y, t = cache["y"][c, idx], cache["t"][c, idx]
                loop.set_lr(opt, [cfg.lr, cfg.tune_lr], min(200, total // 20))
                ramp = min(1.0, max(0.0, (step / total - cfg.warmup) / max(cfg.warmup, 1e-9)))
                mask = device_mask(len(y), len(kinds), cfg.device_drop, gen)
                out, bits = _fuse(model, kinds, zs, mask)
                task = F.cross_entropy(out.logits, y)
                kd = kd_loss(out.logits, t, cfg.temperature) if cfg.kd else task.new_zeros(())
                kbits = bits.sum(1).mean() / 1000
                loss = task + cfg.kd * kd + ramp * cfg.lam * kbits
                if model.cfg.tune_exit and cfg.own:  # keep each device's own answer
                    own = sum(F.cross_entropy(model.own_logits(kind, z), y)
                              for kind, z in zip(kinds, zs)) / len(kinds)
                    loss = loss + cfg.own * own
                aux_loss = sum(d.codec.aux_loss() for d in model.devices.values())
                opt.zero_grad(set_to_none=True)
                (loss + aux_loss).backward()
                torch.nn.utils.clip_grad_norm_(main, 5.0)
                opt.step()
                trained += len(y)
                loop.add(len(y), loss=loss, task=task, kd=kd, kbits=kbits)
            rec = loop.record(copy=c)
            rec["est_bytes_per_device"] = rec.get("kbits", 0.0) * 125 / len(kinds)
            if test_cache is not None:
                rec["eval"] = evaluate_forward(model, kinds, test_cache)
            ev = rec.get("eval", {})
            loop.commit(rec, line=f"epoch {epoch}: loss {rec['loss']:.3f} task {rec['task']:.3f} "
                                  f"{rec['est_bytes_per_device']:.1f} B/device "
                                  f"{rec['seconds']:.0f}s "
                                  + (f"test {100 * ev['accuracy']:.1f}% at "
                                     f"{ev['est_bytes_per_device']:.1f} B/device" if ev else ""))
            if checkpoint is not None:
                save_state(checkpoint, model, opt, None, gen, epoch, res.history,
                           {"step": loop.step, "total": loop.total, "planned": loop.planned})
        loop.close()
        res.seconds = loop.elapsed
        res.steps, res.epochs = loop.step, loop.epoch
        res.images_per_s = trained / max(res.seconds, 1e-9)
        model.eval()
        model.update(force=True)
        return res
    finally:
        fam.train(was)
        for p, f in zip(fam.parameters(), flags):
            p.requires_grad_(f)


def _cache_meta(cfg: TrainConfig, views: ViewGenerator, cells: int = 1,
                tune_exit: bool = False) -> dict:
    """What a cache file must have been made with to be reused (the copies it holds may
    be fewer than asked: a time budget cut them). ``cells`` is recorded when above 1 and
    the split-point features of a ``tune_exit`` cache as ``features``, so the caches made
    before either existed still match a cells-1, frozen-exit run."""
    meta = {"seed": str(cfg.seed), "views": json.dumps(views.cfg.record(), sort_keys=True)}
    if cells != 1:
        meta["cells"] = str(cells)
    if tune_exit:
        meta["features"] = "split point"
    return meta


def _save_cache(cache: dict, path, cfg, views, cells: int = 1, tune_exit: bool = False) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    save_file({k: v.contiguous() for k, v in cache.items()}, str(tmp),
              metadata=_cache_meta(cfg, views, cells, tune_exit))
    os.replace(tmp, path)


def _load_cache(path, cfg, views, cells: int = 1, tune_exit: bool = False) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        want = _cache_meta(cfg, views, cells, tune_exit)
        if meta != want:
            raise ConfigError(f"{path}: a feature cache made with {meta}, not {want}; remove "
                              "it or name another file")
        cache = {k: f.get_tensor(k) for k in f.keys()}
    return {k: v[:cfg.copies] for k, v in cache.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to ``p`` (``flowcodec.cli`` reuses them)."""
    p.add_argument("--family", default="cifar10",
                   help="trained family (data set of the same name)")
    p.add_argument("--devices", type=int, default=4, help="devices K (1..4)")
    p.add_argument("--kinds", nargs="+", default=["m2"],
                   help="device kind per slot (one name: every device)")
    p.add_argument("--latent", type=int, default=10,
                   help="numbers a device codes (10: its latent map costs what member 2's "
                        "exit linear layer does, so a device spends exactly member 2's FLOPs)")
    p.add_argument("--cells", type=int, default=1,
                   help="1: a device sends one pooled vector; 2..4: a cells x cells grid of "
                        "LATENT numbers each, placed at the edge by the device's anchor")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tune-exit", action="store_true",
                   help="train the devices' exit convolutions and own-answer layer with the "
                        "fusion (the cache then holds split-point features)")
    p.add_argument("--tune-tail", action="store_true",
                   help="the edge trains its own copy of the largest member's tail")
    p.add_argument("--vote", action="store_true",
                   help="the edge adds the mean of a linear vote per device (from its latent) "
                        "to the tail's logits")
    p.add_argument("--area", type=float, default=ViewConfig.area)
    p.add_argument("--jitter", type=float, default=ViewConfig.jitter)
    p.add_argument("--noise", type=float, default=ViewConfig.noise)
    p.add_argument("--view-seed", type=int, default=0)
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in ("time_budget",):
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--seconds", type=float, default=None, help="time budget (whole run)")
    p.add_argument("--train-n", type=int, default=None, help="train on a subset (smoke runs)")
    p.add_argument("--out", required=True, help="checkpoint path without suffix")
    p.add_argument("--cache-file", default=None, help="feature cache (safetensors)")
    p.add_argument("--resume", action="store_true")
    from flowcodec.sweeps import add_common_arguments

    add_common_arguments(p, threads=None)  # --threads (default: torch's), --no-progress


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowcodec.coop.train",
                                description="Train cooperative device encoders and edge "
                                            "fusion (docs/cooperative.md).")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """``python -m`` entry point: parse ``argv`` and :func:`run`."""
    return run(_parser().parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Run the command with parsed options ``a`` (what ``flowcodec.cli`` calls)."""
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = tuple(a.kinds) * a.devices if len(a.kinds) == 1 else tuple(a.kinds)
    vcfg = ViewConfig(devices=a.devices, area=a.area, jitter=a.jitter, noise=a.noise,
                      seed=a.view_seed)
    views = ViewGenerator(vcfg)
    tcfg = TrainConfig(**{k: getattr(a, k) for k in TrainConfig.__dataclass_fields__
                          if k != "time_budget"}, time_budget=a.seconds).check()
    fam = load_pretrained(a.family, progress=not a.no_progress).eval()
    train, test = load_dataset(a.family)
    if a.train_n:
        train = train.subset(a.train_n, seed=tcfg.seed)
    model = CoopModel(fam, CoopConfig(kinds=tuple(dict.fromkeys(kinds)), max_devices=4,
                                      latent=a.latent, dim=a.dim, hidden=a.hidden,
                                      cells=a.cells, tune_exit=a.tune_exit,
                                      tune_tail=a.tune_tail, vote=a.vote))
    res = train_coop(model, kinds, views, train, test, tcfg, checkpoint=a.out,
                     resume=a.resume, progress=not a.no_progress, cache_file=a.cache_file)
    extra = {"train": asdict(tcfg), "views": vcfg.record(), "kinds": list(kinds),
             "anchors": list(anchor_ids(a.devices)),
             "history": res.history, "seconds": round(res.seconds, 1),
             "cache_seconds": round(res.cache_seconds, 1), "steps": res.steps,
             "images_per_s": round(res.images_per_s, 1), "train_n": len(train)}
    path = save_coop(model, a.out, extra)
    last = res.history[-1] if res.history else {}
    print(json.dumps({"checkpoint": str(path), "epochs": res.epochs, "steps": res.steps,
                      "seconds": round(res.seconds, 1),
                      "cache_seconds": round(res.cache_seconds, 1),
                      "images_per_s": round(res.images_per_s, 1),
                      "eval": last.get("eval")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
