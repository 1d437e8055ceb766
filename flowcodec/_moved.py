"""Names that moved keep working from their old module for one release, with a warning.

A module whose public names moved sets ``__getattr__ = moved(__name__, {name: new_module})``;
Python calls it only for names the module no longer defines, so the module itself can use the
names under private aliases while ``old_module.name`` warns and returns the new object.
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["moved"]


def moved(old: str, names: dict[str, str]):
    """A module ``__getattr__`` that serves ``names`` (name -> new module) with a
    :class:`DeprecationWarning` and raises :class:`AttributeError` for anything else."""

    def __getattr__(name: str):
        new = names.get(name)
        if new is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} has moved to {new}.{name}; import it from there (the old "
                      "name goes away in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
