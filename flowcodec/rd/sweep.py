"""The ``rd`` sweep: the serial run, its units on Ray, the outputs and the command."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flowcodec.config import validate_rd_config
from flowcodec.errors import ConfigError
from flowcodec.rd.measure import (
    RDContext,
    build_jobs,
    channel_rows,
    measure,
    memos,
    reference_row,
)
from flowcodec.rd.plot import plot_channel, plot_rd
from flowcodec.rd.rows import RDRow, compare, load_rows
from flowcodec.sweeps.runner import (
    Sweep,
    map_units,
    raise_failures,
    worker_context,
    write_csv,
    write_json,
)

__all__ = ["run_rd", "rd_warm", "rd_unit", "check_baselines", "write_outputs", "load_config",
           "add_parser", "RDSweep", "SWEEP"]


def load_config(path: str | Path) -> dict:
    """Read and check an rd config (JSON): a path, or a name such as ``digits``."""
    return SWEEP.load(path)


def run_rd(cfg: dict, out: str | Path, progress: bool = True, n: int | None = None,
           device: str = "cpu", family=None, baselines: str | Path | None = None,
           engine=None) -> list[RDRow]:  # fmt: skip
    """Run every entry of ``cfg``; write CSV, JSON and plots under ``out``; return the rows.

    ``family`` (optional) replaces the trained family named in the config (tests).
    ``baselines`` (optional): an earlier run's ``rd.json`` on the same dataset, member and
    number of test images; its clean rows (not its reference) whose labels this run does
    not have are added to the returned rows, the outputs and the comparison (``source``
    is prefixed with ``"baselines:"``).
    ``engine`` (optional): a :class:`~flowcodec.scale.RayEngine`; every codec entry or
    sweep point (with its channel rows) and the reference become Ray tasks that load the
    family and data by name, and the rows are the serial run's (same seeds). A unit that
    raises is reported with its label in ``failures.json`` and a
    :class:`~flowcodec.scale.SweepFailed` after the other rows are written.
    """
    SWEEP.check(cfg)  # whole, before any work
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n (test images) must be an integer >= 1, got {n!r}")
    if engine is not None and family is not None:
        raise ConfigError("a Ray engine loads the family by its name in every task: "
                          "family= is for serial runs")  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RDContext(cfg, n, progress, family)
    extra = check_baselines(baselines, cfg, len(ctx.test)) if baselines else []
    jobs = build_jobs(cfg, ctx, progress, device)
    if engine is not None:
        rows, histories = _run_rd_ray(cfg, jobs, out, n, device, engine)
    else:
        rows: list[RDRow] = [reference_row(ctx)]
        histories, built = {}, {}
        memo = memos()

        def measured(i: int, res: tuple) -> None:
            row, codec, hist = res
            built[row.label] = (codec, jobs[i][2], row)
            if hist is not None:
                histories[row.label] = hist
            rows.append(row)
            write_csv(out / "rd.csv", rows, digits=4)

        map_units(lambda job: measure(ctx, job, memo), [(job,) for job in jobs],
                  [job[1] for job in jobs], on_result=measured, desc="rd",
                  progress=progress)  # fmt: skip
        chan = []
        for label, (codec, p, row) in built.items():
            chan += channel_rows(cfg, ctx, label, codec, p, row.group, row.source)
        rows += [r for _, r in sorted(chan, key=lambda c: c[0])]
    have = {r.label for r in rows}
    rows += [r for r in extra if r.label not in have]
    write_outputs(rows, out, cfg, histories)
    return rows


def _worker_context(cfg: dict, n: int | None) -> tuple:
    """This worker process's context for a run and its memo of the frozen modules (as the
    serial run keeps one), built once per run."""
    return worker_context("rd", [cfg, n], lambda: (RDContext(cfg, n, progress=False),
                                                   memos()))  # fmt: skip


def rd_warm(cfg: dict, n: int | None, device: str = "cpu") -> int:
    """A Ray worker's warm-up before its first unit: import, load the family and data, and
    split the family (with the baselines' fitting features) at every point the config
    uses. Returns the number of split points prepared."""
    ctx, _ = _worker_context(cfg, n)
    points = {ctx.point} | {job[2] for job in build_jobs(cfg, ctx, False, device)}
    for p in sorted(points):
        ctx.split(p)
    return len(points)


def rd_unit(cfg: dict, n: int | None, index: int, device: str = "cpu") -> dict:
    """One unit of an rd run, as a Ray task runs it: ``index`` -1 is the reference row,
    ``index`` i >= 0 the i-th job (codec entry or sweep point) with its channel rows.
    The family and data are loaded by name once per worker process."""
    ctx, memo = _worker_context(cfg, n)
    if index < 0:
        return {"row": reference_row(ctx), "history": None, "channels": []}
    jobs = build_jobs(cfg, ctx, False, device)
    job = jobs[index]
    row, codec, hist = measure(ctx, job, memo)
    chan = channel_rows(cfg, ctx, job[1], codec, job[2], row.group, row.source)
    return {"row": row, "history": hist, "channels": chan}


def _run_rd_ray(cfg, jobs, out: Path, n, device, engine) -> tuple[list, dict]:
    """The units of an rd run on a Ray engine; rows in the serial run's order."""
    labels = ["uncompressed (reference)"] + [f"{j[1]} (point {j[2]})" for j in jobs]
    args = [(cfg, n, i - 1, device) for i in range(len(jobs) + 1)]
    # trained entries take longest: submit them first so no worker idles at the end
    order = sorted(range(len(args)), key=lambda i: (i == 0 or jobs[i - 1][4] != "trained", i))
    done: dict[int, dict] = {}

    def partial(i, res):
        done[i] = res
        write_csv(out / "rd.csv", [done[k]["row"] for k in sorted(done)], digits=4)

    results, failures = map_units(rd_unit, args, labels, engine=engine, order=order,
                                  on_result=partial, desc="rd (ray)")  # fmt: skip
    ok = [r for r in results if r is not None]
    rows = [r["row"] for r in ok]
    chan = [c for r in ok for c in r["channels"]]
    rows += [row for _, row in sorted(chan, key=lambda c: c[0])]
    histories = {r["row"].label: r["history"] for r in ok if r["history"] is not None}
    raise_failures(failures, rows, out, lambda rs: write_outputs(rs, out, cfg, histories))
    return rows, histories


def check_baselines(path: str | Path, cfg: dict, n: int | None = None) -> list[RDRow]:
    """The clean, non-reference rows of an earlier run, if it measured what ``cfg`` will
    (same dataset, family and member; same number of test images when ``cfg`` or ``n``
    names one)."""
    from dataclasses import replace

    from flowcodec.errors import ConfigError

    extra = load_rows(path)
    try:
        old = json.loads(Path(path).read_text()).get("config", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read its config: {e}") from e
    for key in ("dataset", "family", "member"):
        if key in old and key in cfg and old[key] != cfg[key]:
            raise ConfigError(f"baselines {path} used {key}={old[key]!r}, this config "
                              f"{key}={cfg[key]!r}")  # fmt: skip
    ref = next((r for r in extra if r.source == "reference" or r.group == "reference"), None)
    if ref is None:
        raise ConfigError(f"baselines {path}: the earlier run has no reference row")
    want = n or cfg.get("test_subset")
    if want and ref.n != int(want):
        raise ConfigError(f"baselines {path} were measured on {ref.n} test images, this run "
                          f"uses {want}")  # fmt: skip
    return [replace(r, source=f"baselines:{r.source}") for r in extra
            if r.condition == "clean" and r is not ref]  # fmt: skip


def write_outputs(rows: list[RDRow], out: Path, cfg: dict, histories: dict) -> None:
    """rd.csv, rd.json, targets.csv and the plots."""
    write_csv(out / "rd.csv", rows, digits=4)
    write_json(out / "rd.json", {"config": cfg, "rows": [asdict(r) for r in rows],
                                 "train_histories": histories})
    comps = compare(rows)
    if comps:
        write_csv(out / "targets.csv", comps, digits=4)
    plot_rd(rows, out / "rd.png", title=cfg.get("title", ""))
    if any(r.condition != "clean" for r in rows):
        plot_channel(rows, out / "channel.png")


class RDSweep(Sweep):
    """``flowcodec rd``."""

    name = "rd"
    outputs = "rd.csv"
    help = "accuracy against bytes per image for the codecs listed in a config"
    description = ("Measure accuracy against bytes per image (real bytes, headers included) "
                   "for every codec a config lists: baselines built and fitted here, shipped "
                   "learned codecs, and learned codecs trained here over a rate sweep; "
                   "optionally under packet loss or bit flips. The config is checked whole "
                   "before any work starts. Writes rd.csv, rd.json, targets.csv and rd.png.")
    samples_help = "test images, >= 1 (default: the config's test_subset, else all)"

    def validate(self, cfg, where):
        return validate_rd_config(cfg, where)

    def add_arguments(self, p) -> None:
        p.add_argument("--device", default="cpu", help="device for training entries")
        p.add_argument("--baselines", default=None, metavar="RD_JSON",
                       help="rd.json of an earlier run on the same test set (e.g. of "
                            "experiments/rd_baselines_cifar10.json): its rows join this run's "
                            "comparison and plot")  # fmt: skip

    def start_engine(self, engine, cfg, args) -> None:
        # Ray starts in the background while this process loads the family and data; then
        # each worker warms up (the same loading) side by side
        engine.start(background=True)
        engine.warm(rd_warm, cfg, args.samples, args.device)

    def execute(self, cfg, args, engine) -> list[RDRow]:
        return run_rd(cfg, args.out, progress=not args.no_progress, n=args.samples,
                      device=args.device, baselines=args.baselines, engine=engine)  # fmt: skip

    def report(self, cfg: dict, rows: list[RDRow], args) -> None:
        cols = ("label", "condition", "accuracy", "bytes_per_image", "session_bytes",
                "device_mflops", "device_flops_pct")  # fmt: skip
        print("  ".join(f"{c:>18}" for c in cols))
        for r in rows:
            vals = [r.label, r.condition, f"{100 * r.accuracy:.2f}", f"{r.bytes_per_image:.1f}",
                    f"{r.session_bytes:.1f}", f"{r.device_mflops:.1f}",
                    f"{r.device_flops_pct:.1f}"]  # fmt: skip
            print("  ".join(f"{v:>18}" for v in vals))
        comps = compare(rows)
        if comps:
            print("\nlearned codecs against the targets (input = cheapest JPEG/WebP at least as "
                  "accurate):")  # fmt: skip
        for c in comps:
            ratio = f"{c.input_ratio:.3f} of {c.input_label}" if c.input_ratio else "no input row"
            f32 = f"{c.float32_ratio:.5f}" if c.float32_ratio else "-"
            print(f"  {c.label:>24} {c.framing:>14}: {100 * c.accuracy:.2f}% "
                  f"({c.gap_points:+.2f} pt below), {c.bytes:.1f} B, {ratio}, float32 x{f32}")
            if c.webp_ratio:
                print(f"  {'':>24} {'':>14}  cheapest WebP at least as accurate: "
                      f"{c.webp_label} {c.webp_bytes:.1f} B, ratio {c.webp_ratio:.3f}")
            if c.floor_label:
                verdict = "beats" if c.beats_floor else "does not beat"
                print(f"  {'':>24} {'':>14}  {verdict} the device-answer floor "
                      f"{c.floor_label} ({100 * c.floor_accuracy:.2f}% at "
                      f"{c.floor_bytes:.1f} B)")
        print(f"wrote {Path(args.out) / 'rd.csv'} and plots")


SWEEP = RDSweep()


def add_parser(subparsers) -> None:
    """Add the ``rd`` subcommand to the ``flowcodec`` command's subparsers."""
    SWEEP.add_parser(subparsers)
