"""Checking experiment configs (JSON) whole, before any work starts.

``flowcodec rd`` and ``flowcodec latency`` read JSON configs. :func:`validate_rd_config` and
:func:`validate_latency_config` check every key of such a config against a small schema
(types, ranges, allowed names, the arguments each named codec takes) and raise one
:class:`~flowcodec.errors.ConfigError` that lists every problem, each naming the key (as a
path such as ``codecs[2].kwargs``) and what is allowed. Nothing is loaded, trained or
measured before the whole config has passed.

The shapes are pydantic models (:class:`RDSchema`, :class:`LatencySchema`; see
:mod:`flowcodec.schema`), checked with the config's family and the registries as context;
checks across keys (one of ``codec`` or ``pretrained``, the arguments a codec takes, the
labels channel entries name) add their messages to the same list.

Example
-------
>>> from flowcodec.config import validate_rd_config
>>> from flowcodec.errors import ConfigError
>>> try:
...     validate_rd_config({"dataset": "digits", "family": "digits", "member": 9, "point": 1,
...                         "codecs": "raw"})
... except ConfigError as e:
...     print(e)
rd config has 2 problems:
  member: 9 is out of range; allowed: an integer in 1..3 (the digits family has 3 members)
  codecs: expected a list of codec entries (objects), got str 'raw'
"""

from __future__ import annotations

import functools
import inspect
import string
from typing import Annotated, Any, Literal

from pydantic import Field, create_model

from flowcodec.errors import ConfigError
from flowcodec.schema import (
    Allowed,
    Strict,
    check,
    join_path,
    kind_of,
    member_range,
    raise_errors,
    registered,
    validate,
)

__all__ = ["Strict", "Allowed", "check", "codec_arguments", "validate_rd_config",
           "validate_latency_config", "positive_int", "resolve_config", "config_dirs",
           "RDSchema", "LatencySchema"]  # fmt: skip


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--n``, ``--samples``)."""
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


# --- what a named codec accepts -----------------------------------------------------------------
def codec_arguments(name: str) -> tuple[list[str], bool]:
    """The keyword arguments codec ``name``'s constructor takes (besides ``feature_shape``),
    and whether it takes any (``**kwargs``)."""
    from flowcodec.codecs import CODECS

    sig = inspect.signature(CODECS[name])
    names, var = [], False
    for p in list(sig.parameters.values())[1:]:  # the first is feature_shape
        if p.kind is p.VAR_KEYWORD:
            var = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(p.name)
    return names, var


def _check_codec_kwargs(codec: Any, keys, path: str, errors: list[str]) -> None:
    from flowcodec.codecs import CODECS

    if not isinstance(codec, str) or codec not in CODECS:
        return  # reported by the codec's own field
    allowed, var = codec_arguments(codec)
    if var:
        return
    for k in keys:
        if k not in allowed:
            errors.append(f"{path}: codec {codec!r} takes no argument {k!r}; allowed: "
                          f"{', '.join(allowed) or '(none)'}")  # fmt: skip


def family_members(name: Any) -> int | None:
    """Members of family ``name`` (from its architecture, no weights), None if unknown."""
    from flowcodec.family.pretrained import RECIPES
    from flowcodec.family.zoo import FAMILIES, build_family

    if not isinstance(name, str) or name not in FAMILIES:
        return None
    return build_family(name, **RECIPES.get(name, {}).get("family", {})).num_members


def known_names() -> dict[str, tuple[str, ...]]:
    from flowcodec.codecs import CODECS
    from flowcodec.codecs.zoo import list_pretrained
    from flowcodec.data import DATASETS
    from flowcodec.family.zoo import FAMILIES

    return {"codecs": tuple(sorted(CODECS)), "pretrained": tuple(list_pretrained()),
            "datasets": tuple(sorted(DATASETS)), "families": tuple(sorted(FAMILIES))}  # fmt: skip


def _train_keys(exclude: tuple[str, ...]) -> tuple[str, ...]:
    from flowcodec.codecs.train import train_codec

    return tuple(p for p in inspect.signature(train_codec).parameters if p not in exclude)


# --- shared field types --------------------------------------------------------------------------
Codec = registered("codecs", "a registered codec name")
Pretrained = registered("pretrained", "a shipped codec name")
Point = member_range(0)  # a split point of the config's family (0: the input)
Member = member_range(1)
PosInt = Annotated[int, Field(ge=1)]
NonNeg = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
RatePoint = Annotated[int, Field(ge=0, le=254)]
Kwargs = dict[str, Any]


def _context(family: Any) -> dict:
    """The validation context: the registries, and the members of the config's family."""
    return {"known": known_names(), "members": family_members(family), "family": family}


# --- flowcodec rd ------------------------------------------------------------------------------
class RDTrain(Strict):
    what = "an object of training settings"
    lam: Annotated[list[NonNeg], Field(min_length=1),
                   Allowed("a list of rate weights (numbers >= 0)")]  # fmt: skip
    epochs: PosInt = None
    beta: NonNeg = None
    drop_prob: Annotated[float, Field(ge=0, lt=1)] = None
    flip_prob: Annotated[float, Field(ge=0, lt=0.5)] = None
    batch_size: PosInt = None
    lr: Positive = None


class RDEntry(Strict):
    what = "a codec entry (an object)"
    group: str = None
    codec: Codec = None
    label: str = None
    point: Point = None
    kwargs: Kwargs = None
    sweep: dict[str, Annotated[list[Any], Field(min_length=1),
                               Allowed("a non-empty list of values")]] = None  # fmt: skip
    fit: bool = None
    train: RDTrain = None
    pretrained: Annotated[list[Pretrained], Field(min_length=1),
                          Allowed("a list of shipped codec names")] = None  # fmt: skip
    rate_points: Annotated[list[RatePoint], Field(min_length=1), Allowed(
        "a list of rate points (ints) of a variable-rate codec")] = None
    views: Annotated[int, Field(ge=1, le=4)] = None


class RDChannel(Strict):
    what = "a channel entry (an object)"
    loss_rate: Annotated[float, Field(ge=0, le=1)] = None
    flip_prob: Annotated[float, Field(ge=0, le=0.5)] = None
    seed: int = None
    codecs: Annotated[list[str], Field(min_length=1), Allowed("a list of row labels")]


class RDSchema(Strict):
    """A ``flowcodec rd`` config (``experiments/rd_*.json``)."""

    what = "a JSON object"
    title: str = None
    dataset: registered("datasets", "a dataset name")
    family: registered("families", "a family name")
    member: Member
    point: Point
    test_subset: PosInt | None = None
    fit_samples: PosInt = None
    seed: int = None
    codecs: Annotated[list[RDEntry], Field(min_length=1),
                      Allowed("a list of codec entries (objects)")]  # fmt: skip
    channels: Annotated[list[RDChannel], Allowed("a list of channel entries (objects)")] = None


def validate_rd_config(cfg: Any, source: str = "rd config") -> dict:
    """Check a ``flowcodec rd`` config whole; returns it unchanged or raises ConfigError.

    The keys (see ``experiments/rd_*.json`` and :class:`RDSchema`): ``dataset``, ``family``,
    ``member`` and ``point`` (required; a row at a point off ``member``'s path is received by
    ``family.receiver(point)``), ``codecs`` (required: a non-empty list of entries),
    ``title``, ``test_subset``, ``fit_samples``, ``seed``, ``channels``. An entry is a
    baseline (``codec`` with optional ``kwargs``, ``sweep``, ``label``, ``point``, ``fit``), a
    learned codec trained here (``codec`` + ``train``) or shipped ones (``pretrained``: a list
    of names); ``group`` names its curve.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {kind_of(cfg)}")
    ctx = _context(cfg.get("family"))
    k = ctx["members"]
    errors, cause = validate(cfg, RDSchema, ctx)
    for i, e in enumerate(cfg["codecs"] if isinstance(cfg.get("codecs"), list) else []):
        if isinstance(e, dict):
            _check_rd_entry(e, f"codecs[{i}]", errors)
    for i, ch in enumerate(cfg["channels"] if isinstance(cfg.get("channels"), list) else []):
        if isinstance(ch, dict):
            _check_rd_channel(ch, f"channels[{i}]", errors)
    raise_errors(errors, cause, what=source)
    from flowcodec.codecs import CODECS

    for i, e in enumerate(cfg["codecs"]):  # an exit's answer needs an exit: point >= 1
        if getattr(CODECS.get(e.get("codec")), "needs_exit", False) \
                and int(e.get("point", cfg["point"])) < 1:  # fmt: skip
            errors.append(f"codecs[{i}].point: codec {e['codec']!r} sends the device exit's "
                          f"answer: its point must be in 1..{k or 'the members'}")  # fmt: skip
    # Labels the channel entries refer to must be made by some codec entry.
    try:
        labels = set(_rd_labels(cfg))
    except (KeyError, ValueError, IndexError) as e:
        raise ConfigError(f"{source}: a codec entry's label cannot be formatted ({e!r})") from e
    for i, ch in enumerate(cfg.get("channels", [])):
        for j, lab in enumerate(ch["codecs"]):
            if lab not in labels:
                errors.append(f"channels[{i}].codecs[{j}]: no codec entry makes a row labelled "
                              f"{lab!r}; labels: {', '.join(sorted(labels))}")  # fmt: skip
    raise_errors(errors, what=source)
    return cfg


def _check_rd_entry(e: dict, path: str, errors: list[str]) -> None:
    has = [k for k in ("codec", "pretrained") if k in e]
    if len(has) != 1:
        errors.append(f"{path}: needs exactly one of 'codec' (a registered codec, built or "
                      f"trained here) or 'pretrained' (shipped codec names), got "
                      f"{has or 'neither'}")  # fmt: skip
        return
    if "pretrained" in e:
        for k in ("train", "kwargs", "sweep", "label", "fit"):
            if k in e:
                errors.append(f"{path}.{k}: not used with 'pretrained' entries; allowed "
                              f"there: group, point, pretrained, rate_points, views")  # fmt: skip
        if "views" in e and "rate_points" not in e:
            errors.append(f"{path}.views: only used with a task codec's 'rate_points'")
        return
    if "views" in e:
        errors.append(f"{path}.views: only used with 'pretrained' task codecs")
    if "rate_points" in e:
        errors.append(f"{path}.rate_points: only used with 'pretrained' entries")
    kw = e.get("kwargs", {}) if isinstance(e.get("kwargs"), dict) else {}
    sw = e.get("sweep", {}) if isinstance(e.get("sweep"), dict) else {}
    _check_codec_kwargs(e["codec"], list(kw), f"{path}.kwargs", errors)
    _check_codec_kwargs(e["codec"], list(sw), f"{path}.sweep", errors)
    if "train" in e and "sweep" in e:
        errors.append(f"{path}.sweep: a 'train' entry sweeps 'train.lam' instead")
    label = e.get("label")
    if isinstance(label, str):
        names = {"lam"} if "train" in e else set(kw) | set(sw)
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(label) if f}
        except ValueError as err:
            errors.append(f"{path}.label: {label!r} is not a format string ({err})")
            return
        for f in sorted(used - names):
            errors.append(f"{path}.label: {{{f}}} names no value; allowed: "
                          f"{', '.join('{' + n + '}' for n in sorted(names)) or 'none'}")


def _check_rd_channel(ch: dict, path: str, errors: list[str]) -> None:
    has = [k for k in ("loss_rate", "flip_prob") if k in ch]
    if len(has) != 1:
        errors.append(f"{path}: needs exactly one of 'loss_rate' (i.i.d. packet erasure) or "
                      f"'flip_prob' (payload bit flips), got {has or 'neither'}")  # fmt: skip


def _rd_labels(cfg: dict) -> list[str]:
    """The row labels an (already checked) rd config makes, as ``flowcodec.rd`` names them."""
    import itertools

    out = []
    for e in cfg["codecs"]:
        if "pretrained" in e and "rate_points" in e:
            v = f"-v{e['views']}" if e.get("views", 1) != 1 else ""
            out += [f"{n}{v}@r{r}" for n in e["pretrained"] for r in e["rate_points"]]
        elif "pretrained" in e:
            out += e["pretrained"]
        elif "train" in e:
            fmt = e.get("label", e["codec"] + "-l{lam}")
            out += [fmt.format(lam=lam) for lam in e["train"]["lam"]]
        else:
            sweep = e.get("sweep", {})
            for values in itertools.product(*sweep.values()) if sweep else [()]:
                kw = {**e.get("kwargs", {}), **dict(zip(sweep, values))}
                out.append(e.get("label", e["codec"]).format(**kw))
    return out


# --- flowcodec latency -------------------------------------------------------------------------
LATENCY_KEYS = ("dataset", "options", "input_codec", "fixed_split", "member", "samples", "seed",
                "compute", "delay_s", "symbol_rates", "snrs_db", "reference",
                "harq_max_tx_baselines", "target_bler", "framing", "floor_points",
                "cell_seeds")  # fmt: skip


class LatencyOption(Strict):
    what = "an option (an object)"
    point: Point
    rate: str
    pretrained: Pretrained = None
    checkpoint: Annotated[str, Allowed("a path to a codec checkpoint")] = None
    codec: Codec = None
    kwargs: Kwargs = None
    fit: bool = None
    fit_samples: PosInt = None
    train: Kwargs = None  # its keys: train_codec's settings (see _train_model)
    member: Member | None = None
    rate_point: RatePoint = None


class InputCodec(Strict):
    codec: Literal["jpeg", "webp"]
    kwargs: Kwargs = None


class FixedSplit(Strict):
    point: Point = None
    rate: str


class Compute(Strict):
    """FLOP/s of each tier."""

    device: Positive = None
    edge: Positive = None
    cloud: Positive = None


class Delays(Strict):
    edge: NonNeg = None
    cloud: NonNeg = None


class Reference(Strict):
    snr_db: float
    symbol_rate: Positive


class LatencySchema(Strict):
    """A ``flowcodec latency`` config (``experiments/latency_*.json``)."""

    what = "a JSON object"
    dataset: registered("datasets", "a dataset name")
    options: Annotated[list[LatencyOption], Field(min_length=1),
                       Allowed("a list of options (objects)")]  # fmt: skip
    input_codec: InputCodec
    fixed_split: FixedSplit
    member: Member | None = None
    samples: Annotated[int, Field(ge=2, description="half profile the options, half evaluate")
                       ] = None  # fmt: skip
    seed: int = None
    compute: Compute | None = None
    delay_s: Delays | None = None
    symbol_rates: Annotated[list[Positive] | None, Field(min_length=1),
                            Allowed("a list of positive numbers")] = None  # fmt: skip
    snrs_db: Annotated[list[float] | None, Field(min_length=1),
                       Allowed("a list of SNRs in dB (numbers)")] = None  # fmt: skip
    reference: Reference | None = None
    harq_max_tx_baselines: PosInt = None
    target_bler: Annotated[float, Field(gt=0, lt=1)] = None
    framing: Literal["sample", "session"] = None
    floor_points: Annotated[float, Field(ge=0, le=100,
                                         description="accuracy floor: points below cloud only")
                            ] = None  # fmt: skip
    cell_seeds: bool = None
    family: registered("families", "a family name") | None = None


@functools.cache
def _train_model() -> type[Strict]:
    """An option's ``train``: the settings of ``train_codec`` a config may give."""
    keys = _train_keys(("codec", "family", "member", "point", "train", "test", "progress",
                        "cache"))  # fmt: skip
    return create_model("LatencyTrain", __base__=Strict, **{k: (Any, None) for k in keys})


def validate_latency_config(cfg: Any, source: str = "latency config") -> dict:
    """Check a ``flowcodec latency`` config whole; returns it unchanged or raises ConfigError.

    Required: ``dataset``, ``options`` (a non-empty list of ``{"point", "rate", one of
    "pretrained" | "checkpoint" | "codec", ...}``), ``input_codec`` (``{"codec", "kwargs"}``)
    and ``fixed_split`` (``{"point", "rate"}`` of one of the options). Optional: ``member``
    (receives every option; unset, an option at point ``p`` goes to ``family.receiver(p)``),
    ``samples`` (>= 2: half profile the options, half evaluate), ``seed``, ``compute``
    (FLOP/s of ``device``, ``edge``, ``cloud``), ``delay_s`` (``edge``, ``cloud``),
    ``symbol_rates``, ``snrs_db``, ``reference`` (``snr_db``, ``symbol_rate``),
    ``harq_max_tx_baselines``, ``target_bler``, ``framing`` (``sample`` or ``session``),
    ``cell_seeds`` (a generator per grid cell: needed by ``--engine ray``) and ``family``
    (a trained family for the dataset, e.g. ``cifar10-vit``; default: the dataset's name).
    See :class:`LatencySchema`.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {kind_of(cfg)}")
    errors, cause = validate(cfg, LatencySchema, _context(cfg.get("family", cfg.get("dataset"))))
    for i, o in enumerate(cfg["options"] if isinstance(cfg.get("options"), list) else []):
        if isinstance(o, dict):
            _check_option(o, f"options[{i}]", errors)
    if isinstance(cfg.get("input_codec"), dict):
        _check_input_codec(cfg["input_codec"], "input_codec", errors)
    raise_errors(errors, cause, what=source)
    opts = [(int(o["point"]), o["rate"]) for o in cfg["options"]]
    seen = set()
    for i, key in enumerate(opts):
        if key in seen:
            errors.append(f"options[{i}]: (point {key[0]}, rate {key[1]!r}) appears twice")
        seen.add(key)
    fs = cfg["fixed_split"]
    want = (int(fs.get("point", 1)), fs["rate"])
    if want not in seen:
        errors.append(f"fixed_split: (point {want[0]}, rate {want[1]!r}) is not an option; "
                      f"allowed: {', '.join(f'(point {p}, rate {r!r})' for p, r in opts)}")
    raise_errors(errors, what=source)
    return cfg


def _check_option(o: dict, path: str, errors: list[str]) -> None:
    if isinstance(o.get("train"), dict):
        errors += validate(o["train"], _train_model(), at=f"{path}.train")[0]
    has = [k for k in ("pretrained", "checkpoint", "codec") if k in o]
    if len(has) != 1:
        errors.append(f"{path}: needs exactly one of 'pretrained' (a shipped codec name), "
                      f"'checkpoint' (a path) or 'codec' (a registered codec), got "
                      f"{has or 'neither'}")  # fmt: skip
        return
    if "codec" in o and isinstance(o.get("kwargs"), dict):
        _check_codec_kwargs(o["codec"], list(o["kwargs"]), f"{path}.kwargs", errors)
    elif "codec" not in o:
        for k in ("kwargs", "fit", "fit_samples", "train"):
            if k in o:
                errors.append(f"{path}.{k}: only used with 'codec' options")
    if "checkpoint" in o and isinstance(o["checkpoint"], str):
        from pathlib import Path

        p = Path(o["checkpoint"])
        if not any(q.is_file() for q in (p, p.with_suffix(".safetensors"),
                                          p.with_suffix(".json"))):  # fmt: skip
            errors.append(f"{path}.checkpoint: no codec checkpoint at {p}(.safetensors)")


def _check_input_codec(o: dict, path: str, errors: list[str]) -> None:
    if isinstance(o.get("kwargs"), dict):
        _check_codec_kwargs(o.get("codec"), list(o["kwargs"]), f"{join_path(path, 'kwargs')}",
                            errors)



# --- where configs are found -------------------------------------------------------------------
def config_dirs() -> list:
    """Folders searched for a config given by name: ``$FLOWCODEC_CONFIGS`` (if set), then the
    ``experiments`` folder of the source checkout this package was installed from."""
    import os
    from pathlib import Path

    dirs = []
    if os.environ.get("FLOWCODEC_CONFIGS"):
        dirs.append(Path(os.environ["FLOWCODEC_CONFIGS"]))
    dirs.append(Path(__file__).resolve().parents[1] / "experiments")
    return dirs


def resolve_config(value: str | None, kind: str):
    """The config file ``value`` names for command ``kind`` (``"rd"`` or ``"latency"``).

    ``value`` is a path (used as given when it exists), or a name looked up in
    :func:`config_dirs`: ``"digits"`` means ``{kind}_digits.json``, ``"rd_digits"`` or
    ``"rd_digits.json"`` that file. ``None`` means ``{kind}_cifar10.json``. Works from any
    working directory; a miss raises ConfigError listing the configs found.
    """
    from pathlib import Path

    if value is None:
        value = f"{kind}_cifar10.json"
    p = Path(value)
    if p.is_file():
        return p
    names = [p.name]
    if not p.name.endswith(".json"):
        names.append(p.name + ".json")
    if not p.name.startswith(kind + "_"):
        names += [f"{kind}_{n}" for n in list(names)]
    dirs = config_dirs()
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    found = sorted({c.name for d in dirs if d.is_dir() for c in d.glob(f"{kind}_*.json")})
    raise ConfigError(f"{kind} config {value!r} not found (as a path, or by name in "
                      f"{', '.join(str(d) for d in dirs)}); configs there: "
                      f"{', '.join(found) or 'none'}")  # fmt: skip
