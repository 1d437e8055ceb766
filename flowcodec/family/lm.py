"""A character-level early-exit language family (family ``shakespeare-char``).

A decoder-only causal transformer cut into stages of blocks, with one exit (a layer norm
and a linear layer over the vocabulary) after each stage. Member ``k`` runs stages
``1..k`` and exit ``k``; all members share the trunk, so the hidden states after stage
``p`` mean the same thing to every member that contains it, as in the image families.

What crosses split point ``p >= 1`` is the per-token hidden state sequence ``(N, D)``
(layout ``"tokens"``); point 0 is the token ids themselves ``(N,)``. Every stage, head,
tail and member takes an optional :class:`KVCache`, so a sequence can be fed in pieces
(a prompt, then one token or a few drafted tokens at a time): the logits of the new
positions equal those of the whole sequence fed at once (to float rounding).

Positions are learned and absolute, up to ``context`` tokens; a longer sequence is a
:class:`~flowcodec.errors.ConfigError` (generation stays within the context).

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=16).eval()
>>> x = torch.randint(0, 65, (2, 10))
>>> head, tail = fam.split(member=3, point=1)
>>> torch.equal(tail(head(x)), fam.member(3)(x))
True
>>> cache = KVCache()
>>> a = fam.member(3)(x[:, :6], cache)          # a prompt ...
>>> b = fam.member(3)(x[:, 6:], cache)          # ... then the rest, from the cache
>>> torch.allclose(torch.cat([a, b], 1), fam.member(3)(x), atol=1e-5)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily, Head, Member, MemberInfo, Tail, _params
from flowcodec.family.zoo import register_family
from flowcodec.shapes import FeatureShape

__all__ = ["KVCache", "CausalBlock", "TokenEmbedding", "LMStage", "LMExit", "LMHead", "LMTail",
           "LMMember", "LanguageFamily", "shakespeare_char_family",
           "SHAKESPEARE_CHARS"]  # fmt: skip

#: The 65 characters of tinyshakespeare, sorted (the default vocabulary: id = index).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class KVCache:
    """Keys and values of the positions already processed, per layer (block index).

    One cache belongs to one party (the device or the edge) and one batch of sequences;
    the layers a head or tail does not run stay empty. :meth:`truncate` drops positions
    (rejected drafts) from every layer.

    >>> c = KVCache(); c.length(0)
    0
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def length(self, layer: int) -> int:
        """Positions cached for ``layer`` (0 if none)."""
        k = self.keys.get(layer)
        return 0 if k is None else k.shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Add ``(B, heads, n, d)`` keys and values; returns all of the layer's keys, values."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], 2)
            v = torch.cat([self.values[layer], v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer."""
        if not isinstance(length, int) or length < 0:
            raise ConfigError(f"cache length must be an int >= 0, got {length!r}")
        for layer in list(self.keys):
            self.keys[layer] = self.keys[layer][:, :, :length]
            self.values[layer] = self.values[layer][:, :, :length]

    def __len__(self) -> int:
        """Positions cached by the deepest-filled layer (0 for an empty cache)."""
        return max((k.shape[2] for k in self.keys.values()), default=0)


class CausalBlock(nn.Module):
    """Pre-norm causal transformer block, ``(B, n, D) -> (B, n, D)``.

    With a cache holding ``P`` positions, the ``n`` new positions attend to the ``P`` cached
    ones and causally to each other; their keys and values are appended to the cache."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, layer: int,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.layer, self.dropout = heads, layer, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))  # fmt: skip
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, n, d_head)
        past = 0
        if cache is not None:
            past = cache.length(self.layer)
            k, v = cache.append(self.layer, k, v)
        p = self.dropout if self.training else 0.0
        if past == 0:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif n == 1:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # new position i sees cached positions and new positions up to i
            i = torch.arange(n, device=x.device).unsqueeze(1)
            j = torch.arange(past + n, device=x.device).unsqueeze(0)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + past, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TokenEmbedding(nn.Module):
    """Token ids ``(B, n)`` int64 at positions ``start..start+n-1`` -> ``(B, n, D)``."""

    def __init__(self, vocab: int, dim: int, context: int) -> None:
        super().__init__()
        self.vocab, self.context = vocab, context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
            raise ConfigError(f"token ids must be an int64 tensor (B, n), got {ids.dtype} "
                              f"{tuple(ids.shape)}")  # fmt: skip
        n = ids.shape[1]
        if n == 0:
            raise ConfigError("a token sequence must hold at least one token")
        if start + n > self.context:
            raise ConfigError(f"positions {start}..{start + n - 1} exceed the context of "
                              f"{self.context} tokens")  # fmt: skip
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ConfigError(f"token ids must lie in 0..{self.vocab - 1}, got "
                              f"{int(ids.min())}..{int(ids.max())}")  # fmt: skip
        pos = torch.arange(start, start + n, device=ids.device)
        return self.tok(ids) + self.pos(pos)


class LMStage(nn.Module):
    """A group of blocks (the first stage also embeds the ids). ``(B, n[, D]) -> (B, n, D)``."""

    def __init__(self, blocks: list[CausalBlock], embed: TokenEmbedding | None = None) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.embed is not None:
            start = cache.length(self.blocks[0].layer) if cache is not None else 0
            x = self.embed(x, start)
        elif cache is not None and self.blocks:
            ctx = _context_of(self)
            if ctx and cache.length(self.blocks[0].layer) + x.shape[1] > ctx:
                raise ConfigError(f"the sequence would exceed the context of {ctx} tokens")
        for blk in self.blocks:
            x = blk(x, cache)
        return x


def _context_of(stage: LMStage) -> int | None:
    return getattr(stage, "context", None)


class LMExit(nn.Module):
    """Layer norm and a linear layer: ``(B, n, D) -> (B, n, vocab)`` logits."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


def _check_hidden(h: torch.Tensor, point: int, dim: int) -> None:
    if point > 0 and (h.ndim != 3 or h.shape[-1] != dim or not h.is_floating_point()):
        raise ConfigError(f"hidden states at split point {point} must be float (B, n, {dim}), "
                          f"got {h.dtype} {tuple(h.shape)}")  # fmt: skip


class LMHead(Head):
    """Stages ``1..point`` (the device part): ids ``(B, n)`` -> hidden states ``(B, n, D)``
    (``point = 0``: the ids themselves). ``cache`` holds the device's past positions."""

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for s in self.stages:
            x = s(x, cache)
        return x


class LMTail(Tail):
    """Stages ``point+1..k`` and exit ``k``: hidden states (or ids at point 0) ->
    ``(B, n, vocab)`` logits. ``cache`` holds the receiver's past positions of its layers."""

    def __init__(self, stages, exit_branch, point: int, dim: int) -> None:
        super().__init__(stages, exit_branch, point)
        self.dim = dim

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        _check_hidden(h, self.point, self.dim)
        for s in self.stages:
            h = s(h, cache)
        return self.exit(h)


class LMMember(Member):
    """Member ``k``: ids ``(B, n)`` -> logits ``(B, n, vocab)``, with an optional cache."""

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for s in self.stages:
            x = s(x, cache)
        return self.exit(x)


class LanguageFamily(EarlyExitFamily):
    """An early-exit causal language model (see the module docstring).

    Calling it on ids ``(B, n)`` returns the logits ``(B, n, vocab)`` of every exit in one
    pass. :meth:`info` reports parameters and FLOPs *per token* (averaged over a full
    context window, causal attention included). ``chars`` (if given) is the vocabulary:
    id ``i`` is character ``chars[i]``.
    """

    def __init__(self, stages: list[LMStage], exits: list[LMExit], context: int, dim: int,
                 vocab: int, chars: str | None = None,
                 config: dict | None = None) -> None:  # fmt: skip
        super().__init__(stages, exits, (context,), config=config, layout="tokens")
        self.context, self.dim, self.vocab, self.chars = context, dim, vocab, chars
        for s in stages:
            s.context = context

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> list[torch.Tensor]:
        outs = []
        for stage, ex in zip(self.stages, self.exits, strict=True):
            x = stage(x, cache)
            outs.append(ex(x))
        return outs

    def member(self, k: int) -> LMMember:
        self._check_member(k)
        return LMMember(list(self.stages[:k]), self.exits[k - 1], k).train(self.training)

    def split(self, member: int, point: int) -> tuple[LMHead, LMTail]:
        """``(head, tail)`` with ``tail(head(x)) == member(x)`` (bit-exact in eval mode);
        each takes its own party's :class:`KVCache` as a second argument."""
        self._check_point(member, point)
        head = LMHead(list(self.stages[:point]), point).train(self.training)
        tail = LMTail(list(self.stages[point:member]), self.exits[member - 1], point, self.dim)
        return head, tail.train(self.training)

    def features(self, x: torch.Tensor, point: int, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states after stage ``point`` (0 = the ids)."""
        self._check_point(self.num_members, point)
        for s in self.stages[:point]:
            x = s(x, cache)
        return x

    def feature_shape(self, point: int):
        """``(context,)`` ids at point 0, else ``FeatureShape((context, dim), "tokens")``."""
        self._check_point(self.num_members, point)
        if point == 0:
            return (self.context,)
        return FeatureShape((self.context, self.dim), "tokens")

    def blocks_upto(self, point: int) -> int:
        """Number of transformer blocks in stages ``1..point``."""
        return sum(len(s.blocks) for s in self.stages[:point])

    def _flops(self, modules: list[nn.Module], blocks: int) -> int:
        """FLOPs per token over a full window: the linear layers as counted by
        ``torch.utils.flop_counter`` (2 per multiply-accumulate) plus causal attention
        (``QK^T`` and ``AV``: ``4 * D * (t + 1)`` at position ``t``, averaged)."""
        from torch.utils.flop_counter import FlopCounterMode

        n = self.context
        p = next(self.parameters())
        was = self.training
        self.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                x = torch.zeros((1, n), dtype=torch.long, device=p.device)
                for m in modules:
                    x = m(x)
        finally:
            self.train(was)
        attn = blocks * 4 * self.dim * (n + 1) * n // 2
        return round((fc.get_total_flops() + attn) / n)

    def info(self) -> list[MemberInfo]:
        """Parameters and FLOPs per token of every member, smallest first."""
        return [MemberInfo(k, _params([self.member(k)]),
                           self._flops([self.member(k)], self.blocks_upto(k)))
                for k in range(1, self.num_members + 1)]  # fmt: skip

    def head_flops(self, point: int) -> int:
        """FLOPs per token of stages ``1..point`` (the device's share of the trunk)."""
        self._check_point(self.num_members, point)
        if point == 0:
            return 0
        return self._flops([self.split(self.num_members, point)[0]], self.blocks_upto(point))


@register_family("shakespeare-char")
def shakespeare_char_family(dim: int = 192, heads: int = 6, mlp_ratio: int = 4,
                            depths: tuple[int, ...] = (2, 2, 3), context: int = 128,
                            vocab: int | None = None, chars: str | None = SHAKESPEARE_CHARS,
                            dropout: float = 0.0) -> LanguageFamily:  # fmt: skip
    """Three members by default (trunks of 2, 4 and 7 blocks of width 192).

    Member 1 runs 2 of the 7 blocks, so its FLOPs per token are under a third of member
    3's (it is the device's drafting exit). ``chars`` is the vocabulary (``vocab`` defaults
    to its length); with ``chars=None`` give ``vocab``."""
    depths = tuple(int(d) for d in depths)
    if not depths or min(depths) < 1:
        raise ConfigError(f"depths must be positive block counts, got {depths}")
    if chars is not None:
        if len(set(chars)) != len(chars) or not chars:
            raise ConfigError("chars must be a non-empty string of distinct characters")
        if vocab is not None and vocab != len(chars):
            raise ConfigError(f"vocab ({vocab}) differs from len(chars) ({len(chars)})")
        vocab = len(chars)
    if vocab is None or int(vocab) < 2:
        raise ConfigError(f"vocab must be an int >= 2 (or give chars), got {vocab!r}")
    if int(context) < 1 or int(dim) < 1 or int(mlp_ratio) < 1:
        raise ConfigError("context, dim and mlp_ratio must be positive")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
    stages, layer = [], 0
    for i, n in enumerate(depths):
        blocks = [CausalBlock(dim, heads, mlp_ratio, layer + j, dropout) for j in range(n)]
        layer += n
        stages.append(LMStage(blocks, TokenEmbedding(vocab, dim, context) if i == 0 else None))
    exits = [LMExit(dim, vocab) for _ in depths]
    fam = LanguageFamily(stages, exits, context, dim, vocab, chars)
    for name, m in fam.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / (2 * layer) ** 0.5 if name.endswith(("proj", "mlp.2")) else 0.02
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    return fam
