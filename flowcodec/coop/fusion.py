"""Per-device task encoders and the edge fusion module of cooperative inference.

Each device is of a *kind*: ``"m1"`` runs member 1 of the family to split point 1,
``"m2"`` member 2 to split point 2. On its view it runs

    head (the member's trunk) -> stem (the member's exit convolutions) -> global max pool
        -> z (the member's own exit features; its exit's linear layer gives its own answer)
        -> linear map -> latent -> TaskCodec entropy coding -> bytes

so a device spends its member's FLOPs plus one small linear map (what
:meth:`CoopModel.device_flops` counts). The task encoder is a
:class:`~flowcodec.codecs.task.TaskCodec` whose stem starts as (and stays) a copy of the
member's exit convolutions; its decoder is replaced by the identity, so ``decompress``
yields the dequantised latent vector ``(B, latent)`` that the edge fuses.

The edge (:class:`EdgeFusion`):

- a decoder per device kind maps that kind's latent into a common ``dim``-vector space;
- the vectors of the devices that arrived are pooled by masked attention and a masked
  maximum (both invariant to the order of the devices), plus a learned embedding of how
  many arrived (the missing-device handling);
- a synthesis decoder (:class:`~flowcodec.codecs.task.TaskDecoder`) maps the pooled vector
  to features of the common split point (``(128, 8, 8)`` for CIFAR-10), which the largest
  member's tail finishes;
- with no device arriving, the answer is the class prior, and the ``empty`` flag says so.

With ``CoopConfig(cells=c)``, ``c > 1``, a device pools to a ``c x c`` grid and sends
``latent`` numbers per cell, and the edge is :class:`~flowcodec.coop.cells.CellFusion`,
which places the cells by each device's window anchor (session metadata: ``anchors``).

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("digits").eval()
>>> model = CoopModel(fam, CoopConfig(kinds=("m2",), latent=4, dim=16, hidden=16)).eval()
>>> z = model.pooled("m2", torch.rand(3, 1, 8, 8))
>>> lat, bits = model.latent("m2", z)
>>> out = model.edge([lat, None], ["m2", "m2"])
>>> tuple(out.logits.shape), out.empty.tolist()
((3, 10), [False, False, False])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from flowcodec.codecs.task import TaskCodec, TaskDecoder
from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.flops import count_flops

__all__ = ["CoopConfig", "CoopModel", "EdgeFusion", "FusionOutput", "KINDS", "kind_member",
           "save_coop", "load_coop"]

#: Device kinds: member ``k`` of the family, run to split point ``k``.
KINDS = ("m1", "m2")


def kind_member(kind: str) -> int:
    """The family member a device kind runs (``"m2"`` -> 2); ConfigError for others."""
    if kind not in KINDS:
        raise ConfigError(f"unknown device kind {kind!r}; known: {list(KINDS)}")
    return int(kind[1:])


@dataclass(frozen=True)
class CoopConfig:
    """What a cooperative model is made of (saved with its checkpoint).

    kinds : device kinds the model has encoders and edge decoders for.
    max_devices : the most devices the edge fuses at once.
    latent : numbers a device codes (per cell); rates : rate points of each device's
    entropy model.
    dim : width of the common space; hidden : the synthesis decoder's first layer.
    member, point : the largest member whose tail finishes, from this split point.
    cells : 1 (a device max-pools its exit features to one vector: the edge sees no
    layout) or ``c`` in 2..4 (to a ``c x c`` grid, ``latent`` numbers per cell, and the
    edge places the cells by each device's anchor: :mod:`flowcodec.coop.cells`).
    tune_exit : the devices' exit convolutions and exit linear layer (their own answer)
    train with the fusion (False: they stay the member's own, frozen). The device's cost
    is unchanged; its weights are the model's, not the family's.
    tune_tail : the edge runs its own copy of the largest member's tail, trained with the
    fusion (False: the family's tail, frozen).
    vote : the edge adds to the tail's logits the mean, over the devices that arrived, of a
    linear map per kind from each device's latent to class logits (a learned ensemble
    beside the fusion: order-invariant, defined for every non-empty subset, and what
    remains when one device's view is missing is still an average of the others').
    """

    kinds: tuple[str, ...] = ("m2",)
    max_devices: int = 4
    latent: int = 16
    rates: int = 1
    dim: int = 256
    hidden: int = 512
    member: int = 3
    point: int = 2
    cells: int = 1
    tune_exit: bool = False
    tune_tail: bool = False
    vote: bool = False

    def check(self) -> CoopConfig:
        bad = []
        if not self.kinds or len(set(self.kinds)) != len(self.kinds) \
                or any(k not in KINDS for k in self.kinds):
            bad.append(f"kinds must be distinct names from {list(KINDS)}, got {self.kinds!r}")
        for name, lo, hi in (("max_devices", 1, 16), ("latent", 1, 256), ("rates", 1, 16),
                             ("dim", 1, 4096), ("hidden", 1, 8192), ("cells", 1, 4)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad.append(f"{name} must be an int in {lo}..{hi}, got {v!r}")
        for name in ("tune_exit", "tune_tail", "vote"):
            if not isinstance(getattr(self, name), bool):
                bad.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        if bad:
            raise ConfigError("coop config: " + "; ".join(bad))
        return self

    @property
    def width(self) -> int:
        """Numbers a device sends per sample: ``latent * cells * cells``."""
        return self.latent * self.cells * self.cells


@dataclass
class FusionOutput:
    """What the edge answers: ``logits`` ``(B, classes)``, ``empty`` bool ``(B,)`` (no
    device arrived: the logits are the class prior), ``present`` int ``(B,)`` (devices
    fused), ``features`` ``(B, *common)`` (what the tail ran on, when asked; meaningless where
    empty)."""

    logits: torch.Tensor
    empty: torch.Tensor
    present: torch.Tensor
    features: torch.Tensor | None = None


def _stem_spec(exit_branch: nn.Module) -> tuple[list[tuple[int, bool]], nn.Linear]:
    """The conv blocks (channels, pool) of a family exit branch and its final linear layer."""
    spec: list[tuple[int, bool]] = []
    linear = None
    for block in exit_branch.children():
        if isinstance(block, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in block):
            conv = next(m for m in block if isinstance(m, nn.Conv2d))
            spec.append((conv.out_channels, any(isinstance(m, nn.MaxPool2d) for m in block)))
        elif isinstance(block, nn.Linear):
            linear = block
    if not spec or linear is None:
        raise ConfigError("a device member's exit branch must be conv blocks, a global pool "
                          "and a linear layer")
    return spec, linear


class DeviceEncoder(nn.Module):
    """A device kind's learned parts: ``codec`` (a TaskCodec whose stem is the member's exit
    convolutions and whose decoder is the identity) and ``classifier`` (the member's exit
    linear layer: the device's own answer from the pooled features). With ``cells > 1`` the
    codec pools to a ``cells x cells`` grid and maps each cell by a 1x1 convolution
    (``TaskCodec(grid=cells)``)."""

    def __init__(self, family, kind: str, latent: int, rates: int, cells: int = 1,
                 tune: bool = False) -> None:
        super().__init__()
        member = kind_member(kind)
        if member > family.num_members:
            raise ConfigError(f"device kind {kind!r} needs member {member}; the family has "
                              f"{family.num_members}")
        self.kind, self.member, self.point = kind, member, member
        spec, linear = _stem_spec(family.exits[member - 1])
        shape = tuple(family.feature_shape(self.point))
        self.codec = TaskCodec(shape, latent=latent, stem=spec, hidden=1, rates=rates,
                               packets=1, nonneg=False, grid=cells)
        # decompress -> dequantised latents (B, latent * cells^2), channel-major
        self.codec.g_s = nn.Identity()
        copied = self.codec.g_a.load_stem_from(family.exits[member - 1])
        if copied != 2 * len(spec):
            raise ConfigError(f"device kind {kind!r}: copied {copied} of {2 * len(spec)} stem "
                              "layers from the member's exit")
        self.classifier = nn.Linear(linear.in_features, linear.out_features)
        self.classifier.load_state_dict(linear.state_dict())
        for p in self.pretrained_parameters():
            p.requires_grad_(tune)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The parameters copied from the member's exit: the stem's and the classifier's."""
        return [*self.codec.g_a.stem.parameters(), *self.classifier.parameters()]

    @property
    def pooled_dim(self) -> int:
        return self.classifier.in_features


class FusionBase(nn.Module):
    """What the edge fusions share: the checks of their inputs. A subclass sets ``width``
    (numbers per device), ``max_devices`` and ``decoders`` (one entry per device kind)."""

    width: int
    max_devices: int

    def check(self, latents, kinds, mask, batch=None) -> tuple[int, torch.Tensor]:
        """Batch size and the arrival mask ``(B, N)``; ConfigError naming what is wrong."""
        if not isinstance(latents, (list, tuple)) or not isinstance(kinds, (list, tuple)):
            raise ConfigError("edge fusion: latents and kinds must be lists (one entry per "
                              "device)")
        n = len(latents)
        if not 1 <= n <= self.max_devices:
            raise ConfigError(f"edge fusion: {n} devices; this model fuses 1..{self.max_devices}")
        if len(kinds) != n:
            raise ConfigError(f"edge fusion: {n} latents but {len(kinds)} kinds")
        for k in kinds:
            if k not in self.decoders:
                raise ConfigError(f"edge fusion: no decoder for device kind {k!r}; this model "
                                  f"has {sorted(self.decoders)}")
        sizes = set()
        for i, t in enumerate(latents):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != self.width:
                raise ConfigError(f"edge fusion: device {i}'s latent must be (B, {self.width}), "
                                  f"got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
            sizes.add(t.shape[0])
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] != n \
                    or mask.dtype != torch.bool:
                raise ConfigError(f"edge fusion: mask must be bool (B, {n}), got "
                                  f"{getattr(mask, 'dtype', type(mask).__name__)} "
                                  f"{tuple(getattr(mask, 'shape', ()))}")
            sizes.add(mask.shape[0])
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
                raise ConfigError(f"edge fusion: batch must be an int >= 0, got {batch!r}")
            sizes.add(batch)
        if len(sizes) > 1:
            raise ConfigError(f"edge fusion: batch sizes differ across devices: {sorted(sizes)}")
        if not sizes:
            raise ConfigError("edge fusion: no device arrived and neither a mask nor batch "
                              "gives the batch size")
        b = sizes.pop()
        have = torch.tensor([t is not None for t in latents]).expand(b, n)
        m = have if mask is None else mask.cpu() & have
        return b, m

    @staticmethod
    def check_anchors(anchors, n: int) -> torch.Tensor:
        """Each device's anchor id ``(n,)`` (default: the ``n``-device protocol's slots,
        :func:`~flowcodec.coop.views.anchor_ids`); ConfigError naming what is wrong."""
        from flowcodec.coop.views import MAX_DEVICES, N_ANCHORS, anchor_ids

        if anchors is None:
            if n > MAX_DEVICES:
                raise ConfigError(f"edge fusion: {n} devices need explicit anchors")
            return torch.tensor(anchor_ids(n))
        if isinstance(anchors, torch.Tensor):
            anchors = anchors.tolist()
        if not isinstance(anchors, (list, tuple)) or len(anchors) != n or any(
                isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < N_ANCHORS
                for a in anchors):
            raise ConfigError(f"edge fusion: anchors must be {n} ints in 0..{N_ANCHORS - 1} "
                              f"(one per device), got {anchors!r}")
        return torch.tensor(list(anchors))


class EdgeFusion(FusionBase):
    """Edge side: per-kind decoders into a ``dim`` space, order-invariant masked pooling,
    a count embedding, and a synthesis decoder to ``common`` features ``(C, H, W)``.

    ``forward(latents, kinds, mask)``: ``latents`` a list of ``N`` tensors ``(B, latent)``
    (or None: that device sent nothing), ``kinds`` the ``N`` devices' kinds, ``mask`` bool
    ``(B, N)`` (optional: which devices arrived for each sample; ``batch`` gives ``B`` when
    every latent is None and there is no mask). Returns features
    ``(B, C, H, W)`` and the devices fused, bool ``(B, N)``."""

    def __init__(self, kinds: Sequence[str], latent: int, dim: int, hidden: int,
                 common: Sequence[int], max_devices: int) -> None:
        super().__init__()
        self.latent, self.dim, self.max_devices = latent, dim, max_devices
        self.width = latent
        self.decoders = nn.ModuleDict({
            k: nn.Sequential(nn.Linear(latent, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                             nn.ReLU(inplace=True))
            for k in kinds})
        self.score = nn.Linear(dim, 1)
        self.merge = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(inplace=True))
        self.count = nn.Embedding(max_devices + 1, dim)
        nn.init.zeros_(self.count.weight)
        self.synth = TaskDecoder(dim, hidden, tuple(common), nonneg=True)

    def forward(self, latents, kinds, mask=None, batch=None,
                anchors=None) -> tuple[torch.Tensor, torch.Tensor]:
        b, m = self.check(latents, kinds, mask, batch)
        if anchors is not None:  # checked; a pooled vector has no layout to place
            self.check_anchors(anchors, len(latents))
        dev = self.score.weight.device
        m = m.to(dev)
        e = torch.zeros(b, len(latents), self.dim, device=dev)
        for i, (t, k) in enumerate(zip(latents, kinds)):
            if t is not None:
                e[:, i] = self.decoders[k](t.to(dev).float())
        s = self.score(e).squeeze(-1).masked_fill(~m, float("-inf"))
        n = m.sum(1)
        a = torch.softmax(s, 1).nan_to_num(0.0) * m  # rows with none present: zeros
        att = (a.unsqueeze(-1) * e).sum(1)
        mx = e.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
        mx = torch.where(n[:, None] > 0, mx, torch.zeros_like(mx))
        fused = self.merge(torch.cat([att, mx], 1)) + self.count(n.clamp(max=self.max_devices))
        return self.synth(fused), m

    def flops_parts(self, kinds) -> tuple[int, dict]:
        """Edge FLOPs per sample before the tail: ``(base, {kind: per device})``."""
        base = count_flops(self.merge, (2 * self.dim,)) + count_flops(self.synth, (self.dim,))
        return base, {k: count_flops(self.decoders[k], (self.latent,))
                      + count_flops(self.score, (self.dim,)) for k in set(kinds)}


class CoopModel(nn.Module):
    """The devices' encoders (one per kind) and the edge fusion of one cooperative flow.

    The family is referenced, not owned: its weights are not in this model's state dict
    and stay frozen. ``class_prior`` ``(classes,)`` is what the edge answers when nothing
    arrives (uniform until :meth:`set_prior`).
    """

    def __init__(self, family, cfg: CoopConfig | None = None) -> None:
        super().__init__()
        self.cfg = (cfg or CoopConfig()).check()
        if not 1 <= self.cfg.point <= self.cfg.member <= family.num_members:
            raise ConfigError(f"coop: member {self.cfg.member} from point {self.cfg.point} is "
                              f"not in a family of {family.num_members} members")
        path = family.path(self.cfg.member)
        if self.cfg.point not in path:
            raise ConfigError(f"coop: member {self.cfg.member} passes through split points "
                              f"{path} only, not point {self.cfg.point}; features at point "
                              f"{self.cfg.point} are finished by member "
                              f"{family.receiver(self.cfg.point)} "
                              f"(family.receiver({self.cfg.point}))")  # fmt: skip
        self._fam = [family]  # a list: not a registered submodule
        self.devices = nn.ModuleDict({k: DeviceEncoder(family, k, self.cfg.latent,
                                                       self.cfg.rates, self.cfg.cells,
                                                       self.cfg.tune_exit)
                                      for k in self.cfg.kinds})
        if self.cfg.tune_tail:  # the edge's own copy of the tail, trained with the fusion
            import copy

            self.edge_tail = copy.deepcopy(
                family.split(self.cfg.member, self.cfg.point)[1]).float()
            for p in self.edge_tail.parameters():
                p.requires_grad_(True)
        common = tuple(family.feature_shape(self.cfg.point))
        self.common = common
        if self.cfg.cells == 1:
            self.fusion = EdgeFusion(self.cfg.kinds, self.cfg.latent, self.cfg.dim,
                                     self.cfg.hidden, common, self.cfg.max_devices)
        else:
            from flowcodec.coop.cells import CellFusion

            self.fusion = CellFusion(self.cfg.kinds, self.cfg.latent, self.cfg.cells,
                                     self.cfg.dim, self.cfg.hidden, common, self.cfg.max_devices)
        classes = self.devices[self.cfg.kinds[0]].classifier.out_features
        if self.cfg.vote:  # one linear vote per kind, averaged over the devices that arrived
            self.vote = nn.ModuleDict({k: nn.Linear(self.cfg.width, classes)
                                       for k in self.cfg.kinds})
            for v in self.vote.values():
                nn.init.zeros_(v.weight)  # starts as the fusion alone
                nn.init.zeros_(v.bias)
        self.register_buffer("log_prior", torch.full((classes,), -float(torch.log(
            torch.tensor(float(classes))))))

    # --- the family's parts ----------------------------------------------------------------
    @property
    def family(self):
        return self._fam[0]

    def head(self, kind: str):
        d = self._kind(kind)
        return self.family.split(d.member, d.point)[0]

    def tail(self):
        """The largest member's tail from the common point: the edge's own trained copy
        with ``tune_tail``, else the family's."""
        if self.cfg.tune_tail:
            return self.edge_tail
        return self.family.split(self.cfg.member, self.cfg.point)[1]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The parameters that start as copies of the family's and train with the fusion:
        the devices' exits with ``tune_exit``, the edge's tail with ``tune_tail``."""
        out = []
        if self.cfg.tune_exit:
            for d in self.devices.values():
                out += d.pretrained_parameters()
        if self.cfg.tune_tail:
            out += list(self.edge_tail.parameters())
        return out

    def _kind(self, kind: str) -> DeviceEncoder:
        if kind not in self.devices:
            raise ConfigError(f"coop: no device kind {kind!r} in this model "
                              f"(it has {sorted(self.devices)})")
        return self.devices[kind]

    @torch.no_grad()
    def set_prior(self, labels: torch.Tensor) -> None:
        """The class prior from training labels (Laplace-smoothed)."""
        counts = torch.bincount(labels.flatten().cpu(), minlength=len(self.log_prior)).float()
        self.log_prior.copy_(torch.log((counts + 1) / (counts.sum() + len(counts))))

    # --- device side ------------------------------------------------------------------------
    def device_features(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The member's features at its split point for views ``x`` ``(B, *input)``."""
        return self.head(kind)(x)

    @property
    def width(self) -> int:
        """Numbers a device sends per sample (``latent * cells^2``)."""
        return self.cfg.width

    def cache_shape(self, kind: str) -> tuple[int, ...]:
        """What a training cache holds per sample and device: the pooled features, or with
        ``tune_exit`` (the stem trains) the features at the device's split point."""
        if self.cfg.tune_exit:
            d = self._kind(kind)
            return tuple(self.family.feature_shape(d.point))
        return self.pooled_shape(kind)

    def pooled_shape(self, kind: str) -> tuple[int, ...]:
        """Shape of one sample's pooled features: ``(P,)``, or ``(P, cells, cells)``."""
        p = self._kind(kind).pooled_dim
        c = self.cfg.cells
        return (p,) if c == 1 else (p, c, c)

    def pooled(self, kind: str, x: torch.Tensor | None = None,
               h: torch.Tensor | None = None) -> torch.Tensor:
        """The member's exit features ``z`` ``(B, P)`` from views ``x`` or features ``h``
        (with ``cells > 1``: max-pooled to a grid, ``(B, P, cells, cells)``)."""
        d = self._kind(kind)
        if h is None:
            if x is None:
                raise ConfigError("coop: pooled() needs views x or features h")
            h = self.device_features(kind, x)
        d.codec.check_features(h)
        enc = d.codec.g_a
        return enc.pool(enc.stem(h))

    def own_logits(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        """The device's own answer (its member's exit) from pooled features ``z`` (a grid's
        maximum over its cells is the global max pool the exit was trained on)."""
        if z.ndim == 4:
            z = z.amax((2, 3))
        return self._kind(kind).classifier(z)

    def latent(self, kind: str, z: torch.Tensor, rate: int | None = None,
               drop_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised latents ``(B, width)`` and estimated bits ``(B,)`` from pooled ``z``
        (noisy in training mode, rounded in eval mode: the TaskCodec's forward from its
        pooled features on; with cells, channel-major: number ``j`` of cell ``p`` at
        ``j * cells^2 + p``, as ``decompress`` gives them)."""
        c = self._kind(kind).codec
        shape = self.pooled_shape(kind)
        if z.ndim != 1 + len(shape) or tuple(z.shape[1:]) != shape:
            raise ConfigError(f"coop: pooled features of kind {kind!r} must be "
                              f"(B, {', '.join(map(str, shape))}), got {tuple(z.shape)}")
        r = c._rate(rate)
        y = c.g_a.proj(z).float().flatten(1) * c._gain(r)
        y_hat, lik = c.entropy_bottlenecks[r](y.view(len(y), c.latent, c.positions))
        y_hat = y_hat.reshape(len(y), c.n_sym)
        bits = -torch.log2(lik).flatten(1).sum(1)
        return y_hat * c._inv_gain(r), bits

    def compress(self, kind: str, h: torch.Tensor, rate: int | None = None):
        """Real streams (one :class:`~flowcodec.bitstream.Bitstream` per sample) of
        features ``h`` ``(B, *feature)`` of a device of ``kind``."""
        return self._kind(kind).codec.compress(h, rate=rate)

    def decompress(self, kind: str, streams) -> torch.Tensor:
        """Dequantised latents ``(B, width)`` from a device's streams (at the edge)."""
        return self._kind(kind).codec.decompress(streams)

    def update(self, force: bool = True) -> None:
        """Freeze the entropy models' tables (before compress / decompress)."""
        for d in self.devices.values():
            d.codec.update(force=force)

    # --- edge side --------------------------------------------------------------------------
    def edge(self, latents, kinds, mask=None, with_features: bool = False,
             batch: int | None = None, anchors=None) -> FusionOutput:
        """Fuse what arrived and finish with the largest member's tail (see EdgeFusion).
        Rows where no device arrived get the class prior and ``empty=True``; with every
        latent None, ``mask`` or ``batch`` gives the number of samples. ``anchors``: each
        device's window anchor id (:data:`~flowcodec.coop.views.N_ANCHORS`; default the
        ``N``-device protocol's slots): session metadata, used with ``cells > 1``."""
        feats, m = self.fusion(latents, kinds, mask, batch, anchors)
        n = m.sum(1)
        logits = self.tail()(feats)
        if self.cfg.vote:
            logits = logits + self._votes(latents, kinds, m)
        empty = n == 0
        prior = self.log_prior.to(logits.dtype).expand_as(logits)
        logits = torch.where(empty[:, None], prior, logits)
        return FusionOutput(logits, empty, n, feats if with_features else None)

    def _votes(self, latents, kinds, m: torch.Tensor) -> torch.Tensor:
        """Mean over the devices that arrived (the fusion's mask ``m`` ``(B, N)``) of each
        one's linear vote ``(B, classes)`` (zeros where none arrived)."""
        dev = self.log_prior.device
        m = m.to(dev)
        total = torch.zeros(len(m), len(self.log_prior), device=dev)
        for i, (t, k) in enumerate(zip(latents, kinds)):
            if t is not None:
                total = total + m[:, i, None] * self.vote[k](t.to(dev).float())
        return total / m.sum(1).clamp(min=1)[:, None]

    # --- accounting -------------------------------------------------------------------------
    def edge_flops_parts(self, kinds) -> tuple[int, dict]:
        """Edge FLOPs per sample: ``(base, {kind: per arriving device})``, the base with
        the largest member's tail."""
        base, per = self.fusion.flops_parts(kinds)
        if self.cfg.vote:
            per = {k: f + count_flops(self.vote[k], (self.cfg.width,)) for k, f in per.items()}
        return base + count_flops(self.tail(), tuple(self.common)), per

    def device_flops(self, kind: str, own_answer: bool = False) -> dict:
        """FLOPs per sample on a device of ``kind``: its head, its encoder (stem, pool,
        linear map or, with cells, 1x1 convolution per cell; the entropy coder is not
        counted) and, with ``own_answer``, the exit's linear layer (the confidence a
        selective protocol sends; the maximum over the cells is not counted)."""
        d = self._kind(kind)
        head = count_flops(self.head(kind), tuple(self.family.input_shape))
        enc = d.codec.encoder_flops()
        own = count_flops(d.classifier, (d.pooled_dim,)) if own_answer else 0
        member = self.family.info()[d.member - 1].flops
        return {"kind": kind, "head": head, "encoder": enc, "own_answer": own,
                "total": head + enc + own, "member": member}


_TABLES = ("_quantized_cdf", "_cdf_length", "_offset")


def save_coop(model: CoopModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` as ``PATH.safetensors`` + ``PATH.json`` (config, family config, extra;
    entropy tables are rebuilt by ``update`` on load)."""
    from flowcodec.family.checkpoint import save_checkpoint

    cfg = {"coop": asdict(model.cfg), "family": model.family.config}
    return save_checkpoint(_Weights(model), path, "coop", cfg, extra)


class _Weights(nn.Module):
    """The model's state dict without the entropy tables (sized by ``update``)."""

    def __init__(self, model: CoopModel) -> None:
        super().__init__()
        self._m = [model]

    def state_dict(self, *a, **k):
        return {n: t for n, t in self._m[0].state_dict().items() if not n.endswith(_TABLES)}


def load_coop(path: str | Path, family) -> CoopModel:
    """Rebuild a model saved by :func:`save_coop` on ``family`` (checked against the saved
    family config), in eval mode with its tables frozen."""
    from flowcodec.family.checkpoint import load_state, read_config

    meta = read_config(path)
    if meta.get("kind") != "coop":
        raise CheckpointError(f"{path}: holds a {meta.get('kind')!r}, not a coop model")
    c = meta.get("config", {})
    if c.get("family") != family.config:
        raise CheckpointError(f"{path}: made for family {c.get('family')}, got {family.config}")
    try:
        raw = dict(c["coop"])
        raw["kinds"] = tuple(raw["kinds"])
        cfg = CoopConfig(**raw)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad coop config: {e}") from e
    model = CoopModel(family, cfg)
    state = load_state(path)
    own = {n: t for n, t in model.state_dict().items() if not n.endswith(_TABLES)}
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        diff = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        raise CheckpointError(f"{path}: made for another coop model ({diff[:4]})")
    model.load_state_dict(state, strict=False)
    model.update(force=True)
    return model.eval()

