"""Checking an ``snr`` config whole, before any work (the keys: see :mod:`flowcodec.snr`)."""

from __future__ import annotations

import torch

from flowcodec.config import family_members, known_names
from flowcodec.errors import ConfigError
from flowcodec.schema import Any_, Bool, In, ListOf, MapOf, Num, Obj, Str, raise_errors

__all__ = ["validate_config"]


def validate_config(cfg: dict, where: str = "snr config") -> dict:
    """Check a whole config before any work; one ConfigError names every bad key and what
    is allowed (the keys: see the module notes and ``experiments/snr_*.json``)."""
    from channels import CHANNELS

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    known = known_names()
    k = family_members(cfg.get("family"))
    note = f"the {cfg.get('family')} family has {k} members" if k else ""
    split = Num(integer=True, lo=1, hi=k, note=note) if k else Num(integer=True, lo=1)
    # values of another key ("exact_budgets" of "budgets"); anything when that key is bad
    listed = {key: In(tuple(cfg[key])) if isinstance(cfg.get(key), list) else Any_()
              for key in ("snrs", "channels", "budgets")}  # fmt: skip
    entries = [e for e in (cfg.get("jscc") if isinstance(cfg.get("jscc"), list) else [])
               if isinstance(e, dict)] + [cfg.get("digital")]  # fmt: skip
    trains = any(isinstance(e, dict) and "train" in e for e in entries)
    shape = _split_shape(cfg, k) if trains else None  # codecs trained here are built on it
    jscc = Obj({
        "label": Str(), "codec": Str(what="a shipped codec name, a checkpoint path or '@label'"),
        "train": Any_(), "uses": Any_(), "told_snr": Num(optional=True),
        "uncoded": Bool(optional=True),
        "channels": ListOf(listed["channels"], what="a list of the config's channels",
                           optional=True),
        "views": Num(integer=True, lo=1, hi=4),
    }, required=("label",), what="a jscc entry (an object)",
        extra=lambda e, path, errors: _check_jscc_entry(e, path, errors, shape))  # fmt: skip
    digital = Obj({
        "codec": Str(what="a shipped codec name or a checkpoint path"), "train": Any_(),
        "label": Str(),
        "mcs": ListOf(Num(integer=True, lo=0, hi=28), min_len=1, what="a list of MCS indices"),
        "exact_budgets": ListOf(listed["budgets"], what="a list of budgets of 'budgets'"),
        "exact_samples": Num(integer=True, lo=1),
        "rate_points": ListOf(Num(integer=True, lo=0), min_len=1, what="a list of rate points"),
    }, what="an object", optional=True,
        extra=lambda d, path, errors: _check_digital(d, path, errors, shape))
    schema = Obj({
        "title": Str(), "dataset": Str(choices=known["datasets"]),
        "family": Str(choices=known["families"]), "member": split, "point": split,
        "samples": Num(integer=True, lo=1, optional=True), "seed": Num(integer=True),
        "snrs": ListOf(Num(lo=-30, hi=60, note="dB"), min_len=1, what="a list of SNRs in dB"),
        "channels": ListOf(Str(choices=tuple(CHANNELS)), min_len=1,
                           what="a list of channel names"),
        "budgets": ListOf(Num(integer=True, lo=1), min_len=1,
                          what="a list of channel-use budgets (ints >= 1)"),
        "jscc": ListOf(jscc, what="a list of jscc entries (objects)"), "digital": digital,
        "uses_plot_snrs": ListOf(listed["snrs"], what="a list of SNRs of 'snrs'"),
        "coherence": Num(integer=True, lo=1), "entry_seeds": Bool(),
    }, required=("dataset", "family", "member", "point", "snrs", "channels", "budgets"))
    errors: list[str] = []
    schema.check(cfg, "", errors)
    labels: list = []  # an "@label" codec is an earlier entry's
    for i, e in enumerate(cfg.get("jscc") if isinstance(cfg.get("jscc"), list) else []):
        if not isinstance(e, dict):
            continue
        ref = e.get("codec")
        if isinstance(ref, str) and ref.startswith("@") and ref[1:] not in labels:
            errors.append(f"jscc[{i}].codec: {ref!r} names no earlier jscc entry; earlier: "
                          f"{', '.join(map(repr, labels)) or 'none'}")  # fmt: skip
        labels.append(e.get("label"))
    raise_errors(errors, where)
    return cfg


def _split_shape(cfg: dict, members: int | None):
    """The feature shape at the config's split point, or None when the family or point is
    not valid (reported elsewhere)."""
    from flowcodec.family import build_family

    p = cfg.get("point")
    if not members or isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= members:
        return None
    return build_family(cfg["family"]).feature_shape(p)


def _check_one_source(e: dict, path: str, errors: list[str]) -> bool:
    if ("codec" in e) == ("train" in e):
        errors.append(f"{path}: give exactly one of 'codec' (a name or path) and 'train'")
        return False
    return True


def _check_jscc_entry(e: dict, path: str, errors: list[str], shape) -> None:
    u = e.get("uses", "schedule")
    if u != "schedule":
        ListOf(Num(integer=True, lo=1), min_len=1,
               what="'schedule' or a list of channel-use counts (ints >= 1)"
               ).check(u, f"{path}.uses", errors)  # fmt: skip
    if _check_one_source(e, path, errors) and "train" in e:
        _check_train(e["train"], "jscc", shape, f"{path}.train", errors)


def _check_digital(d: dict, path: str, errors: list[str], shape) -> None:
    if _check_one_source(d, path, errors) and "train" in d:
        _check_train(d["train"], "task", shape, f"{path}.train", errors)


def _check_train(t, kind: str, shape, path: str, errors: list[str]) -> None:
    """A ``"train"`` object: known settings, and kwargs that build a codec at the split."""
    from dataclasses import fields

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig
    from flowcodec.codecs.train_task import TaskTrainConfig

    known = {f.name for f in fields(JSCCTrainConfig if kind == "jscc" else TaskTrainConfig)}
    spec = Obj({**{name: Any_() for name in sorted(known)}, "kwargs": MapOf(Any_())},
               what="an object of training settings with optional 'kwargs'")  # fmt: skip
    before = len(errors)
    spec.check(t, path, errors)
    if len(errors) > before or shape is None:
        return
    try:
        with torch.device("meta"):
            build_codec(kind, shape, **t.get("kwargs", {}))
    except ConfigError as e:
        errors.append(f"{path}.kwargs: {e}")
