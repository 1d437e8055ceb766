"""Small instances of every registered codec: one table for tests, fuzzing and examples.

``SMALL_CODECS[name]`` holds the keyword arguments that build a small instance of codec
``name`` on a ``SMALL_SHAPE`` = (16, 8, 8) feature map (a few thousand parameters at most,
fitted and coded in well under a second on a CPU). Codecs that take another input (image
codecs take (3, H, W) pixels, ``token-map`` takes (N, D) tokens) list their input shape in
``SMALL_SHAPES``. An empty dict means the codec's defaults are already small.

``build_small(name)`` builds one, seeded, with ``torch.manual_seed(0)``::

    >>> from flowcodec.codecs.examples import SMALL_CODECS, build_small
    >>> SMALL_CODECS["quant"]
    {'bits': 4, 'packets': 2}
    >>> build_small("token-map").feature_shape
    (17, 16)

Callers that need other values for one test (more packets, another rank) pass them as
keywords (``build_small("quant", packets=4)``) or merge them into a copy of the entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flowcodec.codecs.base import FeatureCodec, build_codec

#: the feature-map shape every entry of SMALL_CODECS is sized for (C, H, W)
SMALL_SHAPE = (16, 8, 8)

#: codec name -> keyword arguments of a small instance on a SMALL_SHAPE input
SMALL_CODECS: dict[str, dict] = {
    "raw": dict(dtype="float16", packets=2),
    "quant": dict(bits=4, packets=2),
    "pca": dict(rank=6, bits=6, packets=2),
    "factorized": dict(latent=8, hidden=16, packets=2),
    "hyperprior": dict(latent=8, hidden=16, packets=2, hyper=4),
    "binary": dict(latent=4, hidden=16, packets=2),
    "token-merge": dict(clusters=8, latent=8, hidden=16, packets=2),
    "token-map": dict(inner="factorized", inner_kwargs=dict(latent=8, hidden=16, packets=2)),
    # registered when flowcodec.lm.codec is imported: the language family's hidden states
    "lm-hidden": dict(latent=4, hidden=16, rates=2),
    "token-prune": {},
    "task": {},
    "jscc": {},  # analog: sends channel symbols (encode/transmit), not bytes
    "jpeg": {},
    "webp": {},
    "exit-top1": {},  # build_small adds a small exit branch (a device-side classifier)
    "exit-topk": {},
}

#: input shapes of the codecs that do not take a SMALL_SHAPE feature map
SMALL_SHAPES: dict[str, tuple[int, ...]] = {
    "token-map": (17, 16),  # 17 tokens of width 16: a class token and a 4x4 grid
    "jpeg": (3, 16, 16),  # pixels
    "webp": (3, 16, 16),
    "lm-hidden": (16, 32),  # a context of 16 tokens, hidden states of width 32
}


def small_shape(name: str) -> tuple[int, ...]:
    """The input shape the small instance of codec ``name`` is built for."""
    return SMALL_SHAPES.get(name, SMALL_SHAPE)


def small_kwargs(name: str, **over) -> dict:
    """A copy of ``SMALL_CODECS[name]`` (empty for a codec missing from the table) updated
    with ``over``."""
    return {**SMALL_CODECS.get(name, {}), **over}


def build_small(name: str, shape: tuple[int, ...] | None = None, **over) -> FeatureCodec:
    """Codec ``name`` built from its ``SMALL_CODECS`` entry (updated with ``over``) on
    ``shape`` (default: ``small_shape(name)``), after ``torch.manual_seed(0)``.

    The device-answer codecs (``exit-*``) get a seeded ``Flatten + Linear(.., 10)`` exit
    branch unless ``over`` names one. The codec is not fitted.
    """
    shape = small_shape(name) if shape is None else tuple(shape)
    kwargs = small_kwargs(name, **over)
    if name.startswith("exit-") and "exit_branch" not in kwargs:
        torch.manual_seed(0)
        kwargs["exit_branch"] = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 10))
    torch.manual_seed(0)
    return build_codec(name, shape, **kwargs)
