"""Family builders and their registry (``build_family(name, **kwargs)``).

- ``digits``: three members for 1x8x8 digits (about 5 k, 20 k and 120 k parameters).
- ``cifar10``: three members of a ResNet-9-style trunk for 3x32x32 images, width ``w``
  (default 32: about 0.2 M, 0.5 M and 1.6 M parameters). ``cloud="xl"`` makes the last
  stage and exit a much wider one (:func:`cloud_stage`): member 3 then runs at the edge or
  in the cloud, while stages 1 and 2 (what the device members run) are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily

__all__ = ["FAMILIES", "register_family", "build_family", "digits_family", "cifar10_family",
           "cifar10_cloud_family",
           "cloud_stage", "CLOUD_STAGES", "branch_stage", "BRANCH_STAGES"]

FAMILIES: dict[str, Callable[..., EarlyExitFamily]] = {}


def register_family(name: str):
    """Decorator adding a builder to :data:`FAMILIES` under ``name``."""

    def deco(fn):
        if name in FAMILIES:
            raise ConfigError(f"family {name!r} is already registered")
        FAMILIES[name] = fn
        return fn

    return deco


def build_family(name: str, **kwargs) -> EarlyExitFamily:
    """Build a registered family with fresh weights."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[name](**kwargs)
    fam.config = {"name": name, **kwargs}
    return fam


def conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` two 3x3 conv-BN-ReLU layers at constant width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.f(x)


def exit_branch(cin: int, hidden: int, classes: int, pool: bool, second: bool) -> nn.Sequential:
    """conv-BN-ReLU (+ pool) (+ a second conv) -> global max pool -> linear."""
    layers: list[nn.Module] = [conv_bn(cin, hidden, pool=pool)]
    if second:
        layers.append(conv_bn(hidden, hidden))
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


@register_family("digits")
def digits_family(classes: int = 10) -> EarlyExitFamily:
    stages = [
        conv_bn(1, 16),  # 16x8x8
        conv_bn(16, 32, pool=True),  # 32x4x4
        nn.Sequential(conv_bn(32, 64), conv_bn(64, 64)),  # 64x4x4
    ]
    exits = [
        exit_branch(16, 32, classes, pool=True, second=False),
        exit_branch(32, 48, classes, pool=False, second=False),
        exit_branch(64, 64, classes, pool=False, second=False),
    ]
    return EarlyExitFamily(stages, exits, (1, 8, 8))


class Scale(nn.Module):
    """Multiply by a fixed factor (keeps a wide max-pooled exit's first logits small, so
    SGD at the usual learning rates does not diverge in its first steps)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


#: Widths of the large last stages (``cifar10(cloud=...)``), as multiples of ``width``.
CLOUD_STAGES = {"xl": (6, 12)}


def cloud_stage(cin: int, w: int, classes: int, kind: str = "xl") -> tuple[nn.Module, nn.Module]:
    """A wide last stage and its exit for a 8x8 map of ``cin`` channels: a conv to ``a*w``
    channels, a residual pair at 8x8, a pooled conv to ``b*w`` channels and a residual pair
    at 4x4, then a global max pool and a linear layer (``(a, b) = CLOUD_STAGES[kind]``)."""
    if kind not in CLOUD_STAGES:
        raise ConfigError(f"unknown cloud stage {kind!r}; known: "
                          f"{sorted(CLOUD_STAGES) + sorted(BRANCH_STAGES)}")
    a, b = (m * w for m in CLOUD_STAGES[kind])
    stage = nn.Sequential(conv_bn(cin, a), Residual(a), conv_bn(a, b, pool=True), Residual(b))
    exit_ = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(b, classes),
                          Scale(0.125))  # fmt: skip
    return stage, exit_


#: Cloud members that branch after stage 1 (``cifar10(cloud=...)``): the widths of their
#: two conv groups, as multiples of ``width`` (32: 256 and 256, airbench's last two groups).
#: They read split point 1, so members 1-3 are unchanged and kept.
BRANCH_STAGES = {"air": (8, 8)}


def branch_stage(cin: int, w: int, classes: int, kind: str = "air") -> tuple[nn.Module, nn.Module]:
    """A cloud stage for a 16x16 map of ``cin`` channels (split point 1 of ``cifar10``):
    two airbench-style conv groups (conv, 2x2 max pool, BN, GELU, conv, BN, GELU; 16 -> 8 ->
    4 px), then a global max pool and a linear layer (``BRANCH_STAGES[kind]`` widths)."""
    from flowcodec.family.air import ConvGroup

    a, b = (m * w for m in BRANCH_STAGES[kind])
    stage = nn.Sequential(ConvGroup(cin, a), ConvGroup(a, b))
    exit_ = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(b, classes, bias=False),
                          Scale(1 / 9))  # fmt: skip
    return stage, exit_


@register_family("cifar10-cloud")
def cifar10_cloud_family(width: int = 32, classes: int = 10, cloud: str = "air") -> EarlyExitFamily:
    """The ``cifar10`` family with a cloud member 4 that branches after stage 1
    (``cifar10(cloud="air")``): members 1-3 are ``cifar10``'s, bit for bit, so every codec
    of ``cifar10`` works with it; member 4 reads split point 1 only."""
    if cloud not in BRANCH_STAGES:
        raise ConfigError(f"cifar10-cloud: cloud must be one of {sorted(BRANCH_STAGES)}, "
                          f"got {cloud!r}")  # fmt: skip
    return cifar10_family(width, classes, cloud)


@register_family("cifar10")
def cifar10_family(width: int = 32, classes: int = 10, cloud: str | None = None) -> EarlyExitFamily:
    """Three members (``width`` 32: 96, 153 and 228 MFLOPs). ``cloud``: a kind of
    ``CLOUD_STAGES`` replaces member 3 by a wider one on points 2's features; a kind of
    ``BRANCH_STAGES`` adds a member 4 that branches after stage 1 (it reads split point 1)."""
    w = width
    stages = [
        nn.Sequential(conv_bn(3, w), conv_bn(w, 2 * w, pool=True)),  # 2w x 16 x 16
        nn.Sequential(Residual(2 * w), conv_bn(2 * w, 4 * w, pool=True)),  # 4w x 8 x 8
        nn.Sequential(Residual(4 * w), conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w)),
    ]
    exits = [
        exit_branch(2 * w, 4 * w, classes, pool=True, second=True),
        exit_branch(4 * w, 8 * w, classes, pool=True, second=False),
        nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(8 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, classes),
        ),  # fmt: skip
    ]
    if cloud in BRANCH_STAGES:
        stage, exit_ = branch_stage(2 * w, w, classes, cloud)
        return EarlyExitFamily(stages + [stage], exits + [exit_], (3, 32, 32),
                               parents=[0, 1, 2, 1])  # fmt: skip
    if cloud is not None:
        stages[2], exits[2] = cloud_stage(4 * w, w, classes, cloud)
    return EarlyExitFamily(stages, exits, (3, 32, 32))
