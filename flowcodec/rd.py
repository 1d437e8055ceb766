"""``flowcodec rd``: accuracy vs. bytes per image for every codec in a config.

The config (JSON, see ``experiments/rd_cifar10.json`` and ``experiments/rd_digits.json``)
names a family, a member (the receiver's), a split point and a list of codec entries.
Each entry is a baseline (built, fitted on training features, swept over parameters), a
shipped trained codec (``"pretrained"``), or a learned codec trained here over a
``lam`` sweep (``"train"``). Every result row holds the accuracy of the member's tail on
the decoded features, the measured bytes per image (``8 * len(to_bytes())`` / 8, headers
included), the likelihood estimate where there is one, and the device's FLOPs (head plus
codec encoder) as a share of the whole member's. Optional ``"channels"`` entries re-run
codecs through an i.i.d. packet-erasure channel or flip payload bits (BSC).

Codecs whose decoder returns the receiver's answer instead of features (``answers =
True``: the device exit's top-1 / top-k, ``"exit-top1"``/``"exit-topk"``) are built with
the family's exit at their split point and scored on the argmax of what they decode (no
tail): their accuracy is the device member's. Any codec in the registry can be an entry,
and any shipped checkpoint a ``"pretrained"`` name, whatever its registry name.
``--baselines RUN/rd.json`` adds the clean rows of an earlier run on the same test set
(e.g. ``experiments/rd_baselines_cifar10.json``) to this run's comparison and plot.

The frozen parts run once per distinct input: the head's output for a test batch and the
tail's logits for a batch of decoded features are kept by content (a BLAKE2 digest of the
tensor), so rows whose decoders return identical tensors (a stripped image codec and its
whole-file twin, exit codecs at one split point) cost one forward pass; the family is in
eval mode, so this changes no number. ``rd.csv`` is rewritten after every row, so an
interrupted run leaves what it measured.

    flowcodec rd --config experiments/rd_cifar10.json --out runs/rd_cifar10

writes ``rd.csv``, ``rd.json``, ``targets.csv`` (:func:`compare`: each learned codec
against the input baselines and float32 at its accuracy) and ``rd.png`` (and
``channel.png`` with channel rows). Rates are given in both framings of
``docs/bitstream.md``: self-contained (``bytes_per_image``, header in every sample) and
session (``session_bytes``, header sent once per session).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flowcodec.config import validate_rd_config
from flowcodec.errors import ConfigError
from flowcodec.sweeps.codec_spec import INPUT_CODECS, codec_from_spec
from flowcodec.sweeps.runner import (
    Sweep,
    map_units,
    raise_failures,
    worker_context,
    write_csv,
    write_json,
)

__all__ = ["RDRow", "Comparison", "run_rd", "compare", "cheapest_at_least", "add_parser",
           "load_config", "load_rows", "SWEEP"]  # fmt: skip

FRAMINGS = {"bytes_per_image": "self-contained", "session_bytes": "session"}


@dataclass
class Comparison:
    """A learned codec against the input baselines and float32, in one framing.

    ``input_bytes`` is the cheapest input-compression row (JPEG/WebP, point 0) that is at
    least as accurate as the codec (``None`` when none is); ``input_ratio`` is the codec's
    bytes divided by it, ``float32_ratio`` its bytes divided by the raw float32 row's.
    ``webp_*``: the same against WebP rows only (the issue's target: the cheapest WebP at
    least as accurate). ``floor_*``: the device-answer floor at the codec's split point
    (the most accurate ``answers`` row, e.g. ``exit-top1``, at that point), its bytes, and
    whether the codec is more accurate than it (``None`` when there is no such row).
    """

    label: str
    framing: str
    accuracy: float
    gap_points: float
    bytes: float
    input_label: str | None
    input_bytes: float | None
    input_ratio: float | None
    float32_ratio: float | None
    webp_label: str | None = None
    webp_bytes: float | None = None
    webp_ratio: float | None = None
    floor_label: str | None = None
    floor_accuracy: float | None = None
    floor_bytes: float | None = None
    beats_floor: bool | None = None




def is_answer_codec(name: str) -> bool:
    """True for a registered codec whose decoder returns the receiver's answer (scores)."""
    from flowcodec.codecs import CODECS

    return bool(getattr(CODECS.get(name), "answers", False))


def cheapest_at_least(rows: list[RDRow], accuracy: float, key: str = "session_bytes",
                      codecs: tuple[str, ...] = INPUT_CODECS) -> RDRow | None:  # fmt: skip
    """The clean row of ``codecs`` with the fewest bytes (``key``: ``"session_bytes"`` or
    ``"bytes_per_image"``) among those at least ``accuracy`` accurate; ``None`` if none is.

    ``cheapest_at_least(rows, 0.89, codecs=("webp",))`` answers "what does WebP need for
    89%?" for a learned codec's point measured elsewhere.
    """
    if key not in FRAMINGS:
        raise ValueError(f"key must be one of {sorted(FRAMINGS)}, got {key!r}")
    ok = [r for r in rows if r.condition == "clean" and r.codec in codecs
          and r.accuracy >= accuracy]  # fmt: skip
    return min(ok, key=lambda r: getattr(r, key)) if ok else None


def compare(rows: list[RDRow]) -> list[Comparison]:
    """Set every clean learned row against the targets of the codecs issue (both framings).

    A row is learned when its codec is in the zoo's ``LEARNED_CODECS`` or it came from a
    ``"pretrained"`` or ``"train"`` entry (``source``).
    """
    from flowcodec.codecs.zoo import LEARNED_CODECS

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    raw = next((r for r in clean if r.codec == "raw" and "32" in r.label), None)
    answers = [r for r in clean if is_answer_codec(r.codec)]
    out = []
    for r in clean:
        if r.codec not in LEARNED_CODECS and r.source not in ("pretrained", "trained"):
            continue
        floors = [a for a in answers if a.point == r.point]
        floor = max(floors, key=lambda a: (a.accuracy, -a.session_bytes)) if floors else None
        for key, framing in FRAMINGS.items():
            b = getattr(r, key)
            best = cheapest_at_least(clean, r.accuracy, key)
            ib = getattr(best, key) if best else None
            wp = cheapest_at_least(clean, r.accuracy, key, codecs=("webp",))
            wb = getattr(wp, key) if wp else None
            out.append(Comparison(
                r.label, framing, r.accuracy,
                round(100 * (ref.accuracy - r.accuracy), 2) if ref else math.nan, b,
                best.label if best else None, ib, b / ib if ib else None,
                b / getattr(raw, key) if raw else None,
                wp.label if wp else None, wb, b / wb if wb else None,
                floor.label if floor else None, floor.accuracy if floor else None,
                getattr(floor, key) if floor else None,
                (r.accuracy > floor.accuracy) if floor else None))  # fmt: skip
    return out


@dataclass
class RDRow:
    """One measured point: a codec configuration under one condition."""

    label: str
    group: str
    codec: str
    point: int
    condition: str
    accuracy: float
    bytes_per_image: float
    session_bytes: float
    payload_bytes: float
    est_bytes: float | None
    coder_overhead_pct: float | None
    device_mflops: float
    device_flops_pct: float
    n: int
    seconds: float
    source: str = "baseline"  # "reference", "baseline", "pretrained" or "trained"


def load_rows(path: str | Path) -> list[RDRow]:
    """The rows of an earlier run's ``rd.json``."""
    from flowcodec.errors import ConfigError

    p = Path(path)
    try:
        rows = json.loads(p.read_text())["rows"]
        return [RDRow(**r) for r in rows]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{p} is not the rd.json of a flowcodec rd run: {e}") from e


def load_config(path: str | Path) -> dict:
    """Read and check an rd config (JSON): a path, or a name such as ``digits``."""
    return SWEEP.load(path)


def _expand(entry: dict) -> list[tuple[str, dict]]:
    """(label, kwargs) for every point of an entry's ``sweep``."""
    sweep = entry.get("sweep", {})
    keys = list(sweep)
    out = []
    for values in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        kw = {**entry.get("kwargs", {}), **dict(zip(keys, values))}
        out.append((entry.get("label", entry.get("codec", "codec")).format(**kw), kw))
    return out


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
    ctx = _RDContext(cfg, n, progress, family)
    extra = _check_baselines(baselines, cfg, len(ctx.test)) if baselines else []
    jobs = _build_jobs(cfg, ctx, progress, device)
    if engine is not None:
        rows, histories = _run_rd_ray(cfg, jobs, out, n, device, engine)
    else:
        rows: list[RDRow] = [_reference_row(ctx)]
        histories, built = {}, {}
        memo = _memos()

        def measured(i: int, res: tuple) -> None:
            row, codec, hist = res
            built[row.label] = (codec, jobs[i][2], row)
            if hist is not None:
                histories[row.label] = hist
            rows.append(row)
            write_csv(out / "rd.csv", rows, digits=4)

        map_units(lambda job: _measure(ctx, job, memo), [(job,) for job in jobs],
                  [job[1] for job in jobs], on_result=measured, desc="rd",
                  progress=progress)  # fmt: skip
        chan = []
        for label, (codec, p, row) in built.items():
            chan += _channel_rows(cfg, ctx, label, codec, p, row.group, row.source)
        rows += [r for _, r in sorted(chan, key=lambda c: c[0])]
    have = {r.label for r in rows}
    rows += [r for r in extra if r.label not in have]
    write_outputs(rows, out, cfg, histories)
    return rows


class _RDContext:
    """What every unit of an rd run shares: the family, the data, the split heads and the
    baselines' fitting features (built lazily per split point)."""

    def __init__(self, cfg: dict, n: int | None, progress: bool, family=None) -> None:
        from flowcodec.data import load_dataset
        from flowcodec.family import load_pretrained

        self.seed = int(cfg.get("seed", 0))
        self.fam = family if family is not None else load_pretrained(cfg["family"],
                                                                     progress=progress)
        self.train, test = load_dataset(cfg["dataset"])
        n = n or cfg.get("test_subset")
        if n and n < len(test):
            test = test.subset(int(n), seed=self.seed)
        self.test = test
        self.member, self.point = int(cfg["member"]), int(cfg["point"])
        self.member_flops = self.fam.info()[self.member - 1].flops
        self.fit_n = int(cfg.get("fit_samples", 2000))
        self.heads: dict = {}
        self.fits: dict = {}

    def split(self, p):
        from flowcodec.codecs.train import collect_features

        if p not in self.heads:
            self.heads[p] = self.fam.split(self.member, p)
            self.fits[p] = collect_features(self.heads[p][0], self.train, n=self.fit_n)
        return self.heads[p]

    def fit_features(self, p):
        """The baselines' fitting features at split point ``p`` (``fit_samples`` training
        images through the member's head)."""
        self.split(p)
        return self.fits[p]


def _build_jobs(cfg: dict, ctx: _RDContext, progress: bool, device: str) -> list[tuple]:
    """``(group, label, point, builder, source)`` for every codec entry and sweep point, in
    the config's order; ``builder()`` returns a ready codec (:func:`codec_from_spec`)."""
    jobs = []
    for entry in cfg["codecs"]:
        group = entry.get("group", entry.get("codec", "pretrained"))
        p = int(entry.get("point", ctx.point))
        specs = []  # (label, codec spec, source)
        if "pretrained" in entry and "rate_points" in entry:
            # a variable-rate codec: one row per rate point, all from one checkpoint
            # "views": V codes V views of each input with it (task codecs; no new weights)
            views = int(entry.get("views", 1))
            suffix, more = (f"-v{views}", {"views": views}) if views != 1 else ("", {})
            specs += [(f"{name}{suffix}@r{r}", {"pretrained": name, **more, "rate_point": r},
                       "pretrained") for name in entry["pretrained"]
                      for r in entry["rate_points"]]  # fmt: skip
        elif "pretrained" in entry:
            specs += [(name, {"pretrained": name}, "pretrained") for name in entry["pretrained"]]
        elif "train" in entry:
            t = entry["train"]
            settings = {"beta": t.get("beta", 1.0), "epochs": t.get("epochs", 10),
                        "drop_prob": t.get("drop_prob", 0.0),
                        "flip_prob": t.get("flip_prob", 0.0),
                        "batch_size": t.get("batch_size", 64), "lr": t.get("lr", 2e-3),
                        "seed": ctx.seed}  # fmt: skip
            for lam in t["lam"]:
                label = entry.get("label", entry["codec"] + "-l{lam}").format(lam=lam)
                specs.append((label, {"codec": entry["codec"], "kwargs": entry.get("kwargs", {}),
                                      "train": {"lam": lam, **settings}}, "trained"))
        else:
            specs += [(label, {"codec": entry["codec"], "kwargs": kw,
                               "fit": entry.get("fit", True)}, "baseline")
                      for label, kw in _expand(entry)]  # fmt: skip
        for label, spec, source in specs:
            build = functools.partial(codec_from_spec, spec, ctx.fam, p, train_data=ctx.train,
                                      fit_features=ctx.fit_features, member=ctx.member,
                                      progress=progress, device=device,
                                      what=f"codec entry {label!r}")  # fmt: skip
            jobs.append((group, label, p, build, source))
    return jobs


def _reference_row(ctx: _RDContext) -> RDRow:
    """The uncompressed member at the config's split point."""
    fam, point = ctx.fam, ctx.point
    head, tail = ctx.split(point)
    ref_t = time.perf_counter()
    ref_acc = _reference_accuracy(head, tail, ctx.test)
    return RDRow("uncompressed", "reference", "none", point, "clean", ref_acc, 0.0, 0.0,
                 0.0, None, None, fam.head_flops(point) / 1e6,
                 100 * fam.head_flops(point) / ctx.member_flops, len(ctx.test),
                 round(time.perf_counter() - ref_t, 1), "reference")  # fmt: skip


def _measure(ctx: _RDContext, job: tuple, memo=None) -> tuple:
    """Build (train, fit) one job's codec and measure its clean row: ``(row, codec,
    train history or None)``. ``memo(module, role)`` may wrap the frozen head and tail."""
    import torch

    from flowcodec.codecs.train import evaluate_codec

    group, label, p, build, source = job
    head, tail = ctx.split(p)
    t0 = time.perf_counter()
    torch.manual_seed(ctx.seed)
    codec = build().eval()
    recv = _receiver(codec, tail)
    if memo is not None:
        head, recv = memo(head, "head"), memo(recv, "tail")
    ev = evaluate_codec(codec, head, recv, ctx.test)
    row = _row(label, group, codec, p, "clean", ev, ctx.fam, ctx.member_flops, t0, source)
    return row, codec, getattr(codec, "train_history", None)


def _channel_rows(cfg: dict, ctx: _RDContext, label: str, codec, p: int, group: str,
                  source: str) -> list[tuple[tuple[int, int], RDRow]]:  # fmt: skip
    """The rows of ``label`` under each of the config's ``channels`` that list it, with
    their place in the serial order: ``((channel index, position in its list), row)``."""
    import torch

    from flowcodec.codecs.train import evaluate_codec

    out = []
    for ci, ch in enumerate(cfg.get("channels", [])):
        if label not in ch["codecs"]:
            continue
        pos = ch["codecs"].index(label)
        gen_seed = int(ch.get("seed", ctx.seed))
        head, tail = ctx.split(p)
        tail = _receiver(codec, tail)
        t0 = time.perf_counter()
        if "loss_rate" in ch:
            cond = f"iid loss {ch['loss_rate']:g}"
            channel = _erasure(ch["loss_rate"], gen_seed)
            ev = evaluate_codec(codec, head, tail, ctx.test, channel=channel)
        else:
            from flowcodec.codecs.learned import flip_bits

            g = torch.Generator().manual_seed(gen_seed)
            prob = float(ch["flip_prob"])
            cond = f"bsc {prob:g}"
            ev = evaluate_codec(codec, head, tail, ctx.test,
                                transform=lambda s, g=g, prob=prob: flip_bits(s, prob, g))
        out.append(((ci, pos), _row(label, group, codec, p, cond, ev, ctx.fam,
                                    ctx.member_flops, t0, source)))  # fmt: skip
    return out


def _memos():
    """``memo(module, role)``: a :class:`_Memo` per role (head, tail), for the latest
    module in that role (a split point's head features are kept while it is in use)."""
    memos: dict[str, _Memo] = {}

    def memo(module, role):
        if role not in memos or memos[role].module is not module:
            memos[role] = _Memo(module)
        return memos[role]

    return memo


def _worker_context(cfg: dict, n: int | None) -> tuple:
    """This worker process's context for a run and its memo of the frozen modules (as the
    serial run keeps one), built once per run."""
    return worker_context("rd", [cfg, n], lambda: (_RDContext(cfg, n, progress=False),
                                                   _memos()))  # fmt: skip


def rd_warm(cfg: dict, n: int | None, device: str = "cpu") -> int:
    """A Ray worker's warm-up before its first unit: import, load the family and data, and
    split the family (with the baselines' fitting features) at every point the config
    uses. Returns the number of split points prepared."""
    ctx, _ = _worker_context(cfg, n)
    points = {ctx.point} | {job[2] for job in _build_jobs(cfg, ctx, False, device)}
    for p in sorted(points):
        ctx.split(p)
    return len(points)


def rd_unit(cfg: dict, n: int | None, index: int, device: str = "cpu") -> dict:
    """One unit of an rd run, as a Ray task runs it: ``index`` -1 is the reference row,
    ``index`` i >= 0 the i-th job (codec entry or sweep point) with its channel rows.
    The family and data are loaded by name once per worker process."""
    ctx, memo = _worker_context(cfg, n)
    if index < 0:
        return {"row": _reference_row(ctx), "history": None, "channels": []}
    jobs = _build_jobs(cfg, ctx, False, device)
    job = jobs[index]
    row, codec, hist = _measure(ctx, job, memo)
    chan = _channel_rows(cfg, ctx, job[1], codec, job[2], row.group, row.source)
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


def _check_baselines(path: str | Path, cfg: dict, n: int | None = None) -> list[RDRow]:
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


class _Memo:
    """Calls ``module`` once per distinct input tensor (by shape, dtype and a BLAKE2
    digest of its bytes) and returns the kept output after that. For frozen modules in
    eval mode; ``eval()`` is passed on."""

    def __init__(self, module) -> None:
        self.module = module
        self.cache: dict = {}

    def eval(self):
        self.module.eval()
        return self

    def __call__(self, x):
        import hashlib

        import numpy as np

        arr = np.ascontiguousarray(x.detach().cpu().numpy())
        key = (tuple(x.shape), str(x.dtype), hashlib.blake2b(arr.data, digest_size=16).digest())
        if key not in self.cache:
            self.cache[key] = self.module(x)
        return self.cache[key]


def _receiver(codec, tail):
    """What the receiver runs on the decoded output: the tail, or nothing for a codec that
    decodes the answer itself (``answers``)."""
    import torch

    return torch.nn.Identity() if getattr(codec, "answers", False) else tail


def _erasure(loss_rate: float, seed: int):
    """Packet erasure: channels.discrete.IIDPacketErasure (one generator for the whole run)."""
    import torch

    from channels.discrete import IIDPacketErasure

    ch = IIDPacketErasure(loss_rate, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return lambda packets: ch.transmit(packets, generator=g)[0]


def _reference_accuracy(head, tail, data) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for x, y in data.batches(250):
            correct += int((tail(head(x)).argmax(1) == y).sum())
    return correct / len(data)


def _row(label, group, codec, p, cond, ev, fam, member_flops, t0,
         source="baseline") -> RDRow:  # fmt: skip
    # a multi-view codec runs the device's head once per view (and its encoder too)
    dev = getattr(codec, "views", 1) * fam.head_flops(p) + codec.encoder_flops()
    over = None
    if ev.est_bytes_per_image:
        over = round(100 * (ev.payload_bytes_per_image / ev.est_bytes_per_image - 1), 3)
    return RDRow(label, group, codec.name, p, cond, ev.accuracy, ev.bytes_per_image,
                 ev.session_bytes_per_image, ev.payload_bytes_per_image,
                 ev.est_bytes_per_image, over, dev / 1e6,
                 100 * dev / member_flops, ev.n, round(time.perf_counter() - t0, 1),
                 source)  # fmt: skip


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


def plot_rd(rows: list[RDRow], path: Path, title: str = "") -> None:
    """Accuracy vs. bytes per image (log x), one line per codec group.

    Rows of codecs that send the device's answer (``exit-top1``/``exit-topk``) are drawn
    as stars with a dotted horizontal line at their accuracy (the floor a codec at that
    split point has to beat); rows merged from ``--baselines`` are drawn like the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    groups: dict[str, list[RDRow]] = {}
    for r in clean:
        if r.group != "reference":
            groups.setdefault(r.group, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    lo = min((100 * r.accuracy for r in clean), default=0)
    for ax, (key, framing) in zip(axes, FRAMINGS.items()):
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: getattr(r, key))
            dev = f"device {max(r.device_flops_pct for r in rs):.0f}% FLOPs"
            if all(is_answer_codec(r.codec) for r in rs):
                (line,) = ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs],
                                  "*", ms=10, label=f"{g} ({dev})")  # fmt: skip
                for acc in sorted({r.accuracy for r in rs}):
                    ax.axhline(100 * acc, color=line.get_color(), ls=":", lw=1)
                continue
            ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs], "o-",
                    label=f"{g} ({dev})", ms=4)  # fmt: skip
        if ref is not None:
            ax.axhline(100 * ref.accuracy, color="k", ls="--", lw=1,
                       label=f"uncompressed member ({100 * ref.accuracy:.2f}%)")
            ax.axhline(100 * ref.accuracy - 1, color="gray", ls=":", lw=1,
                       label="1 point below")  # fmt: skip
        ax.set_xscale("log")
        what = "header in every sample" if key == "bytes_per_image" else "header once per session"
        ax.set_xlabel(f"bytes per image (measured, {framing} framing: {what})")
        ax.set_ylim(max(0, lo - 2), 100)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_channel(rows: list[RDRow], path: Path) -> None:
    """Accuracy per codec under each channel condition (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r.label for r in rows if r.condition != "clean"})
    conds = ["clean"] + sorted({r.condition for r in rows if r.condition != "clean"})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(conds))
    for j, c in enumerate(conds):
        vals = []
        for lab in labels:
            r = next((r for r in rows if r.label == lab and r.condition == c), None)
            vals.append(100 * r.accuracy if r else math.nan)
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=c)
    ax.set_xticks([i + width * (len(conds) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
