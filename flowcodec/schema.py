"""A small schema for checking JSON configs whole: every problem at once, each naming its key.

A schema is a tree of :class:`Spec` nodes (:class:`Num`, :class:`Str`, :class:`Bool`,
:class:`In`, :class:`ListOf`, :class:`MapOf`, :class:`Obj`, :class:`Any_`); ``spec.check(value,
path, errors)`` appends one message per problem (the key as a path such as
``codecs[2].kwargs``, and what is allowed), and :func:`check` / :func:`raise_errors` turn the
messages into one :class:`~flowcodec.errors.ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowcodec.errors import ConfigError

__all__ = ["Spec", "Num", "Str", "Bool", "In", "ListOf", "MapOf", "Obj", "Any_", "check",
           "raise_errors",
           "join_path", "kind_of"]


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def kind_of(v: Any) -> str:
    return "null" if v is None else type(v).__name__


class Spec:
    """One node of a schema: ``check(value, path, errors)`` appends messages to ``errors``."""

    optional: bool = False

    def check(self, value: Any, path: str, errors: list[str]) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Any_(Spec):
    """Any JSON value (checked elsewhere)."""

    def check(self, value, path, errors):
        return None


@dataclass
class Num(Spec):
    """A number; ``integer`` for ints only; ``lo``/``hi`` bounds (``*_open`` excludes them)."""

    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False
    note: str = ""

    def allowed(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            if self.integer and not self.lo_open and not self.hi_open:
                rng = f" in {self.lo:g}..{self.hi:g}"
            else:
                rng = (f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                       f"{')' if self.hi_open else ']'}")  # fmt: skip
        elif self.lo is not None:
            rng = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            rng = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            rng = ""
        return what + rng + (f" ({self.note})" if self.note else "")

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            errors.append(f"{path}: expected {self.allowed()}, got {kind_of(value)} {_show(value)}")
            return
        if not math.isfinite(value):
            errors.append(f"{path}: {value!r} is not finite; allowed: {self.allowed()}")
            return
        bad = (self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)) or (
            self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))
        if bad:
            errors.append(f"{path}: {value!r} is out of range; allowed: {self.allowed()}")


@dataclass
class Str(Spec):
    """A string, optionally one of ``choices``."""

    choices: tuple[str, ...] | None = None
    optional: bool = False
    what: str = "a string"

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        if not isinstance(value, str):
            errors.append(f"{path}: expected {self.what}, got {kind_of(value)} {_show(value)}")
        elif self.choices is not None and value not in self.choices:
            errors.append(f"{path}: {value!r} is not allowed; allowed: {', '.join(self.choices)}")


@dataclass
class Bool(Spec):
    optional: bool = False

    def check(self, value, path, errors):
        if not isinstance(value, bool) and not (value is None and self.optional):
            errors.append(f"{path}: expected true or false, got {kind_of(value)} {_show(value)}")


@dataclass
class In(Spec):
    """One of ``values`` (JSON values given elsewhere, e.g. the SNRs a config sweeps)."""

    values: tuple = ()
    optional: bool = False

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        if isinstance(value, bool) or value not in self.values:
            errors.append(f"{path}: {_show(value)} is not allowed; allowed: "
                          f"{', '.join(_show(v) for v in self.values) or '(none)'}")  # fmt: skip


@dataclass
class ListOf(Spec):
    """A list of ``item``s with at least ``min_len`` of them."""

    item: Spec
    min_len: int = 0
    what: str = "a list"
    optional: bool = False

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        if not isinstance(value, list):
            errors.append(f"{path}: expected {self.what}, got {kind_of(value)} {_show(value)}")
            return
        if len(value) < self.min_len:
            errors.append(f"{path}: needs at least {self.min_len} item(s), got {len(value)}")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]", errors)


@dataclass
class MapOf(Spec):
    """An object with arbitrary string keys (``keys`` restricts them) and ``value`` values."""

    value: Spec
    keys: tuple[str, ...] | None = None
    optional: bool = False

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {kind_of(value)} {_show(value)}")
            return
        for k, v in value.items():
            if self.keys is not None and k not in self.keys:
                errors.append(f"{path}: unknown key {k!r}; allowed: {', '.join(self.keys)}")
                continue
            self.value.check(v, f"{path}.{k}", errors)


@dataclass
class Obj(Spec):
    """An object with known ``fields``; ``required`` ones must be there, others are refused."""

    fields: dict[str, Spec]
    required: tuple[str, ...] = ()
    what: str = "an object"
    optional: bool = False
    extra: Callable[[dict, str, list[str]], None] | None = None  # further checks

    def check(self, value, path, errors):
        if value is None and self.optional:
            return
        if not isinstance(value, dict):
            errors.append(f"{path}: expected {self.what}, got {kind_of(value)} {_show(value)}")
            return
        for k in self.required:
            if k not in value:
                errors.append(f"{join_path(path, k)}: missing (required)")
        for k, v in value.items():
            spec = self.fields.get(k)
            if spec is None:
                errors.append(f"{join_path(path, k)}: unknown key; allowed: "
                              f"{', '.join(self.fields)}")  # fmt: skip
                continue
            spec.check(v, join_path(path, k), errors)
        if self.extra is not None:
            self.extra(value, path, errors)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check(value: Any, spec: Spec, what: str) -> None:
    """Check ``value`` against ``spec``; raise one ConfigError listing every problem."""
    errors: list[str] = []
    spec.check(value, "", errors)
    raise_errors(errors, what)


def raise_errors(errors: list[str], what: str) -> None:
    if not errors:
        return
    errors = [e[2:] if e.startswith(": ") else e for e in errors]
    if len(errors) == 1:
        raise ConfigError(f"{what}: {errors[0]}")
    raise ConfigError(f"{what} has {len(errors)} problems:\n  " + "\n  ".join(errors))
