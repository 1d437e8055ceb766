"""Training learned codecs for the task (not for pixels), and evaluating any codec.

The loss is ``CE(tail(codec(head(x))), y) + kd * KD + beta * distill + lam * kbits``: the
larger member's task loss on the reconstructed features, optionally a logit-distillation
term (KL divergence from the larger member's own output on the true features, at
temperature ``temperature``), a feature-distillation term (MSE between reconstructed and
true features, divided by the features' mean square so that ``beta`` is scale-free), and
the estimated rate in kilobits per image. The family is frozen.

With ``views=K`` the frozen part is run once: the head's features (float16) and the larger
member's logits are computed for ``K`` augmented copies of the training set before the
first step, and epoch ``e`` trains on copy ``e mod K``. On a CPU this removes the head's
and the teacher's forward passes from every step, at a memory cost of
``K * N * C * H * W * 2`` bytes.

Example
-------
>>> from flowcodec.codecs import build_codec
>>> from flowcodec.codecs.train import train_codec
>>> from flowcodec.data import load_dataset
>>> from flowcodec.family import load_pretrained
>>> fam = load_pretrained("digits", progress=False)                   # doctest: +SKIP
>>> train, test = load_dataset("digits")                             # doctest: +SKIP
>>> codec = build_codec("factorized", (16, 8, 8), latent=8)          # doctest: +SKIP
>>> res = train_codec(codec, fam, 3, 1, train, test, lam=0.05, epochs=5)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flowcodec.codecs.base import FeatureCodec
from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.training import EpochLoop, Frozen, kd_loss

__all__ = ["CodecTrainResult", "CodecEval", "train_codec", "evaluate_codec", "collect_features",
           "cache_views", "save_views", "load_views"]  # fmt: skip


@dataclass
class CodecTrainResult:
    """What :func:`train_codec` measured.

    ``history`` holds one dict per epoch (``loss``, ``task``, ``kd``, ``distill``, ``kbits``);
    ``test_accuracy`` and ``est_bytes`` come from ``forward`` in eval mode on the test set
    (rounded latents, *estimated* rate from likelihoods; real bytes come from
    :func:`evaluate_codec`).
    """

    history: list[dict] = field(default_factory=list)
    test_accuracy: float | None = None
    est_bytes: float | None = None
    seconds: float = 0.0
    epochs: int = 0
    cache_seconds: float = 0.0


@torch.no_grad()
def collect_features(head, data: ArrayDataset, n: int | None = None, batch_size: int = 500,
                     device="cpu") -> torch.Tensor:  # fmt: skip
    """Features ``head(x)`` of ``n`` samples of ``data`` (all by default; otherwise a fixed
    random subset, :meth:`ArrayDataset.sample`), on CPU."""
    head.eval()
    out = [head(x).float().cpu()
           for x, _ in data.sample(n).batches(batch_size, device=device)]  # fmt: skip
    return torch.cat(out)


def _train_codec(
    codec: FeatureCodec,
    family,
    member: int,
    point: int,
    train: ArrayDataset,
    test: ArrayDataset | None = None,
    lam: float = 0.1,
    beta: float = 1.0,
    epochs: int = 10,
    device: str = "cpu",
    drop_prob: float = 0.0,
    flip_prob: float = 0.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    time_budget: float | None = None,
    max_steps: int | None = None,
    kd: float = 0.0,
    temperature: float = 2.0,
    views: int = 0,
    cache: list | None = None,
    dist=None,
    checkpoint=None,
    resume: bool = False,
    on_epoch=None,
) -> CodecTrainResult:
    """Train ``codec`` at split ``point`` of ``family`` for the tail of ``member``.

    ``drop_prob`` drops latent packets at random during training (robust codecs);
    ``flip_prob`` flips bits (binary codec; each batch draws a rate in ``[0, flip_prob]``).
    ``time_budget`` (seconds) fits the run, after every epoch, to the epochs that the rest
    of the budget allows at the last epoch's pace (the cosine schedule follows, so it still
    ends annealed; :class:`~flowcodec.training.EpochLoop`). ``max_steps`` caps the
    number of steps (smoke tests). ``kd`` weights logit distillation from the larger member
    on the true features; ``views`` caches that many augmented copies of the frozen part's
    outputs (see the module notes); ``cache`` passes such copies made earlier by
    :func:`cache_views` (for several codecs at the same split, or saved to disk). The codec
    is left in eval mode on ``device``. ``dist`` (a :class:`flowcodec.scale.ddp.Dist`, from
    ``from_env()`` under torchrun): this process trains on its share of every global batch
    with DistributedDataParallel; rank 0 draws the progress bar (docs/scale.md).
    ``checkpoint`` (a path without suffix): rank 0 writes the training state there after
    every epoch (:func:`flowcodec.scale.ddp.save_state`); with ``resume`` a saved state is
    loaded and training continues after its last epoch, ending where the uninterrupted run
    would have. ``on_epoch(record)`` is called after every epoch with its history record.
    """
    from flowcodec.scale.ddp import Dist, load_state, save_state

    dist = dist or Dist()

    if epochs < 1 or lam < 0 or beta < 0 or kd < 0 or views < 0 or temperature <= 0:
        raise ConfigError("epochs must be >= 1, lam, beta, kd and views >= 0, temperature > 0")
    if not 0 <= drop_prob < 1 or not 0 <= flip_prob < 0.5:
        raise ConfigError("drop_prob must be in [0, 1) and flip_prob in [0, 0.5)")
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    family.to(dev)  # frozen by train_codec
    head, tail = family.split(member, point)
    feats = collect_features(head, train, n=2000, device=dev)
    codec.to("cpu").fit(feats)
    power = float(feats.pow(2).mean())
    codec.to(dev).train()
    params = [p for n, p in codec.named_parameters() if not n.endswith("quantiles")]
    aux = [p for n, p in codec.named_parameters() if n.endswith("quantiles")]
    opt = torch.optim.Adam([{"params": params}, {"params": aux, "lr": 1e-2}], lr=lr)
    if len(train) < batch_size:
        raise ConfigError(f"{len(train)} training samples, fewer than one batch of {batch_size}")
    steps_per_epoch = len(train) // batch_size  # full batches only (drop_last)
    res = CodecTrainResult()
    model = dist.wrap(codec)  # the aux loss reaches the quantiles in the same backward
    loop = EpochLoop(steps_per_epoch, epochs, desc=f"train {codec.name}", progress=progress,
                     show=dist.is_main, time_budget=time_budget, max_steps=max_steps,
                     reduce_sum=dist.all_sum if dist.active else None,
                     reduce_max=dist.all_max if dist.active else None)  # fmt: skip
    warmup = min(200, loop.planned // 10)
    t_cache = time.perf_counter()
    if cache is None and views:
        cache = cache_views(head, tail, train, views, gen, dev, progress)
    views = len(cache) if cache else 0
    res.cache_seconds = time.perf_counter() - t_cache
    if checkpoint is not None and resume:
        saved = load_state(checkpoint, codec, opt, None, gen)
        if saved is not None:
            loop.resume(int(saved["epoch"]), saved["history"], int(saved["extra"]["step"]),
                        int(saved["extra"]["total"]))  # fmt: skip
    res.history = loop.history  # the same list: commit appends each epoch's record
    for epoch in loop.epochs():
        if cache is None:
            batches = _live_batches(head, tail if kd else None, train, batch_size, gen, dev)
        else:
            batches = _cached_batches(cache[(epoch - 1) % views], batch_size, gen, dev)
        for h, y, t_logits in loop.steps(batches):
            loop.set_lr(opt, [lr], warmup)
            fp = float(torch.rand((), generator=gen)) * flip_prob if flip_prob else 0.0
            h, y, t_logits = dist.shard(h, y, t_logits)
            out = model(h, drop_prob=drop_prob, flip_prob=fp, generator=gen)
            logits = tail(out.features)
            task = F.cross_entropy(logits, y)
            kd_term = kd_loss(logits, t_logits, temperature) if kd else torch.zeros(())
            distill = F.mse_loss(out.features, h) / power
            kbits = out.bits.mean() / 1000
            loss = task + kd * kd_term + beta * distill + lam * kbits
            aux_loss = codec.aux_loss().to(dev) if hasattr(codec, "aux_loss") else 0.0
            opt.zero_grad(set_to_none=True)
            (loss + aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            loop.add(len(y), loss=loss, task=task, kd=kd_term, distill=distill, kbits=kbits)
        rec = loop.record()
        loop.commit(rec, loss=f"{rec['loss']:.3f}", kbits=f"{rec['kbits']:.2f}")
        if checkpoint is not None:
            if dist.is_main:
                save_state(checkpoint, codec, opt, None, gen, epoch, res.history,
                           {"world": dist.world, "step": loop.step,
                            "total": loop.total})  # fmt: skip
            dist.barrier()
        if on_epoch is not None:
            on_epoch(rec)
    loop.close()
    res.seconds = loop.elapsed
    res.epochs = loop.epoch
    codec.eval()
    if test is not None:
        res.test_accuracy, res.est_bytes = _eval_forward(codec, head, tail, test, dev)
    return res


@functools.wraps(_train_codec)
def train_codec(codec, family, *args, **kwargs):
    # the family is frozen while the codec trains and left as it was (every module's mode
    # and every parameter's requires_grad), whether training returns or raises
    with Frozen(family):
        return _train_codec(codec, family, *args, **kwargs)



def _live_batches(head, teacher, train, batch_size, gen, dev):
    """``(h, y, teacher_logits or None)`` with the head (and teacher) run on each batch."""
    for x, y in train.batches(batch_size, shuffle=True, train=True, generator=gen,
                              device=dev, drop_last=True):  # fmt: skip
        with torch.no_grad():
            h = head(x)
            t = teacher(h) if teacher is not None else None
        yield h, y, t


@torch.no_grad()
def cache_views(head, tail, train: ArrayDataset, views: int,
                generator: torch.Generator | None = None, device="cpu",
                progress: bool = True) -> list[tuple[torch.Tensor, ...]]:  # fmt: skip
    """``views`` augmented copies of the training set through the frozen part: a list of
    ``(head(x) as float16, y, tail(head(x)))`` on CPU, for ``train_codec(cache=...)``
    (``torch.save`` keeps them for another run)."""
    from flowcodec.progress import tqdm

    gen, dev = generator, device
    out = []
    steps = views * math.ceil(len(train) / 500)
    with tqdm(total=steps, desc="cache features", disable=not progress, leave=False) as bar:
        for _ in range(views):
            hs, ys, ts = [], [], []
            for x, y in train.batches(500, shuffle=False, train=True, generator=gen,
                                      device=dev):  # fmt: skip
                h = head(x)
                hs.append(h.half().cpu())
                ts.append(tail(h).float().cpu())
                ys.append(y.cpu())
                bar.update(1)
            out.append((torch.cat(hs), torch.cat(ys), torch.cat(ts)))
    return out


_VIEW_PARTS = ("h", "y", "t")  # features (float16), labels, teacher logits


def save_views(cache: list, path) -> None:
    """Write :func:`cache_views` output as safetensors (never pickle)."""
    from safetensors.torch import save_file

    save_file({f"{i}.{k}": v.contiguous() for i, view in enumerate(cache)
               for k, v in zip(_VIEW_PARTS, view)}, str(path))  # fmt: skip


def load_views(path, views: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Read what :func:`save_views` wrote (the first ``views`` copies)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    n = len(saved) // len(_VIEW_PARTS)
    return [tuple(saved[f"{i}.{k}"] for k in _VIEW_PARTS) for i in range(n)][:views]


def _cached_batches(view, batch_size, gen, dev):
    hs, ys, ts = view
    order = torch.randperm(len(ys), generator=gen)
    for start in range(0, len(ys) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield hs[idx].to(dev).float(), ys[idx].to(dev), ts[idx].to(dev)


@torch.no_grad()
def _eval_forward(codec, head, tail, data, dev) -> tuple[float, float]:
    correct, bits, n = 0, 0.0, 0
    for x, y in data.batches(500, device=dev):
        out = codec(head(x))
        correct += int((tail(out.features).argmax(1) == y).sum())
        bits += float(out.bits.sum())
        n += len(y)
    return correct / n, bits / n / 8


@dataclass
class CodecEval:
    """Accuracy and measured rate of a codec over a data set (real bytes, headers included)."""

    accuracy: float
    bytes_per_image: float
    est_bytes_per_image: float | None
    n: int
    payload_bytes_per_image: float = 0.0
    session_bytes_per_image: float = 0.0  # Bitstream.to_compact(): header sent once


@torch.no_grad()
def evaluate_codec(codec: FeatureCodec, head, tail, data: ArrayDataset, batch_size: int = 256,
                   channel=None, transform=None, progress: bool = False) -> CodecEval:  # fmt: skip
    """Accuracy of ``tail(decompress(compress(head(x))))`` and real bytes per image.

    ``channel`` (optional) is called on each sample's list of framed packets and returns
    the delivered list (``None`` for lost packets), e.g. ``IIDPacketErasure.transmit``
    (its report is ignored); ``transform`` (optional) maps each Bitstream before decoding
    (e.g. bit flips). Rate is measured before the channel.
    """
    from flowcodec.bitstream import Bitstream
    from flowcodec.progress import tqdm

    codec.eval()
    head.eval()
    tail.eval()
    correct, nbytes, session, payload, est, n = 0, 0, 0, 0, 0.0, 0
    has_est = bool(getattr(codec, "entropy_bottleneck", None) is not None)
    for x, y in tqdm(data.batches(batch_size), total=math.ceil(len(data) / batch_size),
                     disable=not progress, leave=False, desc=f"eval {codec.name}"):  # fmt: skip
        h = codec.device_features(head, x)
        streams = codec.compress(h)
        nbytes += sum(len(s.to_bytes()) for s in streams)
        session += sum(s.compact_nbytes for s in streams)
        payload += sum(len(p) for s in streams for p in s.packets)
        if has_est:
            est += float(codec(h).bits.sum()) / 8
        if channel is not None:
            got = []
            for s in streams:
                delivered = channel(s.link_packets())
                if isinstance(delivered, tuple):
                    delivered = delivered[0]
                got.append(Bitstream.from_packets(s.header, delivered))
            streams = got
        if transform is not None:
            streams = [transform(s) for s in streams]
        h_hat = codec.decompress(streams)
        correct += int((tail(h_hat).argmax(1) == y).sum())
        n += len(y)
    return CodecEval(correct / n, nbytes / n, est / n if has_est else None, n, payload / n,
                     session / n)  # fmt: skip
