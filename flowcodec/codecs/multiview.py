"""Codecs that code several views of each input (:data:`flowcodec.views.VIEWS`).

:class:`MultiView` is a mixin for a :class:`~flowcodec.codecs.base.FeatureCodec` (used by the
task and JSCC codecs).
"""

from __future__ import annotations

import torch

from flowcodec.errors import ConfigError
from flowcodec.views import check_views
from flowcodec.views import view_features as _view_features

__all__ = ["MultiView"]


class MultiView:
    """What a codec that codes several views of each input (:data:`flowcodec.views.VIEWS`)
    adds to a :class:`~flowcodec.codecs.base.FeatureCodec` (put it first among the bases):
    ``views``, the stacked input shape, its checks, the device's features and the encoder's
    FLOPs once per view. The codec calls :meth:`set_views` in its constructor."""

    views: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of what ``compress`` takes: ``feature_shape`` with
        ``views`` times its channels (the views' features stacked, see
        :func:`flowcodec.views.view_features`)."""
        c, *rest = self.feature_shape
        return (self.views * c, *rest)

    def check_features(self, h: torch.Tensor) -> None:
        if self.views == 1:
            return super().check_features(h)
        if isinstance(h, torch.Tensor) and (h.ndim != 4 or tuple(h.shape[1:]) != self.input_shape):
            raise ConfigError(
                f"{self.name} codec with {self.views} views: features must have shape "
                f"(B, *{self.input_shape}), the features of the input's {self.views} views "
                f"stacked on the channel axis (flowcodec.views.view_features(head, x, "
                f"{self.views})), got {tuple(h.shape)}")  # fmt: skip
        c = self.feature_shape[0]
        for v in range(self.views):  # the remaining checks, view by view
            super().check_features(h[:, v * c : (v + 1) * c])

    def set_views(self, views: int):
        """Code ``views`` input views from now on (no weights change: the same encoder
        codes each view). Returns self."""
        self.views = check_views(views, f"{self.name} codec: views")
        return self

    def device_features(self, head, x: torch.Tensor) -> torch.Tensor:
        """What the device computes from inputs ``x`` for ``compress``: ``head(x)``, or
        with ``views > 1`` the stacked features of the views
        (:func:`flowcodec.views.view_features`)."""
        return head(x) if self.views == 1 else _view_features(head, x, self.views)

    def encoder_flops(self) -> int:
        """FLOPs per sample of the device-side encoder (once per view; the extra views
        also run the device's head once more each, which this does not count)."""
        return self.views * super().encoder_flops()

    @torch.no_grad()
    def fit(self, features: torch.Tensor):
        """Concealment statistics from one view's training features ``(N, *feature_shape)``."""
        super().check_features(features)  # the single-view check
        self.conceal.copy_(features.float().mean(0))
        return self

    def _by_view(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, V*C, H, W)`` -> ``(B*V, C, H, W)``, sample-major."""
        return h.reshape(len(h) * self.views, *self.feature_shape)
