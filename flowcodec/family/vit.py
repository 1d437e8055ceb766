"""A small early-exit vision transformer for CIFAR-10 (family ``cifar10-vit``).

The trunk is a convolutional patch embedding followed by transformer blocks; split
point ``p`` is after the ``p``-th group of blocks, and what crosses it is the token
sequence ``(N, D)``: one class token and one token per 2x2 patch of the stem's 16x16
map (``N = 65``). Every exit is one more block, a layer norm and a linear head on the
class token, so member ``k`` is the trunk up to group ``k`` plus exit ``k``; the tokens
after group ``p`` mean the same thing to every member that contains it.

The stem is the CNN family's first stage (two 3x3 conv-BN-ReLU layers, the second
pooled), so a trained ``cifar10`` family can start it (``RECIPES["cifar10-vit"]``).

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("cifar10-vit", dim=32, heads=2, depths=(1, 1, 1)).eval()
>>> fam.feature_shape(1), fam.feature_shape(1).layout
(FeatureShape((65, 32), layout='tokens'), 'tokens')
>>> head, tail = fam.split(member=3, point=2)
>>> x = torch.randn(2, 3, 32, 32)
>>> torch.equal(tail(head(x)), fam.member(3)(x))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.family.zoo import conv_bn, register_family

__all__ = ["Block", "ConvPatchEmbed", "TokenExit", "cifar10_vit_family", "copy_stem"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class ConvPatchEmbed(nn.Module):
    """Image -> tokens: the CNN family's first stage (``stem``, 64 x 16 x 16), a 2x2
    stride-2 convolution to ``dim`` channels (64 patch tokens), a class token in front and
    a learned position embedding."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width), conv_bn(width, 2 * width, pool=True))
        self.patch = nn.Conv2d(2 * width, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(self.stem(x)).flatten(2).transpose(1, 2)  # (B, 64, dim)
        return torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos


class TokenExit(nn.Module):
    """One block, a layer norm and a linear head on the class token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, classes: int) -> None:
        super().__init__()
        self.block = Block(dim, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x)[:, 0]))


@register_family("cifar10-vit")
def cifar10_vit_family(dim: int = 128, heads: int = 4, mlp_ratio: int = 2,
                       depths: tuple[int, ...] = (2, 2, 2), width: int = 32,
                       classes: int = 10) -> EarlyExitFamily:  # fmt: skip
    """Three members by default (trunks of 2, 4 and 6 blocks, each plus its exit block).

    The features at every split point are ``(65, dim)`` tokens; ``feature_shape`` reports
    the ``"tokens"`` layout, so codecs for ``(C, H, W)`` maps refuse them."""
    depths = tuple(int(d) for d in depths)
    if not depths or min(depths) < 1:
        raise ConfigError(f"depths must be positive block counts, got {depths}")
    stages: list[nn.Module] = []
    for i, n in enumerate(depths):
        blocks = [Block(dim, heads, mlp_ratio) for _ in range(n)]
        stages.append(nn.Sequential(ConvPatchEmbed(dim, width), *blocks) if i == 0
                      else nn.Sequential(*blocks))  # fmt: skip
    exits = [TokenExit(dim, heads, mlp_ratio, classes) for _ in depths]
    fam = EarlyExitFamily(stages, exits, (3, 32, 32), layout="tokens")
    for m in fam.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return fam


def copy_stem(vit: EarlyExitFamily, cnn: EarlyExitFamily) -> None:
    """Start ``vit``'s convolutional stem from ``cnn``'s first stage (same layers)."""
    stem = vit.stages[0][0].stem
    try:
        stem.load_state_dict(cnn.stages[0].state_dict())
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"the CNN family's first stage does not fit the ViT stem: {e}") from e
