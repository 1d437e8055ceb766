"""What every sweep command shares: its config, its units, its engine, its files, its options.

A sweep (``flowcodec rd``, ``snr``, ``latency``, ...) is a :class:`Sweep` subclass in one file:
it says how to check its config (:meth:`Sweep.validate`, every problem at once) and how to
run it (:meth:`Sweep.execute`); the runner does the rest the same way for all of them:

- **configs**: :meth:`Sweep.load` finds a config by path or by name (``digits`` means
  ``{name}_digits.json`` in ``$FLOWCODEC_CONFIGS`` or ``experiments/``) and checks it whole;
  :meth:`Sweep.check` checks a config once per content, so the library entry point and the
  command that called it do not check (and build a family for) the same config twice;
- **units**: :func:`map_units` runs a sweep's units in order in this process, or as Ray
  tasks on a :class:`~flowcodec.scale.RayEngine` (results in the serial order, a unit that
  raises reported as a :class:`~flowcodec.scale.UnitFailure`); :func:`raise_failures` writes
  what was measured, ``failures.json`` and raises :class:`~flowcodec.scale.SweepFailed`;
  :func:`worker_context` keeps what a worker process loaded (family, data, codecs) for the
  next unit it runs;
- **files**: :func:`write_csv` and :func:`write_json`;
- **options**: every sweep command takes ``--config``, ``--out``, ``--samples`` (old name
  ``--n``), ``--threads``, ``--no-progress`` and the engine's ``--engine``, ``--address``,
  ``--workers``; :meth:`Sweep.command` runs it (exit status 0, or 1 when units failed).

docs/sweeps.md shows a new sweep written on it, in one file plus a registry line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from flowcodec.config import positive_int, resolve_config
from flowcodec.errors import ConfigError
from flowcodec.progress import tqdm
from flowcodec.scale.ray_engine import (
    SweepFailed,
    UnitFailure,
    add_engine_arguments,
    engine_from_args,
    write_failures,
)

__all__ = ["Sweep", "map_units", "raise_failures", "worker_context", "write_csv", "write_json",
           "add_common_arguments", "read_config", "SweepFailed", "UnitFailure"]  # fmt: skip


# --- configs -----------------------------------------------------------------------------------
#: Digests of the configs checked in this process (by sweep), most recent last.
_CHECKED: OrderedDict[str, None] = OrderedDict()
_CHECKED_MAX = 64


def _digest(kind: str, cfg: Any) -> str | None:
    """A digest of ``cfg``'s content for sweep ``kind`` (None if it is not JSON-like)."""
    try:
        text = json.dumps(cfg, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return None
    return kind + ":" + hashlib.sha256(text.encode()).hexdigest()


def read_config(path: str | Path) -> Any:
    """The JSON value in ``path``; a missing file or bad JSON is a ConfigError."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e


# --- units ---------------------------------------------------------------------------------------
#: What each sweep's worker process keeps between units: {sweep: (key, context)}.
_CONTEXTS: dict[str, tuple[str, Any]] = {}


def worker_context(kind: str, key: Any, build: Callable[[], Any]) -> Any:
    """The context this process keeps for sweep ``kind``: ``build()``'s result, built the
    first time ``key`` (JSON-like: a config and the number of samples) is seen and kept for
    the next unit with the same key. One context per sweep at a time: a new key drops the
    old one first (a Ray worker runs one sweep's units after another's)."""
    k = json.dumps(key, sort_keys=True, default=repr)
    held = _CONTEXTS.get(kind)
    if held is None or held[0] != k:
        _CONTEXTS.pop(kind, None)
        _CONTEXTS[kind] = (k, build())
    return _CONTEXTS[kind][1]


def map_units(fn: Callable, args: Sequence[tuple], labels: Sequence[str] | None = None, *,
              engine=None, order: Sequence[int] | None = None,
              on_result: Callable[[int, Any], None] | None = None, desc: str = "units",
              progress: bool = True,
              leave: bool = True) -> tuple[list, list[UnitFailure]]:  # fmt: skip
    """``fn(*args[i])`` for every unit ``i``: ``(results, failures)`` in unit order.

    Without ``engine`` the units run here, one after another in index order (``order`` is
    ignored) under a progress bar, and an error in a unit is raised at once (a serial
    run stops where it fails). With a :class:`~flowcodec.scale.RayEngine` they run as Ray
    tasks submitted in ``order``; a unit that raises leaves ``None`` in ``results`` and a
    :class:`~flowcodec.scale.UnitFailure` in ``failures`` while the others go on.
    ``on_result(i, result)`` is called in this process as each unit finishes (to write
    partial outputs).
    """
    if engine is not None:
        return engine.map(fn, args, labels, order=order, on_result=on_result, desc=desc)
    results = []
    bar = tqdm(range(len(args)), desc=desc, disable=not progress, leave=leave)
    for i in bar:
        if labels is not None:
            bar.set_postfix_str(labels[i])
        results.append(fn(*args[i]))
        if on_result is not None:
            on_result(i, results[i])
    return results, []


def raise_failures(failures: list[UnitFailure], rows: list, out: Path,
                   write: Callable[[list], None] | None = None) -> None:  # fmt: skip
    """If units failed: write the rows that were measured (``write(rows)``), then
    ``failures.json`` in ``out``, and raise :class:`~flowcodec.scale.SweepFailed`."""
    if not failures:
        return
    if write is not None and rows:
        write(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_failures(failures, out / "failures.json")
    raise SweepFailed(failures, rows, out)


# --- files ---------------------------------------------------------------------------------------
def _as_dict(row) -> dict:
    return asdict(row) if is_dataclass(row) else dict(row)


def write_csv(path: Path, rows: list, fields: list[str] | None = None,
              digits: int | None = None) -> None:  # fmt: skip
    """``rows`` (dataclasses or dicts) as CSV. ``fields``: the columns (default: the first
    row's keys; a row without a column leaves it empty); ``digits``: round floats to that
    many decimals (default: as they are)."""
    dicts = [_as_dict(r) for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields if fields is not None else list(dicts[0]))
        w.writeheader()
        for d in dicts:
            if digits is not None:
                d = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}
            w.writerow(d)


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON (what JSON cannot hold is written as its ``str``)."""
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# --- options -------------------------------------------------------------------------------------
def add_common_arguments(p, threads: int | None = 2) -> None:
    """``--threads`` (torch CPU threads, default ``threads``; None: torch's own) and
    ``--no-progress``."""
    shown = threads if threads else "torch's"
    p.add_argument("--threads", type=int, default=threads, help=f"CPU threads (default {shown})")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --- the sweep -----------------------------------------------------------------------------------
class Sweep:
    """A sweep command. Subclass it, set the class attributes, write :meth:`validate` and
    :meth:`execute` (and :meth:`report` to print a summary); register the class in
    :data:`flowcodec.sweeps.SWEEPS`. Everything else is the runner's.

    Attributes: ``name`` (the command, and the prefix of configs found by name),
    ``help`` and ``description`` (for ``--help``), ``outputs`` (the main file a run
    writes, named in messages), ``default_config`` (the config used without ``--config``;
    ``None`` makes ``--config`` required), ``samples_help`` (what ``--samples`` counts).
    """

    name: str = ""
    help: str = ""
    description: str = ""
    outputs: str = ""
    default_config: str | None = None
    samples_help: str = "test samples, >= 1 (default: the config's)"

    # -- what a sweep writes ------------------------------------------------------------------
    def validate(self, cfg: Any, where: str) -> Any:
        """Check ``cfg`` whole; raise one ConfigError naming every bad key (``where``: what
        to call the config in the message)."""
        raise NotImplementedError

    def execute(self, cfg: Any, args, engine) -> list:
        """Run a checked config for the command line (``args``: its options; ``engine``: a
        RayEngine or None) and return the rows."""
        raise NotImplementedError

    def add_arguments(self, p) -> None:
        """The sweep's own options, besides the common ones."""

    def overrides(self, args) -> dict:
        """Config keys the command line sets (applied before the config is checked)."""
        return {}

    def check_engine(self, cfg: Any, args) -> None:
        """Refuse a config the engine cannot run, before the engine starts."""

    def start_engine(self, engine, cfg: Any, args) -> None:
        """Start the engine (a sweep may start it in the background and warm its workers)."""
        engine.start()

    def report(self, cfg: Any, rows: list, args) -> None:
        """Print a summary of the rows of a run of ``cfg``."""

    # -- what the runner gives ----------------------------------------------------------------
    def check(self, cfg: Any, where: str | None = None) -> Any:
        """``cfg`` after :meth:`validate`; a config with the same content already checked
        in this process is not checked again."""
        key = _digest(self.name, cfg)
        if key is not None and key in _CHECKED:
            _CHECKED.move_to_end(key)
            return cfg
        self.validate(cfg, where or f"{self.name} config")
        self.mark_checked(cfg)
        return cfg

    def mark_checked(self, cfg: Any) -> None:
        """Record ``cfg`` as checked (e.g. the normal form of a checked config)."""
        key = _digest(self.name, cfg)
        if key is None:
            return
        _CHECKED[key] = None
        _CHECKED.move_to_end(key)
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)

    def load(self, value: str | Path | None, overrides: dict | None = None) -> Any:
        """The config ``value`` names (a path, or a name such as ``digits``; ``None``: the
        default), with ``overrides`` set, checked whole."""
        name = value if value is not None else self.default_config
        path = resolve_config(None if name is None else str(name), self.name)
        cfg = read_config(path)
        if overrides and isinstance(cfg, dict):
            cfg = {**cfg, **overrides}
        return self.check(cfg, f"{self.name} config {path}")

    def add_parser(self, subparsers) -> None:
        """Add this sweep's subcommand to the ``flowcodec`` command's subparsers."""
        p = subparsers.add_parser(self.name, help=self.help, description=self.description)
        default = self.default_config
        p.add_argument("--config", required=default is None, default=None,
                       help=f"JSON config: a path, or a name such as digits or cifar10 for "
                            f"experiments/{self.name}_NAME.json"
                            + (f" (default: {default})" if default else ""))  # fmt: skip
        p.add_argument("--out", default=f"runs/{self.name}",
                       help=f"output folder (default runs/{self.name})")
        p.add_argument("--samples", "--n", dest="samples", type=positive_int, default=None,
                       help=self.samples_help + "; --n is the old name")
        add_common_arguments(p)
        add_engine_arguments(p)
        self.add_arguments(p)
        p.set_defaults(func=self.command)

    def command(self, args) -> int:
        """Run the command: threads, config (checked whole before anything starts), engine,
        the run, and a summary. Returns 0, or 1 when units failed (their rows and
        ``failures.json`` are written)."""
        import torch

        torch.set_num_threads(max(1, args.threads))
        cfg = self.load(args.config, self.overrides(args))
        engine = engine_from_args(args)
        if engine is not None:
            self.check_engine(cfg, args)
        out = Path(args.out)
        try:
            if engine is not None:
                self.start_engine(engine, cfg, args)
            rows = self.execute(cfg, args, engine)
        except SweepFailed as e:
            for f in e.failures:
                print(f"failed: {f}", file=sys.stderr)
            print(f"{len(e.rows)} rows written to {out / self.outputs}; the failed units are "
                  f"in {out / 'failures.json'}", file=sys.stderr)  # fmt: skip
            return 1
        finally:
            if engine is not None:
                print(f"ray: {engine.stats.summary()}", file=sys.stderr)
                engine.close()
        self.report(cfg, rows, args)
        return 0
