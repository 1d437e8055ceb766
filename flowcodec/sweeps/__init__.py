"""The sweep runner: one way to run a sweep command, and the registry of sweeps.

A sweep is one file with a :class:`Sweep` subclass (its config check and its units) and a
line in :data:`SWEEPS`; the runner (:mod:`flowcodec.sweeps.runner`) loads and checks the
config once, runs the units here or on Ray, writes the outputs and ``failures.json``, and
gives every sweep command the same options. :func:`codec_from_spec` turns a codec spec
(a shipped name, a checkpoint, or a codec to build, fit or train) into a codec.

    flowcodec rd --config digits          # flowcodec/rd/
    flowcodec snr --config digits         # flowcodec/snr/
    flowcodec latency --config digits     # flowcodec/latency.py

docs/sweeps.md shows how to add one.
"""

from __future__ import annotations

from importlib import import_module

from flowcodec.sweeps.codec_spec import INPUT_CODECS, codec_from_spec, with_views
from flowcodec.sweeps.runner import (
    Sweep,
    SweepFailed,
    UnitFailure,
    add_common_arguments,
    map_units,
    raise_failures,
    read_config,
    worker_context,
    write_csv,
    write_json,
)

__all__ = ["SWEEPS", "Sweep", "get_sweep", "add_sweep_parsers", "codec_from_spec", "with_views",
           "INPUT_CODECS", "map_units", "raise_failures", "worker_context", "write_csv",
           "write_json", "add_common_arguments", "read_config", "SweepFailed",
           "UnitFailure"]  # fmt: skip

#: The sweep commands: name -> ``"module:attribute"`` of its :class:`Sweep` (imported when
#: used). A new sweep is one file and one line here.
SWEEPS: dict[str, str] = {
    "latency": "flowcodec.latency:SWEEP",
    "rd": "flowcodec.rd:SWEEP",
    "snr": "flowcodec.snr:SWEEP",
}


def get_sweep(name: str) -> Sweep:
    """The registered sweep ``name``."""
    from flowcodec.errors import ConfigError

    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}; known: {', '.join(SWEEPS)}")
    module, attr = SWEEPS[name].split(":")
    return getattr(import_module(module), attr)


def add_sweep_parsers(subparsers) -> None:
    """Add every registered sweep's subcommand to the ``flowcodec`` command."""
    for name in SWEEPS:
        get_sweep(name).add_parser(subparsers)
