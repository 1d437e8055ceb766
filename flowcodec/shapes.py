"""Feature shapes that say their layout: what crosses a split point, per sample.

A feature's layout is part of its shape (DESIGN.md): channels-first maps ``(C, H, W)``,
channels-last maps ``(H, W, C)`` and token sequences ``(N, D)`` are declared by whoever
produces them (a split, a family) and checked by the codecs that take them; a codec never
guesses which axis is which. Ground floor: imports nothing of flowcodec but its errors.

Example
-------
>>> s = FeatureShape((8, 8, 192), "hwc")
>>> s == (8, 8, 192), s.layout, layout_of((64, 16, 16))
(True, 'hwc', None)
"""

from __future__ import annotations

from flowcodec.errors import ConfigError

__all__ = ["LAYOUTS", "FeatureShape", "layout_of"]

#: Feature layouts a split reports (per sample, no batch axis).
LAYOUTS = {
    "chw": "channels-first map (C, H, W)",
    "hwc": "channels-last map (H, W, C)",
    "tokens": "token sequence (N, D)",
    "vector": "one vector (D,)",
    "other": "anything else (channels first along axis 0)",
}


class FeatureShape(tuple):
    """A per-sample feature shape that also says its :data:`LAYOUTS` entry.

    It compares and hashes as the plain tuple, so ``split.feature_shape == (128, 8, 8)``;
    codecs built on it (``build_codec(name, split.feature_shape)``) read ``layout`` and
    refuse a layout they cannot code instead of guessing the channel axis.

    >>> s = FeatureShape((8, 8, 192), "hwc")
    >>> s == (8, 8, 192), s.layout
    (True, 'hwc')
    """

    layout: str

    def __new__(cls, shape, layout: str):
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        self = super().__new__(cls, (int(d) for d in shape))
        self.layout = layout
        return self

    def __repr__(self) -> str:
        return f"FeatureShape({tuple(self)}, layout={self.layout!r})"

    def __getnewargs__(self):
        return (tuple(self), self.layout)


def layout_of(feature_shape) -> str | None:
    """The layout ``feature_shape`` declares (a :class:`FeatureShape`), or None."""
    return getattr(feature_shape, "layout", None)
