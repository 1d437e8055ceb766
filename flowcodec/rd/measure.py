"""Measuring one codec of an ``rd`` run: the shared context, the jobs (one per codec entry
or sweep point), the clean row and the channel rows of each, and the memo that runs the
frozen head and tail once per distinct input."""

from __future__ import annotations

import functools
import itertools
import time

from flowcodec.rd.rows import RDRow
from flowcodec.sweeps.codec_spec import codec_from_spec

__all__ = ["RDContext", "build_jobs", "expand", "reference_row", "measure", "channel_rows",
           "Memo", "memos", "receiver", "erasure", "reference_accuracy", "make_row"]


def expand(entry: dict) -> list[tuple[str, dict]]:
    """(label, kwargs) for every point of an entry's ``sweep``."""
    sweep = entry.get("sweep", {})
    keys = list(sweep)
    out = []
    for values in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        kw = {**entry.get("kwargs", {}), **dict(zip(keys, values))}
        out.append((entry.get("label", entry.get("codec", "codec")).format(**kw), kw))
    return out


class RDContext:
    """What every unit of an rd run shares: the family, the data, the split heads and the
    baselines' fitting features (built lazily per split point).

    A row at split point ``p`` is received by the config's ``member`` when its path passes
    through ``p`` (``family.path``), else by ``family.receiver(p)``, the largest member
    that does (:meth:`receiving_member`): in a branching family one run can mix points that
    no single member passes through. For a chain family every point up to ``member`` is on
    its path, so the config's member receives them all.
    """

    def __init__(self, cfg: dict, n: int | None, progress: bool, family=None) -> None:
        from flowcodec.data import load_dataset
        from flowcodec.family import load_pretrained

        self.seed = int(cfg.get("seed", 0))
        self.fam = family if family is not None else load_pretrained(cfg["family"],
                                                                     progress=progress)
        self.train, test = load_dataset(cfg["dataset"])
        n = n or cfg.get("test_subset")
        if n and n < len(test):
            test = test.subset(int(n), seed=self.seed)
        self.test = test
        self.member, self.point = int(cfg["member"]), int(cfg["point"])
        self.flops = [m.flops for m in self.fam.info()]  # of every member, smallest first
        self.member_flops = self.flops[self.member - 1]
        self.fit_n = int(cfg.get("fit_samples", 2000))
        self.heads: dict = {}
        self.fits: dict = {}

    def receiving_member(self, p: int) -> int:
        """The member that receives features from split point ``p``: the config's member
        when its path passes through ``p``, else ``family.receiver(p)``."""
        return self.member if p in self.fam.path(self.member) else self.fam.receiver(p)

    def receiver_flops(self, p: int) -> int:
        """FLOPs of the member that receives from split point ``p`` (the device's share is
        reported against them)."""
        return self.flops[self.receiving_member(p) - 1]

    def split(self, p):
        """``(head, tail)`` at split point ``p``, the tail that of the member receiving
        from there (:meth:`receiving_member`)."""
        from flowcodec.codecs.train import collect_features

        if p not in self.heads:
            self.heads[p] = self.fam.split(self.receiving_member(p), p)
            self.fits[p] = collect_features(self.heads[p][0], self.train, n=self.fit_n)
        return self.heads[p]

    def fit_features(self, p):
        """The baselines' fitting features at split point ``p`` (``fit_samples`` training
        images through the member's head)."""
        self.split(p)
        return self.fits[p]


def build_jobs(cfg: dict, ctx: RDContext, progress: bool, device: str) -> list[tuple]:
    """``(group, label, point, builder, source)`` for every codec entry and sweep point, in
    the config's order; ``builder()`` returns a ready codec (:func:`codec_from_spec`)."""
    jobs = []
    for entry in cfg["codecs"]:
        group = entry.get("group", entry.get("codec", "pretrained"))
        p = int(entry.get("point", ctx.point))
        specs = []  # (label, codec spec, source)
        if "pretrained" in entry and "rate_points" in entry:
            # a variable-rate codec: one row per rate point, all from one checkpoint
            # "views": V codes V views of each input with it (task codecs; no new weights)
            views = int(entry.get("views", 1))
            suffix, more = (f"-v{views}", {"views": views}) if views != 1 else ("", {})
            specs += [(f"{name}{suffix}@r{r}", {"pretrained": name, **more, "rate_point": r},
                       "pretrained") for name in entry["pretrained"]
                      for r in entry["rate_points"]]  # fmt: skip
        elif "pretrained" in entry:
            specs += [(name, {"pretrained": name}, "pretrained") for name in entry["pretrained"]]
        elif "train" in entry:
            t = entry["train"]
            settings = {"beta": t.get("beta", 1.0), "epochs": t.get("epochs", 10),
                        "drop_prob": t.get("drop_prob", 0.0),
                        "flip_prob": t.get("flip_prob", 0.0),
                        "batch_size": t.get("batch_size", 64), "lr": t.get("lr", 2e-3),
                        "seed": ctx.seed}  # fmt: skip
            for lam in t["lam"]:
                label = entry.get("label", entry["codec"] + "-l{lam}").format(lam=lam)
                specs.append((label, {"codec": entry["codec"], "kwargs": entry.get("kwargs", {}),
                                      "train": {"lam": lam, **settings}}, "trained"))
        else:
            specs += [(label, {"codec": entry["codec"], "kwargs": kw,
                               "fit": entry.get("fit", True)}, "baseline")
                      for label, kw in expand(entry)]  # fmt: skip
        for label, spec, source in specs:
            build = functools.partial(codec_from_spec, spec, ctx.fam, p, train_data=ctx.train,
                                      fit_features=ctx.fit_features,
                                      member=ctx.receiving_member(p),
                                      progress=progress, device=device,
                                      what=f"codec entry {label!r}")  # fmt: skip
            jobs.append((group, label, p, build, source))
    return jobs


def reference_row(ctx: RDContext) -> RDRow:
    """The uncompressed member at the config's split point."""
    fam, point = ctx.fam, ctx.point
    head, tail = ctx.split(point)
    ref_t = time.perf_counter()
    ref_acc = reference_accuracy(head, tail, ctx.test)
    return RDRow("uncompressed", "reference", "none", point, "clean", ref_acc, 0.0, 0.0,
                 0.0, None, None, fam.head_flops(point) / 1e6,
                 100 * fam.head_flops(point) / ctx.receiver_flops(point), len(ctx.test),
                 round(time.perf_counter() - ref_t, 1), "reference",
                 ctx.receiving_member(point))  # fmt: skip


def measure(ctx: RDContext, job: tuple, memo=None) -> tuple:
    """Build (train, fit) one job's codec and measure its clean row: ``(row, codec,
    train history or None)``. ``memo(module, role)`` may wrap the frozen head and tail."""
    import torch

    from flowcodec.codecs.train import evaluate_codec

    group, label, p, build, source = job
    head, tail = ctx.split(p)
    t0 = time.perf_counter()
    torch.manual_seed(ctx.seed)
    codec = build().eval()
    recv = receiver(codec, tail)
    if memo is not None:
        head, recv = memo(head, "head"), memo(recv, "tail")
    ev = evaluate_codec(codec, head, recv, ctx.test)
    row = make_row(label, group, codec, p, "clean", ev, ctx.fam, ctx.receiver_flops(p), t0,
                   source, ctx.receiving_member(p))  # fmt: skip
    return row, codec, getattr(codec, "train_history", None)


def channel_rows(cfg: dict, ctx: RDContext, label: str, codec, p: int, group: str,
                  source: str) -> list[tuple[tuple[int, int], RDRow]]:  # fmt: skip
    """The rows of ``label`` under each of the config's ``channels`` that list it, with
    their place in the serial order: ``((channel index, position in its list), row)``."""
    import torch

    from flowcodec.codecs.train import evaluate_codec

    out = []
    for ci, ch in enumerate(cfg.get("channels", [])):
        if label not in ch["codecs"]:
            continue
        pos = ch["codecs"].index(label)
        gen_seed = int(ch.get("seed", ctx.seed))
        head, tail = ctx.split(p)
        tail = receiver(codec, tail)
        t0 = time.perf_counter()
        if "loss_rate" in ch:
            cond = f"iid loss {ch['loss_rate']:g}"
            channel = erasure(ch["loss_rate"], gen_seed)
            ev = evaluate_codec(codec, head, tail, ctx.test, channel=channel)
        else:
            from flowcodec.codecs.learned import flip_bits

            g = torch.Generator().manual_seed(gen_seed)
            prob = float(ch["flip_prob"])
            cond = f"bsc {prob:g}"
            ev = evaluate_codec(codec, head, tail, ctx.test,
                                transform=lambda s, g=g, prob=prob: flip_bits(s, prob, g))
        out.append(((ci, pos), make_row(label, group, codec, p, cond, ev, ctx.fam,
                                        ctx.receiver_flops(p), t0, source,
                                        ctx.receiving_member(p))))  # fmt: skip
    return out


def memos():
    """``memo(module, role)``: a :class:`Memo` per role (head, tail), for the latest
    module in that role (a split point's head features are kept while it is in use)."""
    memos: dict[str, Memo] = {}

    def memo(module, role):
        if role not in memos or memos[role].module is not module:
            memos[role] = Memo(module)
        return memos[role]

    return memo


class Memo:
    """Calls ``module`` once per distinct input tensor (by shape, dtype and a BLAKE2
    digest of its bytes) and returns the kept output after that. For frozen modules in
    eval mode; ``eval()`` is passed on."""

    def __init__(self, module) -> None:
        self.module = module
        self.cache: dict = {}

    def eval(self):
        self.module.eval()
        return self

    def __call__(self, x):
        import hashlib

        import numpy as np

        arr = np.ascontiguousarray(x.detach().cpu().numpy())
        key = (tuple(x.shape), str(x.dtype), hashlib.blake2b(arr.data, digest_size=16).digest())
        if key not in self.cache:
            self.cache[key] = self.module(x)
        return self.cache[key]


def receiver(codec, tail):
    """What the receiver runs on the decoded output: the tail, or nothing for a codec that
    decodes the answer itself (``answers``)."""
    import torch

    return torch.nn.Identity() if getattr(codec, "answers", False) else tail


def erasure(loss_rate: float, seed: int):
    """Packet erasure: channels.discrete.IIDPacketErasure (one generator for the whole run)."""
    import torch

    from channels.discrete import IIDPacketErasure

    ch = IIDPacketErasure(loss_rate, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return lambda packets: ch.transmit(packets, generator=g)[0]


def reference_accuracy(head, tail, data) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for x, y in data.batches(250):
            correct += int((tail(head(x)).argmax(1) == y).sum())
    return correct / len(data)


def make_row(label, group, codec, p, cond, ev, fam, member_flops, t0,
             source="baseline", receiver=None) -> RDRow:  # fmt: skip
    """The row of one measurement (``ev``) of ``codec`` at split point ``p``; ``member_flops``
    are those of ``receiver``, the member that finished it."""
    # a multi-view codec runs the device's head once per view (and its encoder too)
    dev = getattr(codec, "views", 1) * fam.head_flops(p) + codec.encoder_flops()
    over = None
    if ev.est_bytes_per_image:
        over = round(100 * (ev.payload_bytes_per_image / ev.est_bytes_per_image - 1), 3)
    return RDRow(label, group, codec.name, p, cond, ev.accuracy, ev.bytes_per_image,
                 ev.session_bytes_per_image, ev.payload_bytes_per_image,
                 ev.est_bytes_per_image, over, dev / 1e6,
                 100 * dev / member_flops, ev.n, round(time.perf_counter() - t0, 1),
                 source, receiver)  # fmt: skip
