"""``cifar10-air``: a CIFAR-10 family trained with a fast modern recipe, whose largest member
runs at the edge or in the cloud and stands far above the device members.

The recipe follows the facts published with airbench (Keller Jordan, the
KellerJordan/cifar10-airbench repository: 94 % with test-time views in about 10 epochs, 95 %
with wider blocks in 15): a first 2x2 convolution initialised to whiten image patches and kept
frozen (its bias trains for the first epochs), convolution groups of conv - max pool - BN -
GELU - conv - BN - GELU with identity-initialised filters, batch norms without a trained
scale and with a fast running average, Nesterov SGD with the learning rate, momentum and
weight decay given per 1,024 examples and decoupled from each other, a 64 x larger learning
rate for the batch-norm biases, label smoothing 0.2, a triangular learning-rate schedule, a
lookahead average of the weights every 5 steps, translations by up to 2 pixels (reflect
padding) and left-right flips that alternate every epoch. Every exit is trained jointly
(weighted sum of their losses), so the device members keep a trunk they can finish from.

The family (three members, the split points after stage 1 and stage 2):

- stage 1 (device): whitening conv 3 -> 24 (2 x 2), GELU, a group 24 -> ``widths[0]``
  (32 -> 31 -> 15 pixels);
- stage 2 (device): a group ``widths[0] -> widths[1]`` (15 -> 7);
- stage 3 (edge or cloud): a group ``widths[1] -> widths[2]`` (7 -> 3) then ``extra``
  residual pairs of 3 x 3 convolutions at ``widths[2]``;
- exits 1 and 2: a group to ``exit_widths[i]`` channels, global max pool, a linear layer;
  exit 3: global max pool and a linear layer; every exit's logits are scaled by 1/9.

The default widths keep member 1 under the ``cifar10`` family's member 1 FLOPs (96.1 M) and
member 2 under its member 2 (152.8 M), so devices pay no more than before.

Example
-------
>>> from flowcodec.family import build_family
>>> fam = build_family("cifar10-air")
>>> [round(m.flops / 1e6) for m in fam.info()][:2]
[91, 131]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.family.zoo import Scale, register_family

__all__ = ["AirConfig", "air_family", "airbench_net", "train_air", "whiten_init", "ConvGroup"]


class _BN(nn.BatchNorm2d):
    """Batch norm with a fixed scale of 1 (only the bias trains) and a fast running average."""

    def __init__(self, c: int, momentum: float = 0.4) -> None:
        super().__init__(c, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """3 x 3 'same' convolution without bias; its first ``cin`` filters start as identities."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """conv -> 2x2 max pool -> BN -> GELU -> conv -> BN -> GELU (halves the map)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.pool, self.bn1 = _conv(cin, cout), nn.MaxPool2d(2), _BN(cout)
        self.conv2, self.bn2, self.act = _conv(cout, cout), _BN(cout), nn.GELU()

    def forward(self, x):
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class _Pair(nn.Module):
    """``x + f(x)``, ``f`` two conv -> BN -> GELU at constant width and size."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(_conv(c, c), _BN(c), nn.GELU(), _conv(c, c), _BN(c), nn.GELU())

    def forward(self, x):
        return x + self.f(x)


def _head(c: int, classes: int) -> list[nn.Module]:
    return [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, classes, bias=False),
            Scale(1 / 9)]  # fmt: skip


@register_family("cifar10-air")
def air_family(widths: tuple[int, int, int] | list[int] = (64, 128, 512),
               exit_widths: tuple[int, int] | list[int] = (128, 256), extra: int = 1,
               classes: int = 10) -> EarlyExitFamily:  # fmt: skip
    """Build the family (fresh weights; the whitening conv is set by :func:`whiten_init`)."""
    w, e = list(widths), list(exit_widths)
    if len(w) != 3 or len(e) != 2 or min(w + e) < 1 or extra < 0:
        raise ConfigError(f"cifar10-air needs 3 positive widths, 2 exit widths and extra >= 0; "
                          f"got widths={widths}, exit_widths={exit_widths}, extra={extra}")
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    stages = [
        nn.Sequential(whiten, nn.GELU(), ConvGroup(24, w[0])),  # w0 x 15 x 15
        ConvGroup(w[0], w[1]),  # w1 x 7 x 7
        nn.Sequential(ConvGroup(w[1], w[2]), *[_Pair(w[2]) for _ in range(extra)]),  # w2 x 3 x 3
    ]
    exits = [
        nn.Sequential(ConvGroup(w[0], e[0]), *_head(e[0], classes)),
        nn.Sequential(ConvGroup(w[1], e[1]), *_head(e[1], classes)),
        nn.Sequential(*_head(w[2], classes)),
    ]
    return EarlyExitFamily(stages, exits, (3, 32, 32))


@register_family("airbench")
def airbench_net(widths: tuple[int, int, int] | list[int] = (64, 256, 256),
                 classes: int = 10) -> EarlyExitFamily:  # fmt: skip
    """airbench's network (block widths 64/256/256, about 2 M parameters, 236 MFLOPs) as a
    one-member family: the whitening conv 3 -> 24 (2 x 2, frozen), GELU, three conv groups
    (31 -> 15 -> 7 -> 3 pixels), a global max pool and a linear layer, logits x 1/9.

    Not a family of its own kind: the single network this recipe was published with, kept to
    measure what the recipe reaches on a given copy of the data (``flowcodec train-family
    --family airbench``; docs/family.md), and as a teacher for
    :func:`~flowcodec.family.grow.grow_member`."""
    w = list(widths)
    if len(w) != 3 or min(w) < 1:
        raise ConfigError(f"airbench needs 3 positive widths, got {widths}")
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    trunk = nn.Sequential(whiten, nn.GELU(), ConvGroup(24, w[0]), ConvGroup(w[0], w[1]),
                          ConvGroup(w[1], w[2]))  # fmt: skip
    return EarlyExitFamily([trunk], [nn.Sequential(*_head(w[2], classes))], (3, 32, 32))


@torch.no_grad()
def whiten_init(family: EarlyExitFamily, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the first convolution's 24 filters to the 12 whitening directions of the 2 x 2
    patches of ``images`` (normalised, ``(N, 3, H, W)``) and their negatives: each
    eigenvector of the patch covariance divided by the square root of its eigenvalue."""
    conv = family.stages[0][0]
    k = conv.weight.shape[-1]
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k).double()
    cov = patches.T @ patches / len(patches)
    vals, vecs = torch.linalg.eigh(cov)
    filt = (vecs / torch.sqrt(vals + eps)).T.reshape(-1, images.shape[1], k, k)
    conv.weight.copy_(torch.cat([filt, -filt]).float())
    conv.bias.zero_()


@dataclass
class AirConfig:
    """The recipe. ``lr`` and ``weight_decay`` are per 1,024 examples and decoupled (the step
    is ``lr`` times the mean gradient whatever the momentum; the decay shrinks weights by
    ``weight_decay`` per 1,024 examples whatever the lr); ``exit_weights`` weigh the exits'
    summed losses (the largest member's last)."""

    epochs: float = 15.0
    batch_size: int = 1024
    lr: float = 10.0
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    translate: int = 2
    exit_weights: list[float] = field(default_factory=lambda: [0.5, 0.5, 1.0])
    lookahead: bool = True
    micro_batch: int | None = 256  # forward/backward in pieces (2 CPU cores: 170 vs 128 img/s)
    eval_batch: int = 1000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        bad = [k for k in ("epochs", "batch_size", "lr") if not getattr(self, k) > 0]
        if not 0 <= self.momentum < 1:
            bad.append("momentum")
        if self.translate < 0 or self.weight_decay < 0:
            bad.append("translate/weight_decay")
        if self.micro_batch is not None and self.micro_batch < 1:
            bad.append("micro_batch")
        if bad:
            raise ConfigError(f"AirConfig: bad value for {', '.join(bad)}")


def _triangle(step: int, total: int, start=0.2, peak=0.23, end=0.07) -> float:
    """Linear from ``start`` to 1 over the first ``peak`` of the steps, then to ``end``."""
    top = max(1, int(peak * total))
    if step < top:
        return start + (1 - start) * step / top
    return 1 + (end - 1) * min(1.0, (step - top) / max(1, total - top))


def _shift_crop(padded: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``size`` x ``size`` window of every padded image (one shift per image)."""
    r = (padded.shape[-1] - size) // 2
    n = len(padded)
    dy = torch.randint(0, 2 * r + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * r + 1, (n,), generator=gen)
    rows = torch.empty((n, padded.shape[1], size, padded.shape[-1]), dtype=padded.dtype)
    for s in range(2 * r + 1):  # rows first, then columns: 2(2r+1) masked copies
        m = dy == s
        rows[m] = padded[m, :, s : s + size]
    out = torch.empty((n, padded.shape[1], size, size), dtype=padded.dtype)
    for s in range(2 * r + 1):
        m = dx == s
        out[m] = rows[m, :, :, s : s + size]
    return out


class _Lookahead(nn.Module):
    """Every few steps the weights move to ``ema.lerp(weights, 1 - decay)`` (and the EMA with
    them): what the run evaluates and saves is the averaged model. The average is held as
    buffers, so the training state saves and restores it with the rest."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        sd = module.state_dict()
        self.names = [k for k, v in sd.items() if v.is_floating_point()]
        for i, k in enumerate(self.names):
            self.register_buffer(f"t{i}", sd[k].detach().clone())

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        sd = module.state_dict()
        for i, k in enumerate(self.names):
            ema = getattr(self, f"t{i}")
            ema.lerp_(sd[k], 1 - decay)
            sd[k].copy_(ema)


def train_air(family: EarlyExitFamily, train: ArrayDataset, test: ArrayDataset | None = None,
              config: AirConfig | None = None, checkpoint=None, resume: bool = False,
              warm: bool = False):  # fmt: skip
    """Train every exit of ``family`` (a ``cifar10-air`` family) with the recipe; returns a
    :class:`~flowcodec.family.train.TrainResult` (test accuracy per member, one view).

    ``checkpoint`` (a path without suffix): the training state (weights, optimiser, lookahead
    average, generator) is written after every epoch; with ``resume`` training continues after
    the last saved epoch. A time budget (``time_budget_s``) fits the rest of the run, after
    every epoch, to the epochs it still allows at the last epoch's pace; the schedules follow
    the refitted length, so the run still ends annealed.

    ``warm``: ``family`` already holds trained weights (a warm restart, ``train-family
    --init``): its whitening filters are kept, and the run is a new schedule from them."""
    from flowcodec.family.train import TrainResult, evaluate_family
    from flowcodec.scale.ddp import load_state, save_state
    from flowcodec.training import EpochLoop

    cfg = config or AirConfig()
    if len(cfg.exit_weights) != family.num_members:
        raise ConfigError(f"exit_weights needs {family.num_members} values")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    cl = dev.type == "cpu"  # channels-last convolutions are faster on CPU
    images = train.normalize(train.images)
    labels = train.labels
    # (on resume the saved weights replace it; the draws keep the generator in step)
    sample = images[torch.randperm(len(images), generator=gen)[:5000]]
    if not warm:
        whiten_init(family, sample)
    flip0 = torch.rand(len(images), generator=gen) < 0.5  # epoch 0's flips; odd epochs flip all
    images = torch.where(flip0[:, None, None, None], images.flip(-1), images)
    pad = cfg.translate
    padded = nn.functional.pad(images, (pad,) * 4, mode="reflect") if pad else images
    del images
    family.to(dev).train()
    if cl:
        family.to(memory_format=torch.channels_last)

    bs = cfg.batch_size
    mb = cfg.micro_batch or bs
    per_epoch = len(labels) // bs
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    scale = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / scale
    wd = cfg.weight_decay * bs / scale
    bn_bias = [m.bias for m in family.modules() if isinstance(m, _BN)]
    ids = {id(p) for p in bn_bias}
    whiten_bias = family.stages[0][0].bias
    other = [p for p in family.parameters()
             if p.requires_grad and id(p) not in ids]  # fmt: skip
    lr_b = lr * cfg.bias_scaler
    opt = torch.optim.SGD(
        [{"params": bn_bias, "lr": lr_b, "weight_decay": wd / lr_b},
         {"params": other, "lr": lr, "weight_decay": wd / lr}],
        momentum=cfg.momentum, nesterov=True)  # fmt: skip
    loop = EpochLoop(per_epoch, math.ceil(cfg.epochs), desc="train cifar10-air",
                     progress=cfg.progress, max_steps=total,
                     time_budget=cfg.time_budget_s)  # fmt: skip
    # the schedules read loop.total: a time budget refits the run after every epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _triangle(s, loop.total))
    look = _Lookahead(family) if cfg.lookahead else None
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    weights = [float(w) for w in cfg.exit_weights]

    holder = nn.ModuleDict({"family": family})
    if look is not None:
        holder["ema"] = look
    if checkpoint is not None and resume:
        saved = load_state(checkpoint, holder, opt, sched, gen)
        if saved is not None:
            loop.resume(int(saved["epoch"]), saved["history"])
    for epoch in loop.epochs():
        whiten_bias.requires_grad_(epoch <= cfg.whiten_bias_epochs)
        crops = _shift_crop(padded, 32, gen) if pad else padded
        if epoch % 2 == 0:  # alternate: every image flipped relative to the last epoch
            crops = crops.flip(-1)
        order = torch.randperm(len(labels), generator=gen)
        batches = ((crops[order[i * bs:(i + 1) * bs]], labels[order[i * bs:(i + 1) * bs]])
                   for i in range(per_epoch))  # fmt: skip
        for x, y in loop.steps(batches):
            x, y = x.to(dev), y.to(dev)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            last, hits = 0.0, 0
            for xs, ys in zip(x.split(mb), y.split(mb)):  # summed losses: the same gradient
                outs = family(xs)
                losses = [ce(o, ys) for o in outs]
                sum(w * v for w, v in zip(weights, losses)).backward()
                last += losses[-1].item()
                hits += int((outs[-1].argmax(1) == ys).sum())
            opt.step()
            sched.step()
            if look is not None and loop.step % 5 == 0:
                look.update(family, 0.95**5 * (loop.step / loop.total) ** 3)
            loop.add(len(y), loss=last / len(y), acc=hits / len(y))
        rec = loop.record()
        if test is not None:
            rec["test_acc"] = [round(a, 4) for a in evaluate_family(family, test,
                                                                    cfg.eval_batch, dev)]
        line = (f"epoch {epoch}: loss {rec['loss']:.3f} train acc {rec['acc']:.3f}"
                + (f" test {rec['test_acc']}" if "test_acc" in rec else ""))  # fmt: skip
        loop.commit(rec, line=line)
        if checkpoint is not None:
            save_state(checkpoint, holder, opt, sched, gen, epoch, loop.history,
                       {"config": asdict(cfg)})  # fmt: skip
    if look is not None:
        look.update(family, 1.0)  # the end of the run: the weights become the average
    loop.close()
    family.eval().to(memory_format=torch.contiguous_format)
    accs = evaluate_family(family, test, cfg.eval_batch, dev) if test is not None else []
    res = TrainResult(accs, loop.elapsed, loop.history)
    res.steps_done, res.total_steps = loop.step, loop.total
    return res
