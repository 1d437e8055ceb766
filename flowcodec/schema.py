"""Checking JSON configs whole with pydantic: every problem at once, each naming its key.

A config's shape is a pydantic model (:class:`Strict`: unknown keys refused, no type coercion,
no NaN or infinity). :func:`check` validates a value against one and raises a single
:class:`~flowcodec.errors.ConfigError` that lists every problem, each as the key's path (such
as ``codecs[2].kwargs``) and what is allowed there, worded from the model's annotations:
bounds (``Field(ge=...)``), ``Literal`` choices, and :class:`Allowed` for words of one's own.

What depends on the config or on the registries (the members of its family, the codecs
registered now) is checked by validators that read the validation context
(:func:`member_range`, :func:`registered`); checks across keys are plain functions whose
messages join the same list (:func:`raise_errors`).

Example
-------
>>> from typing import Annotated
>>> from pydantic import Field
>>> class Loss(Strict):
...     member: Annotated[int, Field(ge=1)]
...     loss_rates: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)]
>>> try:
...     check({"member": 0, "loss_rates": [2], "colour": 1}, Loss, "loss config")
... except ConfigError as e:
...     print(e)
loss config has 3 problems:
  member: 0 is out of range; allowed: an integer >= 1
  loss_rates[0]: 2 is out of range; allowed: a number in [0, 1]
  colour: unknown key; allowed: member, loss_rates
"""

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from flowcodec.errors import ConfigError

__all__ = ["Strict", "Allowed", "check", "validate", "problems", "raise_errors", "registered",
           "member_range", "join_path", "kind_of", "show"]  # fmt: skip


class Strict(BaseModel):
    """A config object: unknown keys refused, types as written (no coercion), finite numbers.

    Validation only checks: the functions return the config dict as given, so a default
    here is never used (a key that may be ``null`` says ``| None``)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    what: ClassVar[str] = "an object"  # what is allowed, in words, when it is not an object


@dataclass(frozen=True)
class Allowed:
    """``Annotated`` metadata: what is allowed there, in words (or a function of the context)."""

    text: str | Callable[[dict], str]


def show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def kind_of(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(message: str, **ctx) -> PydanticCustomError:
    return PydanticCustomError("config", message, ctx)


# --- validators that read the context --------------------------------------------------------
def registered(kind: str, what: str) -> Any:
    """A name in the registry ``context["known"][kind]`` (codecs, datasets, families, ...)."""

    def ok(v: str, info: ValidationInfo) -> str:
        names = info.context["known"][kind]
        if v not in names:
            raise _fail("{v} is not allowed; allowed: {names}", v=repr(v), names=", ".join(names))
        return v

    return Annotated[str, AfterValidator(ok), Allowed(what)]


def _range_words(lo: int, k: int | None, ctx: dict) -> str:
    return (f"an integer in {lo}..{k} (the {ctx.get('family')} family has {k} members)" if k
            else f"an integer >= {lo}")


def member_range(lo: int) -> Any:
    """An integer from ``lo`` to the members of the config's family (``context["members"]``,
    None when the family is unknown: then only ``>= lo``)."""

    def ok(v: int, info: ValidationInfo) -> int:
        k = info.context.get("members")
        if v < lo or (k and v > k):
            raise _fail("{v} is out of range; allowed: {words}", v=v,
                        words=_range_words(lo, k, info.context))  # fmt: skip
        return v

    return Annotated[int, AfterValidator(ok), Allowed(lambda ctx: _range_words(lo, ctx.get(
        "members"), ctx))]


# --- what is allowed, from the annotations ---------------------------------------------------
def _unwrap(tp: Any) -> tuple[Any, list]:
    """``(type, metadata)`` without ``Annotated`` and ``| None`` layers."""
    metas: list = []
    while True:
        if typing.get_origin(tp) is Annotated:
            base, *extra = typing.get_args(tp)
            for m in extra:
                metas += list(m.metadata) + [m] if isinstance(m, FieldInfo) else [m]
            tp = base
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = arms[0] if len(arms) == 1 else Any
        else:
            return tp, metas


def _field(model: type[BaseModel], key: str) -> Any:
    f = model.model_fields.get(key)
    return None if f is None else Annotated[f.annotation, f]


def _at(model: Any, loc: tuple) -> Any:
    """The annotation at ``loc`` (a pydantic error's location) inside ``model``."""
    tp = model
    for key in loc:
        base, _ = _unwrap(tp)
        origin, args = typing.get_origin(base), typing.get_args(base)
        if isinstance(base, type) and issubclass(base, BaseModel) and isinstance(key, str):
            tp = _field(base, key)
        elif origin is list and args and isinstance(key, int):
            tp = args[0]
        elif origin is dict and len(args) == 2 and isinstance(key, str):
            tp = args[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def allowed(tp: Any, ctx: dict) -> str:
    """What annotation ``tp`` allows, in words."""
    base, metas = _unwrap(tp)
    for m in metas:
        if isinstance(m, Allowed):
            return m.text(ctx) if callable(m.text) else m.text
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    if isinstance(base, type) and issubclass(base, BaseModel):
        return base.what
    words = {bool: "true or false", str: "a string", list: "a list", dict: "an object"}
    origin = typing.get_origin(base) or base
    if origin not in (int, float):
        return words.get(origin, "any value")
    lo = next(((m.ge, False) if isinstance(m, at.Ge) else (m.gt, True) for m in metas
               if isinstance(m, (at.Ge, at.Gt))), None)  # fmt: skip
    hi = next(((m.le, False) if isinstance(m, at.Le) else (m.lt, True) for m in metas
               if isinstance(m, (at.Le, at.Lt))), None)  # fmt: skip
    what = "an integer" if origin is int else "a number"
    if lo and hi:
        if origin is int and not lo[1] and not hi[1]:
            rng = f" in {lo[0]:g}..{hi[0]:g}"
        else:
            rng = f" in {'(' if lo[1] else '['}{lo[0]:g}, {hi[0]:g}{')' if hi[1] else ']'}"
    elif lo or hi:
        v, is_open = lo or hi
        rng = f" {'>' if lo else '<'}{'' if is_open else '='} {v:g}"
    else:
        rng = ""
    notes = [m.description for m in metas if isinstance(m, FieldInfo) and m.description]
    return what + rng + (f" ({notes[0]})" if notes else "")


def _path(loc: tuple, out: str = "") -> str:
    for k in loc:
        out = f"{out}[{k}]" if isinstance(k, int) else join_path(out, str(k))
    return out


def problems(err: ValidationError, model: type[BaseModel], ctx: dict | None = None,
             at: str = "") -> list[str]:
    """One line per error of ``err``: ``path: problem; allowed: ...`` (``at``: where the
    value checked against ``model`` is, inside the whole config)."""
    ctx = ctx or {}
    out = []
    for e in err.errors(include_url=False):
        loc, kind, value = e["loc"], e["type"], e.get("input")
        path = _path(loc, at)
        if kind == "missing":
            out.append(f"{path}: missing (required)")
        elif kind == "extra_forbidden":
            parent, _ = _unwrap(_at(model, loc[:-1]))
            keys = ", ".join(parent.model_fields) if isinstance(parent, type) else "(none)"
            out.append(f"{path}: unknown key; allowed: {keys}")
        elif kind == "too_short":
            out.append(f"{path}: needs at least {e['ctx']['min_length']} item(s), got "
                       f"{e['ctx']['actual_length']}")  # fmt: skip
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            out.append(f"{path}: {value!r} is out of range; allowed: "
                       f"{allowed(_at(model, loc), ctx)}")  # fmt: skip
        elif kind == "finite_number":
            out.append(f"{path}: {value!r} is not finite; allowed: {allowed(_at(model, loc), ctx)}")
        elif kind == "literal_error" and isinstance(value, str):
            out.append(f"{path}: {value!r} is not allowed; allowed: "
                       f"{allowed(_at(model, loc), ctx).removeprefix('one of ')}")  # fmt: skip
        elif kind == "config":  # ours: the message says what is allowed
            out.append(f"{path}: {e['msg']}")
        elif kind.endswith(("_type", "_parsing", "_from_float", "literal_error")):
            out.append(f"{path}: expected {allowed(_at(model, loc), ctx)}, got {kind_of(value)} "
                       f"{show(value)}")  # fmt: skip
        else:  # pragma: no cover - pydantic's own words
            out.append(f"{path}: {e['msg']}")
    return [o.removeprefix(": ") for o in out]


def validate(value: Any, model: type[BaseModel], ctx: dict | None = None,
             at: str = "") -> tuple[list[str], ValidationError | None]:
    """The problems of ``value`` as a ``model`` (``ctx``: the validation context; ``at``:
    the value's path in the whole config), and pydantic's error (None when there is none)."""
    try:
        model.model_validate(value, context=ctx or {})
    except ValidationError as e:
        return problems(e, model, ctx, at), e
    return [], None


def check(value: Any, model: type[BaseModel], what: str, ctx: dict | None = None) -> None:
    """Check ``value`` against ``model``; raise one ConfigError listing every problem."""
    raise_errors(*validate(value, model, ctx), what=what)


def raise_errors(errors: list[str], cause: BaseException | None = None, *, what: str) -> None:
    """Raise one ConfigError listing ``errors`` (none: nothing to raise), from ``cause``."""
    if not errors:
        return
    if len(errors) == 1:
        raise ConfigError(f"{what}: {errors[0]}") from cause
    raise ConfigError(f"{what} has {len(errors)} problems:\n  " + "\n  ".join(errors)) from cause
