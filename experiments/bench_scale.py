"""Serial against Ray on this machine: the digits rd sweep side by side, and Ray's costs.

    flock /work/helpers/cpu.lock .venv/bin/python -m experiments.bench_scale --out runs/scale
    flock /work/helpers/cpu.lock .venv/bin/python -m experiments.bench_scale --command snr \
        --config digits --skip-costs --out runs/scale_snr

1. ``flowcodec rd --config digits`` serially (``--threads 2``, the default, which is the
   baseline; and ``--threads 1``, the thread count of a Ray unit) and the same command with
   ``--engine ray --workers 2``, each as a fresh process, wall time of the whole command
   (start-up, family and data loading, Ray's start and stop included); the rows of each
   serial ``rd.json`` compared with Ray's field by field (all but ``seconds``, the time a
   row took). ``--command snr`` does the same for ``flowcodec snr`` (its ``snr.json``
   rows have no timing field).
2. Ray's own costs (not with ``--skip-costs``): seconds to start a local instance (and
   to stop it), and milliseconds per task for empty units (``--tasks`` of them through
   :meth:`RayEngine.map` on 2 workers: the throughput cost; and one at a time: the round
   trip).

Writes ``OUT/bench_scale.json`` and prints a Markdown table (docs/scale.md). Measure with
the cores free (through the CPU lock): the figures mean nothing on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def _noop(i):
    return i


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall, p.stderr


def _rows(path: Path) -> list[dict]:
    """The rows of an ``rd.json`` or ``snr.json``, every field as JSON text (so NaN equals
    NaN) but ``seconds``, the time a row took."""
    rows = json.loads(path.read_text())["rows"]
    return [{k: json.dumps(v) for k, v in r.items() if k != "seconds"} for r in rows]


def _where(row: dict) -> str:
    """A row's sweep point, for the list of differences."""
    keys = ("label", "condition") if "condition" in row else ("label", "channel", "snr_db",
                                                              "budget", "link")  # fmt: skip
    return " ".join(json.loads(row[k]) if k == "label" else row[k] for k in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--command", choices=["rd", "snr"], default="rd",
                    help="the sweep command to time (default rd)")
    ap.add_argument("--config", default="digits", help="its config (default digits)")
    ap.add_argument("--skip-costs", action="store_true",
                    help="do not measure Ray's start-up and per-task costs")
    ap.add_argument("--n", type=int, default=None, help="test images (default: the config's)")
    ap.add_argument("--tasks", type=int, default=200, help="empty tasks for the overhead")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each rd command")
    ap.add_argument("--serial-threads", type=int, nargs="+", default=[2, 1],
                    help="--threads of the serial runs; the first is the baseline (2, the "
                         "command's default); a Ray unit runs with one thread")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "flowcodec.cli", args.command, "--config", args.config,
           "--no-progress"] + (["--n", str(args.n)] if args.n else [])  # fmt: skip
    res: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "load_before": os.getloadavg()[0], "ray_s": [],
                 "ray_startup_in_command_s": [], "serial": {}, "command": args.command,
                 "config": args.config}  # fmt: skip
    for _ in range(args.repeats):
        for t in args.serial_threads:
            wall, _ = _run(exe + ["--out", str(out / f"serial_t{t}"), "--threads", str(t)])
            res["serial"].setdefault(str(t), {"s": []})["s"].append(round(wall, 2))
        wall, err = _run(exe + ["--out", str(out / "ray"), "--engine", "ray", "--workers", "2"])
        res["ray_s"].append(round(wall, 2))
        m = re.search(r"ray: start-up ([\d.]+) s", err)
        res["ray_startup_in_command_s"].append(float(m.group(1)) if m else None)
        res.setdefault("ray_summary", []).extend(
            line for line in err.splitlines() if line.startswith("ray: "))  # fmt: skip
    b = _rows(out / "ray" / f"{args.command}.json")
    for t in args.serial_threads:
        a = _rows(out / f"serial_t{t}" / f"{args.command}.json")
        diff = [(_where(x), k, x[k], y[k]) for x, y in zip(a, b) for k in x
                if x[k] != y[k]]  # fmt: skip
        res["serial"][str(t)].update(
            rows=len(a), identical_rows=len(a) == len(b) and not diff,
            rows_differing=len({d[0] for d in diff}), row_differences=diff[:20],
            ratio=round(min(res["ray_s"]) / min(res["serial"][str(t)]["s"]), 3))  # fmt: skip
    base = res["serial"][str(args.serial_threads[0])]
    res.update(serial_s=base["s"], rows=base["rows"], identical_rows=base["identical_rows"],
               ratio=base["ratio"])  # fmt: skip

    if args.skip_costs:
        res["load_after"] = os.getloadavg()[0]
        (out / "bench_scale.json").write_text(json.dumps(res, indent=1))
        for line in res.get("ray_summary", []):
            print(line)
        _print_serial(res)
        return 0
    # Ray's own costs, in this process.
    from flowcodec.scale.ray_engine import RayEngine

    eng = RayEngine(workers=2, progress=False)
    eng.start()
    res["startup_s"] = round(eng.stats.startup_s, 2)
    eng.map(_noop, [(i,) for i in range(4)])  # workers up and warm
    t0 = time.perf_counter()
    eng.map(_noop, [(i,) for i in range(args.tasks)])
    res["ms_per_task_batch"] = round(1e3 * (time.perf_counter() - t0) / args.tasks, 2)
    t0 = time.perf_counter()
    for i in range(20):
        eng.map(_noop, [(i,)])
    res["ms_per_task_round_trip"] = round(1e3 * (time.perf_counter() - t0) / 20, 2)
    t0 = time.perf_counter()
    eng.close()
    res["shutdown_s"] = round(time.perf_counter() - t0, 2)
    res["load_after"] = os.getloadavg()[0]
    (out / "bench_scale.json").write_text(json.dumps(res, indent=1))
    print(f"| what | serial | Ray, 2 local workers |\n|---|---|---|\n"
          f"| `flowcodec {args.command} --config {args.config}` wall time (s) | "
          f"{min(res['serial_s']):.1f} | {min(res['ray_s']):.1f} "
          f"({res['ratio']:.2f}x of serial) |\n"
          f"| rows ({res['rows']}) identical to serial --threads "
          f"{args.serial_threads[0]} | - | {res['identical_rows']} |\n"
          f"| Ray start-up of a local instance (s) | - | {res['startup_s']:.2f} "
          f"(in the command: {res['ray_startup_in_command_s']}) |\n"
          f"| Ray stop (s) | - | {res['shutdown_s']:.2f} |\n"
          f"| per task, {args.tasks} empty tasks on 2 workers (ms) | - | "
          f"{res['ms_per_task_batch']:.2f} |\n"
          f"| per task, one at a time (round trip, ms) | - | "
          f"{res['ms_per_task_round_trip']:.2f} |")  # fmt: skip
    for line in res.get("ray_summary", []):
        print(line)
    _print_serial(res)
    return 0


def _print_serial(res: dict) -> None:
    print(f"Ray --workers 2: {min(res['ray_s']):.1f} s")
    for t, r in res["serial"].items():
        print(f"serial --threads {t}: {min(r['s']):.1f} s; Ray / serial = {r['ratio']:.2f}; "
              f"identical rows: {r['identical_rows']} ({r['rows_differing']} of {r['rows']} "
              f"differ){'; e.g. ' + str(r['row_differences'][:3]) if r['row_differences'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
