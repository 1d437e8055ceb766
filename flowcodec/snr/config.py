"""Checking an ``snr`` config whole, before any work (the keys: see :mod:`flowcodec.snr`).

The shape is the pydantic model :class:`SNRSchema` (see :mod:`flowcodec.schema`); values
that must be among another key's (``exact_budgets`` of ``budgets``) read them from the
validation context, and checks across keys add their messages to the same list.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, ValidationInfo, create_model
from pydantic_core import PydanticCustomError

from flowcodec.config import PosInt, family_members, known_names
from flowcodec.errors import ConfigError
from flowcodec.schema import Allowed, Strict, member_range, raise_errors, registered, show, validate

__all__ = ["validate_config", "SNRSchema"]


def _listed(key: str) -> Any:
    """One of the values of the config's ``key`` (anything while that key is not a list)."""

    def ok(v: Any, info: ValidationInfo) -> Any:
        values = info.context["listed"].get(key)
        if values is not None and (isinstance(v, bool) or v not in values):
            raise PydanticCustomError("config", "{v} is not allowed; allowed: {values}", {
                "v": show(v), "values": ", ".join(map(show, values)) or "(none)"})
        return v

    return Annotated[Any, AfterValidator(ok)]


def _uses(v: Any) -> Any:
    ok = v == "schedule" or (isinstance(v, list) and v and all(
        isinstance(u, int) and not isinstance(u, bool) and u >= 1 for u in v))
    if not ok:
        raise PydanticCustomError("config", "expected 'schedule' or a list of channel-use counts "
                                  "(ints >= 1), got {v}", {"v": show(v)})  # fmt: skip
    return v


Split = member_range(1)


class JSCCEntry(Strict):
    what = "a jscc entry (an object)"
    label: str
    codec: Annotated[str, Allowed("a shipped codec name, a checkpoint path or '@label'")] = None
    train: Any = None  # checked by _check_train
    uses: Annotated[Any, AfterValidator(_uses)] = None
    told_snr: float | None = None
    uncoded: bool | None = None
    channels: Annotated[list[_listed("channels")] | None,
                        Allowed("a list of the config's channels")] = None  # fmt: skip
    views: Annotated[int, Field(ge=1, le=4)] = None


class Digital(Strict):
    codec: Annotated[str, Allowed("a shipped codec name or a checkpoint path")] = None
    train: Any = None  # checked by _check_train
    label: str = None
    mcs: Annotated[list[Annotated[int, Field(ge=0, le=28)]], Field(min_length=1),
                   Allowed("a list of MCS indices")] = None  # fmt: skip
    exact_budgets: Annotated[list[_listed("budgets")],
                             Allowed("a list of budgets of 'budgets'")] = None  # fmt: skip
    exact_samples: PosInt = None
    rate_points: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1),
                           Allowed("a list of rate points")] = None  # fmt: skip


class SNRSchema(Strict):
    """A ``flowcodec snr`` config (``experiments/snr_*.json``)."""

    what = "a JSON object"
    title: str = None
    dataset: registered("datasets", "a dataset name")
    family: registered("families", "a family name")
    member: Split
    point: Split
    samples: PosInt | None = None
    seed: int = None
    snrs: Annotated[list[Annotated[float, Field(ge=-30, le=60, description="dB")]],
                    Field(min_length=1), Allowed("a list of SNRs in dB")]  # fmt: skip
    channels: Annotated[list[registered("channels", "a channel name")], Field(min_length=1),
                        Allowed("a list of channel names")]  # fmt: skip
    budgets: Annotated[list[PosInt], Field(min_length=1),
                       Allowed("a list of channel-use budgets (ints >= 1)")]  # fmt: skip
    jscc: Annotated[list[JSCCEntry], Allowed("a list of jscc entries (objects)")] = None
    digital: Digital | None = None
    uses_plot_snrs: Annotated[list[_listed("snrs")], Allowed("a list of SNRs of 'snrs'")] = None
    coherence: PosInt = None
    entry_seeds: bool = None


def validate_config(cfg: dict, where: str = "snr config") -> dict:
    """Check a whole config before any work; one ConfigError names every bad key and what
    is allowed (the keys: see the module notes and ``experiments/snr_*.json``)."""
    from channels import CHANNELS

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    k = family_members(cfg.get("family"))
    ctx = {"known": {**known_names(), "channels": tuple(CHANNELS)}, "members": k,
           "family": cfg.get("family"),
           "listed": {key: cfg[key] for key in ("snrs", "channels", "budgets")
                      if isinstance(cfg.get(key), list)}}  # fmt: skip
    errors, cause = validate(cfg, SNRSchema, ctx)
    entries = [(f"jscc[{i}]", "jscc", e) for i, e in enumerate(
        cfg.get("jscc") if isinstance(cfg.get("jscc"), list) else [])]
    entries.append(("digital", "task", cfg.get("digital")))
    entries = [(p, kind, e) for p, kind, e in entries if isinstance(e, dict)]
    # codecs trained here are built on the split's feature shape
    shape = _split_shape(cfg, k) if any("train" in e for _, _, e in entries) else None
    for path, kind, e in entries:
        if ("codec" in e) == ("train" in e):
            errors.append(f"{path}: give exactly one of 'codec' (a name or path) and 'train'")
        elif "train" in e:
            _check_train(e["train"], kind, shape, f"{path}.train", errors)
    labels: list = []  # an "@label" codec is an earlier entry's
    for path, kind, e in entries:
        ref = e.get("codec")
        if kind == "jscc" and isinstance(ref, str) and ref.startswith("@") \
                and ref[1:] not in labels:  # fmt: skip
            errors.append(f"{path}.codec: {ref!r} names no earlier jscc entry; earlier: "
                          f"{', '.join(map(repr, labels)) or 'none'}")  # fmt: skip
        labels.append(e.get("label"))
    raise_errors(errors, cause, what=where)
    return cfg


def _split_shape(cfg: dict, members: int | None):
    """The feature shape at the config's split point, or None when the family or point is
    not valid (reported elsewhere)."""
    from flowcodec.family import build_family

    p = cfg.get("point")
    if not members or isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= members:
        return None
    return build_family(cfg["family"]).feature_shape(p)


@functools.cache
def _train_model(kind: str) -> type[Strict]:
    """A ``"train"`` object: the settings of the trainer of ``kind``, and ``kwargs``."""
    from dataclasses import fields

    from flowcodec.codecs.jscc_train import JSCCTrainConfig
    from flowcodec.codecs.train_task import TaskTrainConfig

    known = sorted(f.name for f in fields(JSCCTrainConfig if kind == "jscc" else TaskTrainConfig))
    model = create_model(f"{kind}Train", __base__=Strict, kwargs=(dict[str, Any], None),
                         **{name: (Any, None) for name in known if name != "kwargs"})
    model.what = "an object of training settings with optional 'kwargs'"
    return model


def _check_train(t, kind: str, shape, path: str, errors: list[str]) -> None:
    """A ``"train"`` object: known settings, and kwargs that build a codec at the split."""
    from flowcodec.codecs import build_codec

    problems = validate(t, _train_model(kind), at=path)[0]
    errors += problems
    if problems or shape is None:
        return
    try:
        with torch.device("meta"):
            build_codec(kind, shape, **t.get("kwargs", {}))
    except ConfigError as e:
        errors.append(f"{path}.kwargs: {e}")
