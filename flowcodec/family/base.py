"""Early-exit families: different-sized models whose hidden features are aligned.

A family is a shared trunk cut into stages plus one exit branch per stage. Member ``k``
(1-based) runs stages ``1..k`` and exit ``k``; a larger member contains every stage of
a smaller one, so the hidden features after stage ``p`` mean the same thing to every
member that contains ``p``. That is what lets a small member on a device hand its
features to a larger member elsewhere.

Split point ``p`` (0..k) is the boundary after stage ``p``; ``p = 0`` is the input.

A family may also branch: ``parents[i]`` names the split point that stage ``i + 1`` reads
(by default ``i``, the chain above). A cloud member that branches after stage 1 (its stage
reads point 1, not the stage before it) shares only stage 1 with the device members: its
split points are 0, 1 and its own, and features at point 1 mean the same thing to it as to
every device member.

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("digits").eval()
>>> head, tail = fam.split(member=3, point=1)
>>> x = torch.randn(2, 1, 8, 8)
>>> torch.equal(tail(head(x)), fam.member(3)(x))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowcodec._moved import moved
from flowcodec.errors import ConfigError
from flowcodec.flops import count_flops as _count_flops
from flowcodec.shapes import FeatureShape

__all__ = ["EarlyExitFamily", "Member", "Head", "Tail", "MemberInfo"]

# count_flops lives in flowcodec.flops; the old name warns for a release
__getattr__ = moved(__name__, {"count_flops": "flowcodec.flops"})


def _params(modules) -> int:
    seen: set[int] = set()
    n = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


class Head(nn.Module):
    """Stages ``1..point`` of a family (the device part). ``(B, *input) -> (B, *feature)``."""

    def __init__(self, stages: list[nn.Module], point: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.point = point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return x


class Tail(nn.Module):
    """Stages ``point+1..k`` and exit ``k`` (the receiver part). Features -> logits."""

    def __init__(self, stages: list[nn.Module], exit_branch: nn.Module, point: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.exit = exit_branch
        self.point = point

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            h = s(h)
        return self.exit(h)


class Member(Tail):
    """Member ``k`` of a family: stages ``1..k`` then exit ``k``. ``(B, *input) -> (B, classes)``.

    The tail from split point 0; shares its parameters with the family (no copy)."""

    def __init__(self, stages: list[nn.Module], exit_branch: nn.Module, index: int) -> None:
        super().__init__(stages, exit_branch, point=0)
        self.index = index


@dataclass(frozen=True)
class MemberInfo:
    """Size of one member: parameters and FLOPs per sample."""

    index: int
    params: int
    flops: int


class EarlyExitFamily(nn.Module):
    """A trunk of stages with one exit branch per stage.

    Parameters
    ----------
    stages : list of nn.Module
        ``stages[i]`` maps the features after stage ``i`` to those after stage ``i+1``.
    exits : list of nn.Module
        ``exits[i]`` maps the features after stage ``i+1`` to class logits.
    input_shape : tuple of int
        Per-sample input shape, e.g. ``(3, 32, 32)``.
    config : dict
        The builder name and arguments (saved with checkpoints, used to rebuild).
    parents : list of int, optional
        ``parents[i]`` is the split point stage ``i + 1`` reads, ``0 <= parents[i] <= i``
        (default ``i``: a chain). Member ``k`` runs the stages on the path from the input to
        stage ``k``; its split points are the points on that path.
    layout : str
        What crosses a split point after stage 1 or later (a ``flowcodec.shapes.LAYOUTS``
        entry): ``"chw"`` maps for the CNN families, ``"tokens"`` for the ViT family, whose
        ``feature_shape`` then says so (codecs read it and refuse what they cannot code).

    Calling the family returns the logits of every exit, ``list[(B, classes)]``, computed
    in one pass over the trunk (what joint training needs).
    """

    def __init__(
        self,
        stages: list[nn.Module],
        exits: list[nn.Module],
        input_shape: tuple[int, ...],
        config: dict | None = None,
        layout: str = "chw",
        parents: list[int] | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != len(exits) or not stages:
            raise ConfigError("a family needs one exit per stage and at least one stage")
        parents = list(range(len(stages))) if parents is None else list(parents)
        if len(parents) != len(stages) or any(
                isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= i
                for i, q in enumerate(parents)):  # fmt: skip
            raise ConfigError(f"parents must list one split point per stage, parents[i] in "
                              f"0..i, got {parents!r}")  # fmt: skip
        self.parents = parents
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.input_shape = tuple(input_shape)
        self.config = dict(config or {})
        self.layout = layout

    @property
    def num_members(self) -> int:
        return len(self.stages)

    def _check_member(self, member: int) -> None:
        if not isinstance(member, int) or not 1 <= member <= self.num_members:
            raise ConfigError(f"member must be an int in 1..{self.num_members}, got {member!r}")

    @property
    def branched(self) -> bool:
        """Whether some stage reads a point other than the one just before it."""
        return self.parents != list(range(self.num_members))

    def path(self, member: int) -> list[int]:
        """The split points member ``member`` passes through, from the input (0) to its last
        stage's output (``member``): ``0..member`` for a chain."""
        self._check_member(member)
        out = [member]
        while out[-1] > 0:
            out.append(self.parents[out[-1] - 1])
        return out[::-1]

    def receiver(self, point: int) -> int:
        """The largest member whose path passes through split point ``point``: the default
        receiver of features sent from there (the last member, unless it branches off
        before ``point``)."""
        self._check_any_point(point)
        return max(k for k in range(1, self.num_members + 1) if point in self.path(k))

    def _check_point(self, member: int, point: int) -> None:
        self._check_member(member)
        path = self.path(member)
        if isinstance(point, bool) or not isinstance(point, int) or point not in path:
            where = (f"in 0..{member}" if path == list(range(member + 1))
                     else f"one of {path} (its stages branch)")  # fmt: skip
            raise ConfigError(
                f"split point must be an int {where} for member {member}, got {point!r}"
            )

    def _check_any_point(self, point: int) -> None:
        if isinstance(point, bool) or not isinstance(point, int) \
                or not 0 <= point <= self.num_members:  # fmt: skip
            raise ConfigError(f"split point must be an int in 0..{self.num_members}, "
                              f"got {point!r}")  # fmt: skip

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, feats = [], [x]  # feats[p]: the features at split point p
        for i, (stage, ex) in enumerate(zip(self.stages, self.exits, strict=True)):
            feats.append(stage(feats[self.parents[i]]))
            outs.append(ex(feats[-1]))
        return outs

    def _stages(self, points: list[int]) -> list[nn.Module]:
        return [self.stages[q - 1] for q in points if q > 0]

    def member(self, k: int) -> Member:
        """Member ``k`` (1-based) as a module sharing this family's parameters."""
        return Member(self._stages(self.path(k)), self.exits[k - 1], k).train(self.training)

    def split(self, member: int, point: int) -> tuple[Head, Tail]:
        """``(head, tail)`` with ``tail(head(x)) == member(x)`` (bit-exact in eval mode)."""
        self._check_point(member, point)
        path = self.path(member)
        cut = path.index(point) + 1
        return (
            Head(self._stages(path[:cut]), point).train(self.training),
            Tail(self._stages(path[cut:]), self.exits[member - 1], point).train(self.training),
        )

    def features(self, x: torch.Tensor, point: int) -> torch.Tensor:
        """Hidden features after stage ``point`` (0 = the input itself)."""
        self._check_any_point(point)
        for s in self._stages(self.path(point) if point else []):
            x = s(x)
        return x

    def feature_shape(self, point: int) -> tuple[int, ...]:
        """Per-sample shape of the features at ``point``."""
        self._check_any_point(point)
        p = next(self.parameters())
        with torch.no_grad():
            was = self.training
            self.eval()
            h = self.features(torch.zeros((1, *self.input_shape), device=p.device), point)
            self.train(was)
        if point == 0 or self.layout == "chw":
            return tuple(h.shape[1:])
        return FeatureShape(h.shape[1:], self.layout)

    def info(self) -> list[MemberInfo]:
        """Parameters and FLOPs of every member, smallest first."""
        out = []
        for k in range(1, self.num_members + 1):
            m = self.member(k)
            out.append(MemberInfo(k, _params([m]), _count_flops(m, self.input_shape)))
        return out

    def head_flops(self, point: int) -> int:
        """FLOPs of stages ``1..point`` on one sample (the device's share of the trunk)."""
        if point == 0:
            return 0
        head, _ = self.split(point, point)
        return _count_flops(head, self.input_shape)
