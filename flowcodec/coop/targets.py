"""Issue 28's targets, checked against a cooperative benchmark's rows.

:func:`check` reads the rows :mod:`flowcodec.coop.bench` writes (``coop.csv``, or the rows
of ``coop.json``) and states each target of the cooperative benchmark, as measured and
whether it is met:

- ``emergence-member3``: ``coop-all`` at least 3 points above the best single view through
  the (fine-tuned) largest member, ``member3-view[best]``;
- ``emergence-average``: ``coop-all`` at least 3 points above ``average-own``;
- ``bytes``: ``coop-all`` at most 16 B per device (session framing);
- ``centralised-gap``: ``coop-all`` within 2 points of ``centralised``;
- ``single-view-difficulty``: ``centralised`` minus ``member3-view[best]`` between 5 and 20
  points (a property of the view protocol, not of the fusion);
- ``drop-one``: losing any one device (``coop-drop[k]``) costs at most 1 point;
- ``loss``: ``coop-loss`` (i.i.d. device loss) above ``device-own[best]``;
- ``selective``: some ``selective-*`` row sends at least 40 % fewer bytes per scene than
  ``coop-all`` and loses at most 0.3 point against it (the row kept is the one saving most;
  with none, the closest rows on either side are named);
- ``device-cost``: ``coop-all``'s MFLOPs per device at most member 2's (taken from the
  ``device-own`` rows of kind ``m2`` unless given).

Differences of accuracies carry a standard error (binomial, the two rows taken as
independent: an over-estimate whenever the two methods tend to be right on the same test
images, as they are here).

``python -m flowcodec.coop.targets RUN/coop.csv [...]`` (or ``flowcodec coop-targets``)
prints each run's targets;
``--markdown`` prints one table of every run's key figures (what docs/cooperative.md shows).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowcodec.errors import ConfigError

__all__ = ["Target", "check", "read_rows", "summary_row", "markdown_table", "print_targets",
           "add_arguments", "run", "main", "GOALS"]

# (points above the member on its best view, points above the average, bytes per device,
#  points under the centralised bound, single-view difficulty band, points lost with one
#  device missing, share of bytes saved, points lost by selective transmission)
GOALS = {"emergence": 3.0, "bytes": 16.0, "centralised_gap": 2.0, "difficulty": (5.0, 20.0),
         "drop_one": 1.0, "selective_saving": 0.40, "selective_loss": 0.3}


@dataclass(frozen=True)
class Target:
    """One target: its ``name``, the ``goal`` in words, the ``measured`` figure in words,
    its ``value`` (points, bytes, MFLOPs or a share), whether it is ``met`` (``None``: the
    rows cannot tell) and ``brief``, a shorter ``measured`` for tables (empty: the same)."""

    name: str
    goal: str
    measured: str
    value: float | None
    met: bool | None
    brief: str = ""


def _num(v):
    """A CSV cell: empty is None, a number a float, anything else the text."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def read_rows(path) -> list[dict]:
    """The rows of a benchmark's ``coop.csv`` or ``coop.json`` (numbers parsed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such benchmark file (coop.csv or coop.json)")
    if path.suffix == ".json":
        rows = json.loads(path.read_text()).get("rows")
        if not isinstance(rows, list):
            raise ConfigError(f"{path}: no 'rows' list (not a coop benchmark record)")
    else:
        with open(path, newline="") as f:
            rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows or "method" not in rows[0]:
        raise ConfigError(f"{path}: no benchmark rows with a 'method' column")
    return rows


def _one(rows, method) -> dict:
    found = [r for r in rows if r.get("method") == method]
    if not found:
        raise ConfigError(f"the benchmark rows have no {method!r} row (run flowcodec coop "
                          "with its defaults: it writes every row the targets need)")
    return found[0]


def _se(a: float, b: float, n: float) -> float:
    """Standard error, in points, of the difference of two accuracies over ``n`` images."""
    return 100 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def check(rows: Sequence[dict], member2_mflops: float | None = None) -> list[Target]:
    """Every target of the cooperative benchmark against ``rows`` (see the module doc)."""
    rows = list(rows)
    allr = _one(rows, "coop-all")
    acc, n = float(allr["accuracy"]), float(allr.get("n") or 0)
    m3 = _one(rows, "member3-view[best]")
    avg = _one(rows, "average-own")
    cen = _one(rows, "centralised")
    own = _one(rows, "device-own[best]")
    out = []

    def pts(x):
        return round(100 * x, 2)

    for name, base, label in (("emergence-member3", m3, "the best view through member 3"),
                              ("emergence-average", avg, "the average of own answers")):
        d = acc - float(base["accuracy"])
        out.append(Target(name, f">= +{GOALS['emergence']:g} points over {label}",
                          f"{pts(acc)} % against {pts(float(base['accuracy']))} %: "
                          f"{pts(d):+.2f} (se {_se(acc, float(base['accuracy']), n):.2f})",
                          pts(d), 100 * d >= GOALS["emergence"] - 1e-9))
    b = float(allr["bytes_per_device"])
    out.append(Target("bytes", f"<= {GOALS['bytes']:g} B per device (session framing)",
                      f"{b:.2f} B per device", b, b <= GOALS["bytes"]))
    gap = float(cen["accuracy"]) - acc
    out.append(Target("centralised-gap", f"within {GOALS['centralised_gap']:g} points of "
                      "the whole image through member 3",
                      f"{pts(gap):.2f} points under {pts(float(cen['accuracy']))} %", pts(gap),
                      100 * gap <= GOALS["centralised_gap"] + 1e-9))
    diff = float(cen["accuracy"]) - float(m3["accuracy"])
    lo, hi = GOALS["difficulty"]
    out.append(Target("single-view-difficulty", f"{lo:g} to {hi:g} points (the protocol)",
                      f"{pts(diff):.2f} points", pts(diff), lo <= 100 * diff <= hi))
    drops = [r for r in rows if str(r.get("method", "")).startswith("coop-drop[")]
    goal = f"any one device missing costs <= {GOALS['drop_one']:g} point"
    if drops:
        lost = [acc - float(r["accuracy"]) for r in drops]
        out.append(Target("drop-one", goal,
                          f"{pts(min(lost)):.2f} to {pts(max(lost)):.2f} points lost",
                          pts(max(lost)), 100 * max(lost) <= GOALS["drop_one"] + 1e-9))
    else:
        out.append(Target("drop-one", goal, "no coop-drop rows", None, None))
    loss = _one(rows, "coop-loss")
    out.append(Target("loss", "i.i.d. device loss stays above the best device alone",
                      f"{pts(float(loss['accuracy']))} % against "
                      f"{pts(float(own['accuracy']))} %",
                      pts(float(loss["accuracy"]) - float(own["accuracy"])),
                      float(loss["accuracy"]) > float(own["accuracy"])))
    out.append(_selective(rows, allr))
    dev = float(allr["device_mflops"])
    if member2_mflops is None:
        m2 = [float(r["device_mflops"]) for r in rows
              if str(r.get("method", "")).startswith("device-own[")
              and r.get("kind") == "m2" and r.get("device_mflops") is not None]
        member2_mflops = max(m2) if m2 else None
    out.append(Target("device-cost", "MFLOPs per device <= member 2's",
                      f"{dev:.3f} MFLOPs per device"
                      + (f" against {member2_mflops:.3f}" if member2_mflops else
                         " (member 2's cost unknown: pass it)"),
                      dev, None if member2_mflops is None else dev <= member2_mflops + 1e-6))
    return out


def _selective(rows, allr) -> Target:
    goal = (f">= {100 * GOALS['selective_saving']:g} % fewer bytes than all devices, "
            f"<= {GOALS['selective_loss']:g} point below")
    full, acc = float(allr["bytes_total"]), float(allr["accuracy"])
    sel = [r for r in rows if str(r.get("method", "")).startswith("selective")
           and r.get("bytes_total") is not None]
    if not sel or full <= 0:
        return Target("selective", goal, "no selective rows", None, None)

    def saving(r):
        return 1 - float(r["bytes_total"]) / full

    def lost(r):
        return 100 * (acc - float(r["accuracy"]))

    def brief(r):
        return (f"{r['method'].removeprefix('selective-')} at {r.get('threshold')}: "
                f"{100 * saving(r):.1f} % fewer, {-lost(r):+.2f} point")

    ok = [r for r in sel if saving(r) >= GOALS["selective_saving"]
          and lost(r) <= GOALS["selective_loss"] + 1e-9]
    if ok:
        best = max(ok, key=saving)
        return Target("selective", goal, "selective-" + brief(best),
                      round(100 * saving(best), 1), True, brief(best))
    near = [r for r in sel if lost(r) <= GOALS["selective_loss"] + 1e-9]
    far = [r for r in sel if saving(r) >= GOALS["selective_saving"]]
    named = ([("least lost at the saving", min(far, key=lost))] if far else []) + \
            ([("most saved within the loss", max(near, key=saving))] if near else [])
    best = max(near, key=saving) if near else None
    return Target("selective", goal,
                  "; ".join(f"{what}: selective-{brief(r)}" for what, r in named) or "no row",
                  None if best is None else round(100 * saving(best), 1), False,
                  f"not met ({brief(named[0][1])})" if named else "not met")


def summary_row(name: str, rows: Sequence[dict]) -> dict:
    """One run's key figures (points, bytes) and how many targets it meets."""
    t = {x.name: x for x in check(rows)}
    scored = [x for x in t.values() if x.name != "single-view-difficulty"]  # the protocol's
    allr = _one(rows, "coop-all")
    return {"run": name, "coop_all": round(100 * float(allr["accuracy"]), 2),
            "vs_member3": t["emergence-member3"].value,
            "vs_average": t["emergence-average"].value,
            "under_centralised": t["centralised-gap"].value,
            "worst_drop_one": t["drop-one"].value,
            "loss_over_best_own": t["loss"].value,
            "selective": t["selective"].brief or t["selective"].measured,
            "bytes_per_device": t["bytes"].value,
            "met": sum(1 for x in scored if x.met),
            "of": sum(1 for x in scored if x.met is not None)}


def markdown_table(summaries: Iterable[dict]) -> str:
    """A markdown table of :func:`summary_row` results."""
    head = ("| run | coop-all | vs member 3 (best view) | vs average of own | under centralised "
            "| worst drop-one | 30 % loss over best own | selective | B / device | targets met |")
    lines = [head, "|" + "---|" * 10]

    def f(v, fmt="{:+.2f}"):
        return "-" if v is None else fmt.format(v)

    for s in summaries:
        lines.append(f"| {s['run']} | {s['coop_all']:.2f} % | {f(s['vs_member3'])} | "
                     f"{f(s['vs_average'])} | {f(s['under_centralised'], '{:.2f}')} | "
                     f"{f(s['worst_drop_one'], '{:.2f}')} | {f(s['loss_over_best_own'])} | "
                     f"{s['selective']} | {f(s['bytes_per_device'], '{:.2f}')} | "
                     f"{s['met']} / {s['of']} |")
    return "\n".join(lines)


def print_targets(targets: Sequence[Target], title: str | None = None) -> None:
    """Print ``targets`` one per line (what ``flowcodec coop`` prints after its rows)."""
    if title:
        print(title)
    for t in targets:
        state = {True: "met", False: "NOT met", None: "unknown"}[t.met]
        print(f"  {t.name:<23} {state:<8} {t.measured}   (target: {t.goal})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to ``p`` (``flowcodec coop-targets`` reuses them)."""
    p.add_argument("files", nargs="+", help="benchmark files (flowcodec coop's coop.csv)")
    p.add_argument("--names", nargs="+", default=None, help="a name per file (markdown rows)")
    p.add_argument("--member2-mflops", type=float, default=None,
                   help="member 2's MFLOPs (default: the m2 device-own rows')")
    p.add_argument("--markdown", action="store_true",
                   help="one markdown table of every file's key figures")


def run(a: argparse.Namespace) -> int:
    """Run the command with parsed options ``a`` (what ``flowcodec.cli`` calls)."""
    if a.names is not None and len(a.names) != len(a.files):
        raise ConfigError(f"--names: {len(a.names)} names for {len(a.files)} files")
    names = a.names or [str(f) for f in a.files]
    runs = [(n, read_rows(f)) for n, f in zip(names, a.files, strict=True)]
    if a.markdown:
        print(markdown_table(summary_row(n, rows) for n, rows in runs))
    else:
        for n, rows in runs:
            print_targets(check(rows, a.member2_mflops), n)
    return 0


def main(argv=None) -> int:
    """``python -m flowcodec.coop.targets CSV [CSV ...] [--markdown] [--names ...]``."""
    p = argparse.ArgumentParser(prog="python -m flowcodec.coop.targets",
                                description="Check cooperative benchmark rows (coop.csv or "
                                            "coop.json) against issue 28's targets.")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
