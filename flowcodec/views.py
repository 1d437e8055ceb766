"""Input views: the input, its mirror image and two shifted copies, in a fixed order.

A multi-view codec (``views=V``) codes the device's features of the first ``V`` views of each
input; the receiver averages what it decodes from them. The device runs its head once per
view, which the accounting counts (DESIGN.md, "Honest accounting"). Ground floor: imports
torch and nothing of flowcodec but its errors.

Example
-------
>>> import torch
>>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
>>> VIEWS["flip"](x).flatten().tolist()
[1.0, 0.0, 3.0, 2.0]
>>> view_features(lambda v: v, x, 2).shape
torch.Size([1, 2, 2, 2])
"""

from __future__ import annotations

import torch

from flowcodec.errors import ConfigError

__all__ = ["VIEWS", "shift", "check_views", "view_features"]


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by ``(dx, dy)`` pixels (right, down), zeros shifted in."""
    p = max(abs(dx), abs(dy))
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


#: The input views a multi-view codec codes, in order (``views=V`` uses the first V):
#: the input, its mirror image, and the two moved by 2 pixels. Each view's features are
#: coded alone; the receiver averages the features it decodes from them.
VIEWS = {
    "identity": lambda x: x,
    "flip": lambda x: torch.flip(x, dims=[-1]),
    "shift": lambda x: shift(x, 2, 2),
    "flip-shift": lambda x: torch.flip(shift(x, -2, -2), dims=[-1]),
}


def check_views(views, what: str = "views") -> int:
    """``views`` if it is an int in ``1..len(VIEWS)``; a :class:`ConfigError` naming ``what``
    otherwise (a bool is not a count)."""
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= len(VIEWS):
        raise ConfigError(f"{what} must be an int in 1..{len(VIEWS)}, got {views!r}")
    return views


def view_features(head, x: torch.Tensor, views: int) -> torch.Tensor:
    """The device's features of the first ``views`` of :data:`VIEWS` of images ``x``
    ``(B, 3, H, W)``, stacked on the channel axis: ``(B, views * C, h, w)``, what a
    multi-view codec built with ``views`` takes."""
    if not 1 <= int(views) <= len(VIEWS):
        raise ConfigError(f"views must be in 1..{len(VIEWS)}, got {views}")
    fns = list(VIEWS.values())[: int(views)]
    return torch.cat([head(f(x)) for f in fns], 1)
