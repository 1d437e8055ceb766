"""One way from a codec spec (a config entry, a command line) to a ready codec.

A spec is a shipped codec's name or a checkpoint path (a string), or an object with exactly
one of

- ``"pretrained"``: a shipped codec (:func:`~flowcodec.codecs.zoo.list_pretrained`);
- ``"checkpoint"``: a path to a saved codec (``save_codec``);
- ``"codec"``: a registered codec built here for the features at the split point, with
  ``"kwargs"``; then ``"train"`` (keyword arguments of
  :func:`~flowcodec.codecs.train.train_codec`) trains it for the tail of ``"member"``, or
  ``"fit": true`` fits its statistics on training features (``"fit_samples"`` of them);

and optionally ``"views"`` (a task codec coding that many input views, the same weights)
and ``"rate_point"`` (one rate point of a variable-rate codec). Input codecs (JPEG, WebP)
get the training set's mean and std unless the spec gives them; a codec that sends the
device exit's answer gets the family's exit at its split point.

Example
-------
>>> from flowcodec.family import build_family
>>> from flowcodec.sweeps import codec_from_spec
>>> fam = build_family("digits")
>>> codec = codec_from_spec({"codec": "quant", "kwargs": {"bits": 4}}, fam, point=1)
>>> codec.name, tuple(codec.feature_shape) == tuple(fam.feature_shape(1))
('quant', True)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

from flowcodec.errors import ConfigError

__all__ = ["codec_from_spec", "with_views", "INPUT_CODECS"]

#: Codecs of the input image (split point 0) that take the dataset's mean and std.
INPUT_CODECS = ("jpeg", "webp")


def with_views(codec, views: int):
    """``codec`` coding ``views`` input views: itself when it already does, else a shallow
    copy (the same weights) set to ``views``. Only task codecs (``set_views``) code views."""
    if views == getattr(codec, "views", 1):
        return codec
    if not hasattr(codec, "set_views"):
        raise ConfigError(f"'views' needs a task codec, got {type(codec).__name__}")
    return copy.copy(codec).set_views(int(views))


def _as_spec(spec) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        s = str(spec)
        return {"checkpoint": s} if "/" in s or s.endswith(".json") else {"pretrained": s}
    if not isinstance(spec, dict):
        raise ConfigError(f"a codec spec is a name, a path or an object, got {spec!r}")
    return spec


def codec_from_spec(spec, family=None, point: int | None = None, *, train_data=None,
                    fit_features: Callable | None = None, member: int | None = None,
                    progress: bool = True, device: str = "cpu",
                    what: str | None = None):  # fmt: skip
    """The codec ``spec`` names, in eval mode.

    ``family`` and ``point`` (default: the spec's ``"point"``): where the codec sits; needed
    to build, train or fit one, and then its feature shape is checked against the point's.
    ``train_data``: the training set (input codecs' statistics, training, fitting).
    ``fit_features(point)``: the features to fit on (default: ``"fit_samples"`` (5000)
    training images through the head of ``family.receiver(point)``, the largest member
    through ``point``). ``member``: the receiver a ``"train"`` spec trains for when the spec
    names none (default: ``family.receiver(point)``; the last member, in a chain).
    ``device``: where training runs (the codec comes back on the CPU). ``what``: how
    errors name the spec.
    """
    from flowcodec.codecs import CODECS, build_codec
    from flowcodec.codecs.zoo import load_codec, load_pretrained_codec

    spec = _as_spec(spec)
    what = what or f"codec spec {spec}"
    if point is None and "point" in spec:
        point = int(spec["point"])
    has = [k for k in ("pretrained", "checkpoint", "codec") if k in spec]
    if len(has) != 1:
        raise ConfigError(f"{what}: needs exactly one of 'pretrained' (a shipped codec name), "
                          f"'checkpoint' (a path) or 'codec' (a registered codec), got "
                          f"{has or 'neither'}")  # fmt: skip
    if "pretrained" in spec:
        codec = load_pretrained_codec(spec["pretrained"])
    elif "checkpoint" in spec:
        codec = load_codec(spec["checkpoint"])
    else:
        if family is None or point is None:
            raise ConfigError(f"{what}: building codec {spec['codec']!r} needs a family and "
                              "a split point")  # fmt: skip
        name = spec["codec"]
        kwargs = dict(spec.get("kwargs", {}))
        if name in INPUT_CODECS and train_data is not None:
            kwargs = {"mean": list(train_data.mean), "std": list(train_data.std), **kwargs}
        if getattr(CODECS.get(name), "needs_exit", False):
            if not 1 <= point <= family.num_members:
                raise ConfigError(f"codec {name!r} sends the device exit's answer: its point "
                                  f"must be in 1..{family.num_members}, got {point}")  # fmt: skip
            kwargs = {"exit_branch": family.exits[point - 1], **kwargs}
        codec = build_codec(name, family.feature_shape(point), **kwargs)
        if spec.get("train"):
            from flowcodec.codecs.train import train_codec

            settings = {"device": device, **spec["train"]}
            receiver = spec.get("member") or member or family.receiver(point)
            res = train_codec(codec, family, receiver, point, train_data, None,
                              progress=progress, **settings)  # fmt: skip
            codec.to("cpu").update(force=True)
            codec.train_history = res.history
        elif spec.get("fit"):
            if fit_features is not None:
                feats = fit_features(point)
            else:
                from flowcodec.codecs.train import collect_features

                head, _ = family.split(family.receiver(point), point)
                feats = collect_features(head, train_data, n=spec.get("fit_samples", 5000))
            codec.fit(feats)
            codec.update(force=True)
    if "views" in spec:
        codec = with_views(codec, spec["views"])
    if "rate_point" in spec:
        if not hasattr(codec, "at_rate"):
            raise ConfigError(f"{what}: codec {codec.name!r} has no rate points")
        codec = codec.at_rate(int(spec["rate_point"]))
    if family is not None and point is not None \
            and tuple(codec.feature_shape) != tuple(family.feature_shape(point)):  # fmt: skip
        raise ConfigError(f"{what}: codec takes {codec.feature_shape}, point {point} has "
                          f"{family.feature_shape(point)}")  # fmt: skip
    return codec.eval()
