"""Familial models: members of different sizes with aligned hidden features.

See :mod:`flowcodec.family.base` for the contract (members, split points),
:mod:`flowcodec.family.zoo` for the registered CNN families and
:mod:`flowcodec.family.vit` for the early-exit ViT.
"""

from flowcodec.family import air as _air  # noqa: F401  (registers cifar10-air)
from flowcodec.family import lm as _lm  # noqa: F401  (registers shakespeare-char)
from flowcodec.family import vit as _vit  # noqa: F401  (registers cifar10-vit)
from flowcodec.family.aligner import Aligner, AlignResult, train_aligner
from flowcodec.family.base import EarlyExitFamily, Head, Member, MemberInfo, Tail
from flowcodec.family.checkpoint import load_family, save_checkpoint
from flowcodec.family.pretrained import load_pretrained, pretrained_path, save_family
from flowcodec.family.train import TrainConfig, TrainResult, evaluate_family, train_family
from flowcodec.family.zoo import FAMILIES, build_family, register_family
from flowcodec.flops import count_flops

__all__ = [
    "Aligner",
    "AlignResult",
    "EarlyExitFamily",
    "FAMILIES",
    "Head",
    "Member",
    "MemberInfo",
    "Tail",
    "TrainConfig",
    "TrainResult",
    "build_family",
    "count_flops",
    "evaluate_family",
    "load_family",
    "load_pretrained",
    "pretrained_path",
    "register_family",
    "save_checkpoint",
    "save_family",
    "train_aligner",
    "train_family",
]
