"""Training a :class:`~flowcodec.codecs.jscc.JSCCCodec` through the channels.

Every step draws a fresh augmented batch, runs the frozen head to the split point and the
larger member on the true features (the teacher), picks a channel (AWGN, Rayleigh block
fading or OFDM over a 3GPP TDL profile, by the weights of ``channels``), an SNR per sample
uniform in ``snr_range`` (one per batch for OFDM, which takes a scalar) and a channel-use
count per sample from the codec's ``levels``, and trains the codec on

    CE(tail(codec(h)), y) + kd * T^2 KL(teacher || student) + beta * ||h_hat - h||^2 / E[h^2]

with gradients through the channel (noise and fading are additive and multiplicative; the
receiver's equalisation uses the drawn realisation). ``bf16=True`` runs the family and
the codec's transforms under bfloat16 autocast (symbols, channel and power normalisation
stay in float32).

Example
-------
>>> from flowcodec.codecs.jscc_train import JSCCTrainConfig
>>> JSCCTrainConfig(snr_range=(0.0, 10.0)).snr_range
(0.0, 10.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# the channel names a config can use; make_channel and CHANNELS are re-exported for a release
from channels.registry import CHANNELS, make_channel
from flowcodec.codecs.jscc import JSCCCodec
from flowcodec.codecs.train import collect_features
from flowcodec.codecs.train_task import save_progress
from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.training import EpochLoop, Frozen, TrainRecord, check_distill_settings, kd_loss

__all__ = ["JSCCTrainConfig", "JSCCTrainResult", "train_jscc", "eval_jscc", "make_channel",
           "CHANNELS"]  # fmt: skip


@dataclass
class JSCCTrainConfig:
    """Settings of :func:`train_jscc` (plain values: saved with the checkpoint)."""

    snr_range: tuple[float, float] = (-5.0, 20.0)
    channels: dict = field(default_factory=lambda: {"awgn": 0.5, "rayleigh": 0.3,
                                                    "ofdm-tdla": 0.2})  # fmt: skip
    kd: float = 1.0
    temperature: float = 2.0
    beta: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    stem_lr: float = 2e-4
    bf16: bool = False
    seed: int = 0
    time_budget: float | None = None
    max_steps: int | None = None
    eval_every: int = 1
    eval_n: int = 1000
    eval_snrs: tuple[float, ...] = (-5.0, 0.0, 10.0, 20.0)

    def check(self) -> None:
        lo, hi = self.snr_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConfigError(f"snr_range must be finite (lo, hi) with lo <= hi, "
                              f"got {self.snr_range}")  # fmt: skip
        if not self.channels or any(k not in CHANNELS or not v >= 0
                                    for k, v in self.channels.items()) \
                or sum(self.channels.values()) <= 0:  # fmt: skip
            raise ConfigError(f"channels must map names in {list(CHANNELS)} to weights >= 0 "
                              f"(not all 0), got {self.channels}")  # fmt: skip
        check_distill_settings(self)


@dataclass
class JSCCTrainResult(TrainRecord):
    """Per-epoch history (losses, forward-pass accuracy per SNR), time, steps."""


@torch.no_grad()
def eval_jscc(codec: JSCCCodec, head, tail, data: ArrayDataset, snrs, channel="awgn",
              uses=None, n: int | None = None, seed: int = 0, device="cpu",
              true_snrs=None) -> list[dict]:  # fmt: skip
    """Accuracy at each SNR through ``channel`` (a name or a channel); ``uses``: channel
    uses (default the codec's schedule); ``true_snrs``: the channel's SNRs when they differ
    from what the codec is told (mismatch). Seeded: the same call gives the same numbers."""
    codec.eval()
    out = []
    for i, s in enumerate(snrs):
        ch = make_channel(channel, device=str(device), seed=seed) if isinstance(channel, str) \
            else channel
        gen = torch.Generator(device=str(device)).manual_seed(seed + i)
        true = None if true_snrs is None else float(true_snrs[i])
        correct, seen, spent = 0, 0, 0
        for x, y in data.sample(n).batches(500, device=device):
            h = codec.device_features(head, x).float()
            feats, tx = codec.transmit(h, ch, float(s), uses, gen, true_snr_db=true)
            correct += int((tail(feats).argmax(1) == y).sum())
            seen += len(y)
            spent += tx.channel_uses
        out.append({"snr_db": float(s), "accuracy": correct / seen, "uses": spent / seen,
                    "n": seen})  # fmt: skip
    return out


def train_jscc(codec: JSCCCodec, family, member: int, point: int, train: ArrayDataset,
               test: ArrayDataset | None = None, cfg: JSCCTrainConfig | None = None,
               device: str = "cpu", progress: bool = True,
               checkpoint: str | Path | None = None) -> JSCCTrainResult:  # fmt: skip
    """Train ``codec`` at split ``point`` of ``family`` for member ``member``'s tail, through
    the channels of ``cfg``. The family is frozen and left as it was. ``checkpoint`` (a path
    without suffix) gets the weights and history after every epoch."""
    cfg = cfg or JSCCTrainConfig()
    cfg.check()
    if not isinstance(codec, JSCCCodec):
        raise ConfigError(f"train_jscc trains a JSCCCodec, got {type(codec).__name__}")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"{len(train)} training samples, fewer than one batch")
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    names = sorted(cfg.channels)
    weights = torch.tensor([float(cfg.channels[k]) for k in names])
    chans = {k: make_channel(k, device=str(dev), seed=cfg.seed) for k in names}
    levels = torch.tensor(codec.levels)
    frozen = Frozen(family.to(dev))
    try:
        head, tail = family.split(member, point)
        feats = collect_features(head, train, n=2000, device=dev)
        if not bool(codec.conceal.abs().sum()):
            codec.to("cpu").fit(feats)
        power = float(feats.pow(2).mean())
        c = feats.shape[1]  # one view's channels
        codec.to(dev)
        stem = [p for n, p in codec.named_parameters() if n.startswith("g_a.stem")]
        ids = {id(p) for p in stem}
        main = [p for p in codec.parameters() if id(p) not in ids]
        opt = torch.optim.Adam([{"params": main, "lr": cfg.lr},
                                {"params": stem, "lr": cfg.stem_lr}])  # fmt: skip
        base_lrs = [cfg.lr, cfg.stem_lr]
        res = JSCCTrainResult()
        amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        loop = EpochLoop(len(train) // cfg.batch_size, cfg.epochs, desc="train jscc codec",
                         progress=progress, time_budget=cfg.time_budget,
                         max_steps=cfg.max_steps)  # fmt: skip
        res.history = loop.history  # the same list: commit appends each epoch's record
        lo, hi = cfg.snr_range
        for epoch in loop.epochs():
            codec.train()
            for m in codec.g_a.stem.modules():  # keep the stem's BN statistics fixed
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
            batches = train.batches(cfg.batch_size, shuffle=True, train=True, generator=gen,
                                    device=dev, drop_last=True)  # fmt: skip
            for x, y in loop.steps(batches):
                loop.set_lr(opt, base_lrs, min(100, loop.total // 20))
                name = names[int(torch.multinomial(weights, 1, generator=gen))]
                b = len(y)
                if name.startswith("ofdm"):
                    snr = torch.full((b,), lo + (hi - lo) * float(torch.rand((), generator=gen)))
                else:
                    snr = lo + (hi - lo) * torch.rand(b, generator=gen)
                uses = levels[torch.randint(len(levels), (b,), generator=gen)]
                with torch.no_grad(), torch.autocast(**amp):
                    hv = codec.device_features(head, x)  # with views: all of them, stacked
                    h = hv[:, :c]  # the input's own features: the teacher's, the target
                    teacher = tail(h).float() if cfg.kd else None
                h, hv = h.float(), hv.float()
                with torch.autocast(**amp):
                    out = codec(hv, snr.to(dev), chans[name], uses.to(dev), gen)
                    logits = tail(out.features).float()
                task = F.cross_entropy(logits, y)
                kd = kd_loss(logits, teacher, cfg.temperature) if cfg.kd else logits.new_zeros(())
                distill = F.mse_loss(out.features.float(), h) / power
                loss = task + cfg.kd * kd + cfg.beta * distill
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(main + stem, 5.0)
                opt.step()
                loop.add(b, loss=loss, task=task, kd=kd, distill=distill)
            rec = loop.record()
            if test is not None and cfg.eval_every and epoch % cfg.eval_every == 0:
                with torch.autocast(**amp):
                    rec["eval"] = eval_jscc(codec, head, tail, test, cfg.eval_snrs,
                                            n=cfg.eval_n, seed=cfg.seed, device=dev)
            ev = " ".join(f"{e['snr_db']:g}dB:{100 * e['accuracy']:.1f}%"
                          for e in rec.get("eval", []))  # fmt: skip
            loop.commit(rec, line=f"epoch {epoch}: loss {rec.get('loss', 0):.3f} "
                                  f"task {rec.get('task', 0):.3f} {rec['seconds']:.0f}s {ev}")
            if checkpoint is not None:
                save_progress(codec, cfg, res, checkpoint)
        res.finish(loop)
        codec.eval()
        return res
    finally:
        frozen.restore()
