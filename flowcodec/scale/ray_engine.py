"""Independent units of a sweep as Ray tasks, gathered back in order.

A *unit* is a call ``fn(*args)`` of a module-level function whose arguments are small
(names, paths, a JSON config, an index): the task loads what it needs by name (family and
codec checkpoints, the dataset) in the worker, and keeps it there for the next unit that
worker runs, so nothing large is pickled. :meth:`RayEngine.map` submits every unit, gathers
the results by index (the caller assembles the same rows as a serial run), and

- reports a unit that raises as a :class:`UnitFailure` naming the unit (its sweep point)
  with the error, while the other units run to the end;
- retries a unit whose worker process died (killed, out of memory, a lost node) up to
  ``max_retries`` times (Ray's task retries; an exception raised by the unit itself is not
  retried: it would raise again).

Ray is the optional extra ``flowcodec[ray]`` and is imported only here, when an engine
starts. Without ``address`` a local Ray instance with ``workers`` CPUs is started and
stopped again on :meth:`RayEngine.close`; with ``address`` (``"ray://host:10001"`` or
``"host:6379"``, or ``"auto"``) an existing cluster is joined and left running.

Example
-------
>>> from flowcodec.scale.ray_engine import RayEngine
>>> with RayEngine(workers=2) as eng:                                   # doctest: +SKIP
...     results, failures = eng.map(pow, [(2, 3), (3, 2)], ["2^3", "3^2"])
>>> results                                                             # doctest: +SKIP
[8, 9]
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["ENGINES", "RayEngine", "SweepFailed", "UnitFailure", "add_engine_arguments",
           "ray_available", "engine_from_args"]  # fmt: skip

#: The values of ``--engine``.
ENGINES = ("serial", "ray")

#: Environment variables a unit needs to find data and caches, passed to Ray workers.
_PASS_ENV = ("FLOWCODEC_DATA", "FLOWCODEC_CACHE", "FLOWCODEC_PROGRESS_INTERVAL")

INSTALL_HINT = "Ray is not installed: pip install 'flowcodec[ray]' (or: make setup)"


def ray_available() -> bool:
    """True when the ``ray`` package can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class UnitFailure:
    """A unit that did not produce a result: which one (``index`` into the submitted units,
    ``label`` naming its sweep point), the error, and the traceback from the worker."""

    index: int
    label: str
    error: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.label}: {self.error}"


class SweepFailed(RuntimeError):
    """Some units of a sweep failed; the others completed and their outputs were written.

    ``failures`` lists the failed units (:class:`UnitFailure`), ``rows`` the rows that were
    measured, ``out`` the folder holding the outputs and ``failures.json``.
    """

    def __init__(self, failures: list[UnitFailure], rows: list | None = None, out=None):
        self.failures = failures
        self.rows = rows or []
        self.out = out
        names = "; ".join(str(f) for f in failures)
        where = f" (outputs of the rest in {out})" if out is not None else ""
        super().__init__(f"{len(failures)} unit(s) of the sweep failed{where}: {names}")


def write_failures(failures: list[UnitFailure], path) -> None:
    """``failures.json``: one object per failed unit (index, label, error, traceback)."""
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps([asdict(f) for f in failures], indent=1))


@dataclass
class EngineStats:
    """What a run on the engine cost: ``startup_s`` (starting or joining Ray),
    ``units`` run, ``unit_seconds`` (time inside each unit, by its number among all the
    units this engine ran: a second :meth:`RayEngine.map` continues the numbering),
    ``wall_s`` of :meth:`RayEngine.map` (all calls; ``maps``: each call's description, units
    and wall time)."""

    startup_s: float = 0.0
    #: the longest warm-up unit (:meth:`RayEngine.warm`), 0 without one
    warm_s: float = 0.0
    units: int = 0
    wall_s: float = 0.0
    unit_seconds: dict[int, float] = field(default_factory=dict)
    #: per unit: (start, end) in seconds after its map() began, as the worker saw them
    unit_span: dict[int, tuple[float, float]] = field(default_factory=dict)
    workers_seen: set = field(default_factory=set)
    maps: list = field(default_factory=list)

    def summary(self) -> str:
        """One line: start-up, units, wall time, time inside units, the first unit's start
        after the first submission, and each map() call when there were several."""
        inside = sum(self.unit_seconds.values())
        first_map = range(self.maps[0][1]) if self.maps else range(0)
        first = min((self.unit_span[i][0] for i in first_map if i in self.unit_span),
                    default=0.0)  # fmt: skip
        calls = "" if len(self.maps) < 2 else "; " + ", ".join(
            f"{d}: {n} units in {w:.1f} s" for d, n, w in self.maps)
        warm = f", warm-up {self.warm_s:.1f} s per worker" if self.warm_s else ""
        return (f"start-up {self.startup_s:.1f} s{warm}, {self.units} units in {self.wall_s:.1f} s "
                f"({inside:.1f} s inside units on {len(self.workers_seen)} worker processes; "
                f"the first unit started {first:.1f} s after submission{calls})")


def _run_unit(fn: Callable, threads: int, *args) -> tuple:
    """The body of every Ray task: fix the thread count, run the unit, time it. The unit's
    arguments travel as the task's own, so an object put with :meth:`RayEngine.put` arrives
    as its value."""
    import torch

    torch.set_num_threads(max(1, threads))
    start = time.time()
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0, os.getpid(), start, time.time()


class RayEngine:
    """A Ray instance to run sweep units on (a context manager).

    ``workers``: CPUs of the local instance (ignored with ``address``); each unit takes one
    CPU (``cpus_per_unit``), so ``workers`` units run at once. ``threads``: torch threads
    inside a unit (default: ``cpus_per_unit``). ``max_retries``: re-runs of a unit whose
    worker died. ``progress``: a bar over finished units.
    """

    def __init__(self, workers: int = 2, address: str | None = None, threads: int | None = None,
                 cpus_per_unit: float = 1.0, max_retries: int = 2, progress: bool = True,
                 gpus_per_unit: float = 0.0):  # fmt: skip
        from flowcodec.errors import ConfigError

        if address is None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):  # fmt: skip
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        if max_retries < 0 or cpus_per_unit <= 0 or gpus_per_unit < 0:
            raise ConfigError("max_retries and gpus_per_unit must be >= 0, cpus_per_unit > 0")
        self.workers = workers
        self.address = address
        self.cpus_per_unit = cpus_per_unit
        self.gpus_per_unit = gpus_per_unit
        self.threads = threads if threads is not None else max(1, int(cpus_per_unit))
        self.max_retries = max_retries
        self.progress = progress
        self.stats = EngineStats()
        self._started = False
        self._ray = None
        self._thread = None  # a start in the background (start(background=True))
        self._up = threading.Event()  # set when the background start has finished
        self._release = threading.Event()  # lets the start thread end (in close)
        self._start_error: BaseException | None = None
        self._warm: list = []  # warm-up units not yet submitted
        self._lock = threading.Lock()
        self._warm_refs: list = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, background: bool = False) -> RayEngine:
        """Start a local Ray instance (or join ``address``); records ``stats.startup_s``.

        ``background=True`` returns at once and starts Ray in a thread, so the caller can
        load its own data meanwhile (Ray's start is mostly waiting for its helper
        processes); :meth:`map`, :meth:`put` and :meth:`wait_started` wait for it, and an
        error in the start is raised there. Units given to :meth:`warm` are submitted as
        soon as Ray is up.
        """
        if self._thread is not None or self._started:
            return self
        if not background:
            self._start()
            return self

        def run():
            try:
                self._start()
            except BaseException as e:  # raised again by wait_started, in the caller
                self._start_error = e
            finally:
                self._up.set()
            # Ray's helper processes (GCS, raylet) are started with a parent-death signal,
            # which Linux sends when the *thread* that started them ends, not the process:
            # so this thread lives until close() has shut Ray down.
            self._release.wait()

        self._thread = threading.Thread(target=run, name="ray-start", daemon=True)
        self._thread.start()
        return self

    def wait_started(self) -> None:
        """Wait for a start in the background; raise its error if it failed."""
        if self._thread is not None:
            self._up.wait()
        if self._start_error is not None:
            err, self._start_error = self._start_error, None
            raise err
        if self._ray is None:
            self._start()
        self._submit_warm()

    def warm(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` once on each of the local instance's ``workers`` worker
        processes, before any unit: a cache warm-up (import torch and flowcodec, load the
        family and data into the worker's cache) that overlaps what the driver does
        before it submits the units. Each warm-up task takes one unit's CPUs, so the
        ``workers`` of them start side by side in separate processes, and the units run
        in those processes afterwards. Its time is ``stats.warm_s``; an error in a warm-up
        is not raised (the units meet it again and report it)."""
        with self._lock:
            self._warm.append((fn, args))
        if self._ray is not None and self._ray.is_initialized():
            self._submit_warm()  # else the start submits it

    def _submit_warm(self) -> None:
        """Submit the warm-ups not yet submitted (from the caller or the start thread)."""
        with self._lock:
            pending, self._warm = self._warm, []
            if not pending:
                return
            remote = self._ray.remote(_run_unit).options(
                num_cpus=self.cpus_per_unit, num_gpus=self.gpus_per_unit, max_retries=0)
            n = 1 if self.address else self.workers
            for fn, args in pending:
                self._warm_refs += [remote.remote(fn, self.threads, *args) for _ in range(n)]

    def _start(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise RuntimeError(INSTALL_HINT) from e
        self._ray = ray
        if ray.is_initialized():  # a caller's own instance: use it, leave it running
            self._submit_warm()
            return
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        t0 = time.perf_counter()
        kwargs = dict(log_to_driver=False, runtime_env={"env_vars": env} if env else None)
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                # Ray runs its workers at niceness 15 by default: below the command that
                # started them, so a loaded machine starves them. Give them the driver's.
                ray.init(num_cpus=self.workers, num_gpus=0 if not self.gpus_per_unit else None,
                         include_dashboard=False,
                         _system_config={"worker_niceness": os.nice(0)}, **kwargs)  # fmt: skip
        except Exception as e:  # Ray raises plain Exception / ConnectionError here
            self._ray = None
            where = f"join the Ray cluster at {self.address}" if self.address else (
                f"start a local Ray instance with {self.workers} CPUs")
            raise RuntimeError(
                f"could not {where}: {e}. On a machine whose cores are busy, Ray's helper "
                f"processes may miss their start-up deadline; retry when it is less loaded, "
                f"or start a cluster with `ray start --head` and pass --address") from e
        self.stats.startup_s = time.perf_counter() - t0
        self._started = True
        self._submit_warm()

    def close(self) -> None:
        """Stop the local instance this engine started (a joined cluster keeps running)."""
        if self._thread is not None:
            self._up.wait()
        self._collect_warm(wait=False)
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._started = False
        if self._thread is not None:  # after the shutdown: the start thread may now end
            self._release.set()
            self._thread.join()
            self._thread = None

    def _collect_warm(self, wait: bool) -> None:
        """Record the finished warm-ups' time in ``stats.warm_s`` (``wait``: wait for all)."""
        if not self._warm_refs or self._ray is None:
            return
        ray = self._ray
        done, rest = ray.wait(self._warm_refs, num_returns=len(self._warm_refs),
                              timeout=None if wait else 0)  # fmt: skip
        for ref in done:
            try:
                _, secs, pid, _, _ = ray.get(ref)
            except Exception:  # the units report the same error
                continue
            self.stats.warm_s = max(self.stats.warm_s, secs)
            self.stats.workers_seen.add(pid)
        self._warm_refs = list(rest)

    def __enter__(self) -> RayEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, obj):
        """Put ``obj`` in Ray's object store once; pass the returned reference among a
        unit's arguments to :meth:`map` and the unit gets ``obj`` (e.g. a codec trained by
        an earlier unit, handed to many units without pickling it for each)."""
        self.wait_started()
        return self._ray.put(obj)

    # -- running units ---------------------------------------------------------------------
    def map(self, fn: Callable, args: Sequence[tuple], labels: Sequence[str] | None = None,
            order: Sequence[int] | None = None, on_result: Callable | None = None,
            desc: str = "units") -> tuple[list, list[UnitFailure]]:  # fmt: skip
        """Run ``fn(*args[i])`` for every ``i`` as Ray tasks.

        Returns ``(results, failures)``: ``results[i]`` is unit ``i``'s return value, or
        ``None`` when it failed (then a :class:`UnitFailure` with index ``i`` is in
        ``failures``, in index order). ``order`` (optional) is the submission order (e.g.
        the longest units first); ``on_result(i, result)`` is called as each unit finishes,
        in the driver (to write partial outputs).
        """
        from flowcodec.progress import tqdm

        self.wait_started()
        ray = self._ray
        n = len(args)
        labels = list(labels) if labels is not None else [f"unit {i}" for i in range(n)]
        order = list(order) if order is not None else list(range(n))
        if sorted(order) != list(range(n)):
            raise ValueError("order must be a permutation of the unit indices")
        remote = ray.remote(_run_unit).options(
            num_cpus=self.cpus_per_unit, num_gpus=self.gpus_per_unit,
            max_retries=self.max_retries, retry_exceptions=False)  # fmt: skip
        t0 = time.perf_counter()
        t_wall = time.time()
        fn_ref = ray.put(fn)
        pending = {remote.remote(fn_ref, self.threads, *args[i]): i for i in order}
        results: list = [None] * n
        failures: list[UnitFailure] = []
        base = self.stats.units  # this call's units continue the engine's numbering
        self.stats.units += n
        with tqdm(total=n, desc=desc, disable=not self.progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        out, secs, pid, begin, end = ray.get(ref)
                    except Exception as e:  # RayTaskError, WorkerCrashedError, ...
                        failures.append(_failure(i, labels[i], e))
                    else:
                        results[i] = out
                        self.stats.unit_seconds[base + i] = secs
                        self.stats.unit_span[base + i] = (begin - t_wall, end - t_wall)
                        self.stats.workers_seen.add(pid)
                        if on_result is not None:
                            on_result(i, out)
                    bar.update(1)
                    bar.set_postfix_str(labels[i])
        self.stats.wall_s += time.perf_counter() - t0
        self._collect_warm(wait=False)
        self.stats.maps.append((desc, n, time.perf_counter() - t0))
        failures.sort(key=lambda f: f.index)
        return results, failures


def _failure(index: int, label: str, e: BaseException) -> UnitFailure:
    """A UnitFailure from what ``ray.get`` raised: the unit's own exception where Ray kept
    it (``RayTaskError.cause``), else Ray's error (a worker that died on every try)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        err = f"{type(cause).__name__}: {cause}"
        tb = str(e)
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err = f"{type(e).__name__}: {first}"
        tb = "".join(traceback.format_exception(e))
    return UnitFailure(index, label, err, tb)


def add_engine_arguments(p) -> None:
    """``--engine``, ``--address`` and ``--workers`` for a sweep command's parser."""
    from flowcodec.config import positive_int

    p.add_argument("--engine", choices=ENGINES, default="serial",
                   help="serial (default): one process; ray: every unit of the sweep as a "
                        "Ray task (needs the extra flowcodec[ray]; docs/scale.md)")  # fmt: skip
    p.add_argument("--address", default=None,
                   help="with --engine ray: join this Ray cluster (e.g. ray://head:10001 or "
                        "auto) instead of starting a local instance")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=2,
                   help="with --engine ray and no --address: CPUs of the local Ray "
                        "instance, one unit each (default 2)")  # fmt: skip


def engine_from_args(args) -> RayEngine | None:
    """The engine a command's ``--engine``/``--address``/``--workers`` ask for (``None``:
    serial). ``--address`` without ``--engine ray`` is an error."""
    from flowcodec.errors import ConfigError

    engine = getattr(args, "engine", "serial")
    if engine == "serial":
        if getattr(args, "address", None):
            raise ConfigError("--address joins a Ray cluster: use it with --engine ray")
        return None
    return RayEngine(workers=args.workers, address=args.address,
                     progress=not getattr(args, "no_progress", False))  # fmt: skip
