"""Hints that work and output fit for logs (issue 31, items 5 and 6).

- Every ``--flag`` that a message of the library suggests exists in some parser of
  ``flowcodec.cli.build_parser()`` (flags of other tools, torchrun's or Ray's, are named
  with the tool).
- argparse abbreviations are off: a flag a command lacks is an error naming it.
- A progress bar written to a log redraws at the promised rate, also when its loop sets a
  postfix at every step.
- The Makefile points ``FLOWCODEC_DATA`` at ``../shared/data`` only when that folder exists.
- The demo's accuracy panel shows every series and its MCS labels do not overlap.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")

# Flags of other programs that messages may suggest, with the program the message names.
OTHER_TOOLS = {"--nproc-per-node": "torchrun", "--max-restarts": "torchrun", "--head": "ray"}


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def cli_flags() -> set[str]:
    from flowcodec.cli import build_parser
    from flowcodec.lm.cli import build_parser as lm_parser  # `flowcodec lm ...` forwards to it

    return {o for root in (build_parser(), lm_parser()) for p in all_parsers(root)
            for a in p._actions for o in a.option_strings if o.startswith("--")}  # fmt: skip


def message_strings(tree: ast.AST):
    """String constants (f-string parts included) that are not docstrings and not the flag
    names of ``add_argument`` calls: the library's messages, help texts and hints."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):  # fmt: skip
            skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            skip.update(id(a) for a in node.args)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def suggested_flags() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted([*(ROOT / "flowcodec").rglob("*.py"), *(ROOT / "channels").rglob("*.py")]):
        for node in message_strings(ast.parse(path.read_text())):
            for flag in FLAG.findall(node.value):
                found.append((str(path.relative_to(ROOT)), node.lineno, flag, node.value))
    return found


def test_messages_suggest_flags_that_exist():
    flags = cli_flags()
    found = suggested_flags()
    assert len(found) > 50, "the scan should see the library's help texts and messages"
    wrong = []
    for where, line, flag, text in found:
        if flag in flags:
            continue
        tool = OTHER_TOOLS.get(flag)
        if tool and tool in text.lower():
            continue
        wrong.append(f"{where}:{line}: {flag} in {text[:70]!r}")
    assert not wrong, "messages suggest flags no command has:\n" + "\n".join(wrong)


def test_the_cifar10_hint_names_ways_that_exist(tmp_path, monkeypatch):
    from flowcodec.data import find_cifar10
    from flowcodec.errors import DataNotFoundError

    monkeypatch.delenv("FLOWCODEC_DATA", raising=False)
    monkeypatch.setenv("FLOWCODEC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as e:
        find_cifar10(tmp_path / "nothing here")
    msg = str(e.value)
    assert "--download" not in msg
    assert "FLOWCODEC_DATA" in msg and "download=True" in msg
    assert set(FLAG.findall(msg)) <= cli_flags()


def test_every_parser_refuses_abbreviations():
    from flowcodec.cli import build_parser

    allowing = [p.prog for p in all_parsers(build_parser()) if p.allow_abbrev]
    assert not allowing, f"abbreviations are still allowed by {allowing}"


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--data", "X"], "--data"),  # once taken as --dataset, then "invalid choice"
    (["demo", "--no-progres"], "--no-progres"),
    (["info", "--fam", "digits"], "--fam"),
    (["device", "--sample", "5"], "--sample"),
])  # fmt: skip
def test_an_abbreviated_or_unknown_flag_is_an_error_naming_it(argv, flag, capsys):
    from flowcodec.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and flag in err
    assert "invalid choice" not in err


def test_full_flags_still_parse():
    from flowcodec.cli import build_parser

    args = build_parser().parse_args(["demo", "--dataset", "digits", "--no-progress"])
    assert args.dataset == "digits" and args.no_progress


# --- progress bars in logs ---------------------------------------------------------------------
def log_bar(monkeypatch, steps: int, **kwargs):
    from flowcodec import progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv("FLOWCODEC_PROGRESS_INTERVAL", raising=False)
    log = io.StringIO()
    return progress.tqdm(range(steps), file=log, **kwargs), log


def test_a_bar_in_a_log_redraws_at_the_promised_rate_with_a_postfix_each_step(monkeypatch):
    from flowcodec import progress

    bar, log = log_bar(monkeypatch, 300, desc="train")
    t0 = time.perf_counter()
    for i in bar:
        time.sleep(0.004)  # about a second and a half
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # what the training loops do
        bar.set_description(f"epoch {i // 100}")
        bar.set_postfix_str(f"step {i}")
    bar.close()
    seconds = time.perf_counter() - t0
    redraws = log.getvalue().count("\r")
    # the first draw, the last, and one per LOG_INTERVAL_S at most (tqdm once drew 900 here)
    assert redraws <= 2 + seconds / progress.LOG_INTERVAL_S + 1, log.getvalue()[-300:]
    assert "step 299" in log.getvalue().splitlines()[-1]  # the last postfix is shown at the end


def test_an_explicit_refresh_still_redraws(monkeypatch):
    bar, log = log_bar(monkeypatch, 3)
    before = log.getvalue().count("\r")
    bar.set_postfix(x=1, refresh=True)
    assert log.getvalue().count("\r") == before + 1
    bar.close()


def test_a_terminal_keeps_tqdms_own_bar(monkeypatch):
    from tqdm.auto import tqdm as plain

    from flowcodec import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.tqdm(range(2), file=io.StringIO())
    assert type(bar) is plain
    bar.close()


# --- the Makefile's FLOWCODEC_DATA -------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("exists", [True, False])
def test_the_makefile_sets_flowcodec_data_only_when_the_folder_exists(tmp_path, exists):
    checkout = tmp_path / "main"
    checkout.mkdir()
    shutil.copy(ROOT / "Makefile", checkout / "Makefile")
    if exists:
        (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "show.mk").write_text('show:\n\t@echo "[$$FLOWCODEC_DATA]"\n')
    env = {k: v for k, v in os.environ.items() if k != "FLOWCODEC_DATA"}
    out = subprocess.run(["make", "-s", "-f", "Makefile", "-f", str(tmp_path / "show.mk"),
                          "show"], cwd=checkout, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    want = f"[{(tmp_path / 'shared' / 'data').resolve()}]" if exists else "[]"
    assert out == want
    env["FLOWCODEC_DATA"] = "/elsewhere"  # a value the user set wins
    out = subprocess.run(["make", "-s", "-f", "Makefile", "-f", str(tmp_path / "show.mk"),
                          "show"], cwd=checkout, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    assert out == "[/elsewhere]"


# --- the demo's plot ---------------------------------------------------------------------------
def test_the_demo_accuracy_panel_is_readable(tmp_path, monkeypatch):
    import matplotlib.figure

    from flowcodec.demo import DemoConfig, _write, read_csv

    seen = {}

    def savefig(fig, path, **kw):  # measure the drawn figure before _write closes it
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        acc = fig.axes[0]
        seen["fig"] = fig
        seen["boxes"] = [t.get_window_extent(renderer) for t in acc.texts]
        seen["frame"] = acc.get_window_extent(renderer)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rows = read_csv(ROOT / "docs" / "demo.csv")  # equal accuracy on both channels
    _write(rows, tmp_path, DemoConfig())
    fig = seen["fig"]
    acc = fig.axes[0]
    lines = acc.get_lines()
    series = {(r["channel"], r["rate_point"]) for r in rows}
    assert len(lines) == len(series) == 6
    looks = {(ln.get_color(), ln.get_linestyle(), ln.get_marker(), ln.get_fillstyle())
             for ln in lines}  # fmt: skip
    assert len(looks) == len(lines), "two series are drawn alike"
    points = {tuple(zip(ln.get_xdata(), ln.get_ydata())) for ln in lines}
    assert len(points) == len(lines), "a series is drawn exactly on top of another"
    boxes = seen["boxes"]
    assert len(boxes) == len({(r["channel"], r["snr_db"]) for r in rows})  # one per point
    overlaps = [(a.get_text(), b.get_text()) for i, a in enumerate(acc.texts)
                for b, bb in zip(acc.texts[i + 1:], boxes[i + 1:])
                if boxes[i].overlaps(bb)]  # fmt: skip
    assert not overlaps, f"MCS labels overlap: {overlaps}"
    frame = seen["frame"]
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    legend = fig.legends[0] if fig.legends else acc.get_legend()
    assert len(legend.get_texts()) == 6
