"""The ``snr`` sweep: the serial run, its units on Ray, the outputs and the command."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from flowcodec.errors import ConfigError
from flowcodec.snr.cells import (
    digital_base_rows,
    digital_cell,
    digital_jobs,
    digital_rows,
    digital_tables,
    jscc_cell,
    jscc_jobs,
    jscc_rows,
)
from flowcodec.snr.config import validate_config
from flowcodec.snr.context import SNRContext, check_jscc, jscc_source, train_entry
from flowcodec.snr.plot import plot
from flowcodec.snr.rows import SNRRow, choose
from flowcodec.sweeps.codec_spec import codec_from_spec, with_views
from flowcodec.sweeps.runner import (
    Sweep,
    map_units,
    raise_failures,
    worker_context,
    write_csv,
    write_json,
)

__all__ = ["run_snr", "snr_unit", "ray_trained_entries", "load_config", "add_parser",
           "SNRSweep", "SWEEP"]


def load_config(path_or_name: str) -> dict:
    """A config by path, or by name (``digits``: ``snr_digits.json`` in ``$FLOWCODEC_CONFIGS``
    or ``experiments/``), checked whole."""
    return SWEEP.load(path_or_name)


def run_snr(cfg: dict, out: str | Path, n: int | None = None, progress: bool = True,
            write: bool = True, engine=None) -> list[SNRRow]:  # fmt: skip
    """Run a (validated) config; write ``snr.csv``, ``snr.json`` and the plots to ``out``.

    ``engine`` (a :class:`~flowcodec.scale.RayEngine`) runs the units of the sweep as Ray
    tasks (docs/scale.md): first the reference and the training of every ``"train"``
    entry, then every cell (a JSCC entry's (channel, SNR, uses); the digital chain's
    (channel, SNR), and its rows without a channel). Each loads the family, data and
    shipped codecs by name; a trained codec is put in Ray's object store once. The rows
    are the serial run's, in its order. A config that trains needs ``"entry_seeds":
    true`` (each trained codec is then initialised from its own seed, so it does not
    depend on the entries trained before it). A unit that raises is reported with its
    sweep point; the rest complete, their rows are written with ``failures.json``, and
    :class:`~flowcodec.scale.SweepFailed` is raised.
    """
    start = time.perf_counter()
    SWEEP.check(cfg)  # whole, before any work
    out = Path(out)
    if engine is not None:
        return _run_snr_ray(cfg, out, n, engine, start, write)
    ctx = SNRContext(cfg, n, progress)
    hs, y, tail = ctx.hs, ctx.y, ctx.tail
    rows = [ctx.reference(cfg)]
    made: dict = {}
    for k, e in enumerate(cfg.get("jscc", [])):
        if str(e.get("codec", "")).startswith("@"):  # a codec of an earlier entry
            codec = made[e["codec"][1:]]
        else:
            codec = codec_from_spec(e["codec"]) if "codec" in e else \
                train_entry(ctx, cfg, k, progress)
        made[e["label"]] = codec
        check_jscc(codec, e)
        codec = with_views(codec, e["views"]) if "views" in e else codec
        views = codec.views
        rows += jscc_rows(codec.eval(), e["label"], ctx.view_features(views), y, tail, cfg,
                           e, e.get("channels", cfg["channels"]), progress)  # fmt: skip
        if write:
            _write(rows, cfg, out, start)
    d = cfg.get("digital")
    if d is not None:
        codec = codec_from_spec(d["codec"]) if "codec" in d else \
            train_entry(ctx, cfg, len(cfg.get("jscc", [])), progress)
        rps = d.get("rate_points", list(range(getattr(codec, "rates", 1))))
        tables = digital_tables(codec, hs, y, tail, rps)
        rows += digital_base_rows(tables, d, len(y))
        rows += digital_rows(tables, cfg, d, cfg["channels"], progress)
    if write:
        _write(rows, cfg, out, start)
        plot(rows, cfg, out)
    return rows


def snr_unit(cfg: dict, n: int | None, kind: str, index, codec=None):
    """One unit of an ``snr`` sweep, as a Ray task runs it. The family, data and shipped
    codecs are loaded by name, once per worker process; ``codec`` is a codec trained by an
    earlier unit (Ray hands it over from its object store).

    ``kind``: ``"reference"`` (returns ``[row]``), ``"train"`` (``index``: the entry;
    returns the trained codec), ``"jscc"`` (``index = (entry, cell)``), ``"digital-base"``
    or ``"digital"`` (``index``: the cell); these return their rows.
    """
    ctx = worker_context("snr", [cfg, n], lambda: SNRContext(cfg, n, progress=False))
    if kind == "reference":
        return [ctx.reference(cfg)]
    if kind == "train":
        return train_entry(ctx, cfg, int(index), progress=False)
    if kind == "jscc":
        k, j = index
        e = cfg["jscc"][k]
        if codec is None:
            how, spec = jscc_source(cfg, k)
            if how != "load":
                raise ConfigError(f"jscc entry {e['label']!r}: its trained codec was not given")
            codec = ctx.load(spec)
        check_jscc(codec, e)
        codec = with_views(codec, e["views"]) if "views" in e else codec
        views = codec.views
        ch_name, snr, u = jscc_jobs(cfg, e)[j]
        row = jscc_cell(codec.eval(), e["label"], ctx.view_features(views), ctx.y, ctx.tail,
                         cfg, e, ch_name, snr, u, j)  # fmt: skip
        return [] if row is None else [row]
    d = cfg["digital"]
    if codec is None:
        if "codec" not in d:
            raise ConfigError("digital: its trained codec was not given")
        codec = ctx.load(d["codec"])
    tables, uses = ctx.tables(codec, d)
    if kind == "digital-base":
        return digital_base_rows(tables, d, len(ctx.y))
    if kind == "digital":
        ch_name, snr = digital_jobs(cfg)[index]
        return digital_cell(tables, uses, cfg, d, ch_name, snr, index)
    raise ValueError(f"unknown snr unit kind {kind!r}")


def ray_trained_entries(cfg: dict) -> list[int]:
    """The entries a config trains (JSCC entry indices; ``len(cfg["jscc"])`` for the
    digital chain), checked for a run on Ray: a config that trains needs
    ``"entry_seeds": true``."""
    jscc = cfg.get("jscc", [])
    d = cfg.get("digital")
    trains = [k for k, e in enumerate(jscc) if "train" in e]
    if d is not None and "train" in d:
        trains.append(len(jscc))
    if trains and not cfg.get("entry_seeds"):
        raise ConfigError('--engine ray: this config trains codecs, so it needs '
                          '"entry_seeds": true (each trained codec is then initialised from '
                          'its own seed, in the serial run too; docs/scale.md)')  # fmt: skip
    return trains


def _run_snr_ray(cfg: dict, out: Path, n, engine, start: float, write: bool) -> list[SNRRow]:
    """The units of a run on a Ray engine, in two rounds (the reference and the training,
    then the cells); the rows in the serial run's order."""
    from flowcodec.scale.ray_engine import UnitFailure

    jscc = cfg.get("jscc", [])
    d = cfg.get("digital")
    trains = ray_trained_entries(cfg)

    def name(k: int) -> str:
        return jscc[k]["label"] if k < len(jscc) else d.get("label", "separation")

    # round 1: the reference row, and every codec trained here
    args = [(cfg, n, "reference", 0)] + [(cfg, n, "train", k) for k in trains]
    labels = ["reference"] + [f"train {name(k)}" for k in trains]
    res, failures = map_units(snr_unit, args, labels, engine=engine,
                              order=list(range(len(args)))[::-1],
                              desc="snr: reference and training (ray)")  # fmt: skip
    ref_rows = res[0] or []
    trained = {k: engine.put(c) for k, c in zip(trains, res[1:]) if c is not None}
    # round 2: the cells, as (args, label), listed in the serial run's order
    cells, skipped = [], []
    for k, e in enumerate(jscc):
        how, src = jscc_source(cfg, k)
        extra = ()
        if how == "train":
            if src not in trained:
                skipped.append(f"{e['label']} (its codec, entry {name(src)!r}, was not trained)")
                continue
            extra = (trained[src],)
        for j, (c, s, u) in enumerate(jscc_jobs(cfg, e)):
            cells.append(((cfg, n, "jscc", (k, j)) + extra,
                          f"{e['label']}: {c}, {s:g} dB" + ("" if u is None else f", {u} uses")))
    if d is not None:
        extra = ()
        if "train" in d:
            if len(jscc) in trained:
                extra = (trained[len(jscc)],)
            else:
                skipped.append(f"{name(len(jscc))} (its codec was not trained)")
        if "codec" in d or extra:
            cells.append(((cfg, n, "digital-base", 0) + extra,
                          f"{name(len(jscc))}: no channel"))
            for j, (c, s) in enumerate(digital_jobs(cfg)):
                cells.append(((cfg, n, "digital", j) + extra,
                              f"{name(len(jscc))}: {c}, {s:g} dB"))
    # the digital cells (a link per rate point and MCS) are the longest: submit them first
    order = sorted(range(len(cells)), key=lambda i: (cells[i][0][2] != "digital", i))
    res2, fail2 = map_units(snr_unit, [c[0] for c in cells], [c[1] for c in cells],
                            engine=engine, order=order, desc="snr: cells (ray)")  # fmt: skip
    n1 = len(args)
    failures += [UnitFailure(f.index + n1, f.label, f.error, f.traceback) for f in fail2]
    failures += [UnitFailure(-1, s, "not run: no codec") for s in skipped]
    rows = list(ref_rows)
    for r in res2:  # the cells were listed in the serial run's order
        rows += r or []
    raise_failures(failures, rows, out, (lambda rs: _write(rs, cfg, out, start)) if write
                   else None)  # fmt: skip
    if write:
        _write(rows, cfg, out, start)
        plot(rows, cfg, out)
    return rows


def _write(rows, cfg, out: Path, start: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "snr.csv", rows, fields=list(SNRRow.__dataclass_fields__), digits=4)
    write_json(out / "snr.json", {"config": cfg, "seconds": round(time.perf_counter() - start, 1),
                                  "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                  "rows": [asdict(r) for r in rows]})  # fmt: skip
    picks = choose(rows)
    if picks:
        write_csv(out / "choice.csv", picks)


class SNRSweep(Sweep):
    """``flowcodec snr``."""

    name = "snr"
    outputs = "snr.csv"
    help = "accuracy against SNR and channel uses: JSCC codecs against separation"
    description = ("Measure JSCC codecs (features straight to channel symbols) across SNRs "
                   "and channels, against the best digital chain (learned codec + CRC + 5G "
                   "LDPC + the best MCS) at the same number of complex channel uses per "
                   "image, on the fast and the exact link. The config is checked whole before "
                   "any work starts. Writes snr.csv, snr.json, snr.png and uses.png.")
    samples_help = "test images, >= 1 (default: the config's samples, else all)"

    def validate(self, cfg, where):
        return validate_config(cfg, where)

    def check_engine(self, cfg, args) -> None:
        ray_trained_entries(cfg)  # refuse before starting Ray

    def execute(self, cfg, args, engine) -> list[SNRRow]:
        return run_snr(cfg, args.out, n=args.samples, progress=not args.no_progress,
                       engine=engine)  # fmt: skip

    def report(self, cfg: dict, rows: list[SNRRow], args) -> None:
        ref = rows[0]
        print(f"reference: {ref.label} {100 * ref.accuracy:.2f}% on {ref.n} test images")
        for r in rows[1:]:
            if r.channel == "none":
                continue
            told = f" told {r.told_snr_db:g} dB" if r.told_snr_db is not None else ""
            print(f"{r.scheme:10s} {r.label:24s} {r.channel:14s} {r.link:7s} {r.snr_db:6.1f} dB"
                  f"{told} budget {str(r.budget):>5s} uses {r.uses:7.1f}  "
                  f"{100 * r.accuracy:6.2f}%  {r.detail}")  # fmt: skip
        picks = choose(rows)
        if picks:
            print("\nanalog or digital at equal channel uses (choice.csv):")
        for p in picks:
            print(f"  {p['channel']:10s} {p['snr_db']:6.1f} dB <= {p['budget']:4d} uses: "
                  f"jscc {100 * p['jscc_accuracy']:6.2f}% ({p['jscc_uses']:.0f} uses) vs "
                  f"separation {100 * p['separation_accuracy']:6.2f}% -> {p['winner']}")
        print(f"wrote {Path(args.out) / 'snr.csv'}, snr.json, choice.csv, snr.png, uses.png")


SWEEP = SNRSweep()


def add_parser(subparsers) -> None:
    """Add the ``snr`` subcommand to the ``flowcodec`` command's subparsers."""
    SWEEP.add_parser(subparsers)
