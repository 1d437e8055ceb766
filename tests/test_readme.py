"""The README works as written (issue 31, item 3).

Its python blocks are complete programs and run; its shell commands run in the
environment that ``make`` builds (the block activates it, or calls ``.venv/bin/...``) and
parse with the real command-line parser; its links and ``make`` targets exist; the
install doc's "without make" line installs every extra. The slow tests run the quick
start's commands themselves, the two-terminal server pair included (started and stopped).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent  # the environment's bin folder (.venv/bin under make)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """The shell commands of a block, comments stripped."""
    out = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def flowcodec_argv(command: str) -> list[str] | None:
    words = shlex.split(command)
    if words and Path(words[0]).name == "flowcodec":
        return words[1:]
    return None


PYTHON_BLOCKS = blocks(README, "python")


def test_the_readme_has_runnable_blocks():
    assert PYTHON_BLOCKS, "the README should show a runnable program"
    assert blocks(README, "sh")


@pytest.mark.parametrize("i", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(i, capsys):
    code = PYTHON_BLOCKS[i]
    module = types.ModuleType(f"readme_block_{i}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, f"README.md python block {i + 1}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    out = capsys.readouterr().out
    assert out.strip(), "a README program should print what it shows"
    if "split_model(" in code:  # the own-model program: the model comes back as it was
        model, result = module.model, module.result
        assert all(m.training for m in model.modules())  # torchvision models start in train
        assert all(p.requires_grad for p in model.parameters())
        assert result.mean_bits() > 0 and "bytes per sample" in out


def test_shell_commands_run_in_the_environment_make_builds():
    """After ``make demo`` nothing is on PATH: a block that calls ``flowcodec`` activates
    ``.venv`` first or calls ``.venv/bin/flowcodec``."""
    bad = []
    for block in blocks(README, "sh"):
        active = False
        for cmd in commands(block):
            if cmd in (". .venv/bin/activate", "source .venv/bin/activate"):
                active = True
            words = shlex.split(cmd)
            if words and words[0] in ("flowcodec", "python", "pytest") and not active:
                bad.append(cmd)
    assert not bad, f"these README commands fail with 'command not found' as written: {bad}"


def readme_cli_commands() -> list[list[str]]:
    found = []
    for block in blocks(README, "sh"):
        found += [a for a in map(flowcodec_argv, commands(block)) if a is not None]
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S)):
        span = " ".join(span.split())
        # a span with a flag is a command to type; `flowcodec snr` alone names a command
        if span.startswith(("flowcodec ", ".venv/bin/flowcodec ")) and " --" in span:
            found.append(flowcodec_argv(span))
    return found


def test_every_cli_command_in_the_readme_parses():
    from flowcodec.cli import build_parser

    found = readme_cli_commands()
    assert len(found) >= 4
    for argv in found:
        if argv in (["--help"], ["--version"]):
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"`flowcodec {' '.join(argv)}` from the README does not parse ({e})")


def test_make_targets_and_links_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for target in re.findall(r"\bmake ([a-z][\w-]*)", README):
        assert target in targets, f"README says `make {target}`, the Makefile has no such target"
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if "://" not in link:
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_no_stale_timing_and_a_short_headline_table():
    assert "1,147" not in README and "1147" not in README
    section = README.split("## Headline results", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert 6 <= len(rows) - 1 <= 12, f"the headline table has {len(rows) - 1} rows"
    assert all(re.search(r"\]\([^)]+\)", r) for r in rows[1:]), "every row links to its page"
    assert len(section.splitlines()) < 30
    for jargon in ("FiLM", "DPC-KNN", "session framing", " lift"):
        assert jargon not in section, f"unexplained term {jargon!r} in the headline results"


def test_the_install_doc_installs_every_extra():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])  # fmt: skip
    doc = (ROOT / "docs" / "install.md").read_text()
    line = next(ln for b in blocks(doc, "sh") for ln in commands(b) if " -e " in ln)
    listed = set(re.search(r"\.\[([\w,]+)\]", line).group(1).split(","))
    assert listed == extras, f"the 'without make' line installs {listed}, extras are {extras}"
    make_line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines()
                     if "pip install" in ln and " -e " in ln)  # fmt: skip
    assert set(re.search(r"\.\[([\w,]+)\]", make_line).group(1).split(",")) == extras


# --- the quick start's commands themselves (slow) ---------------------------------------------
def run_cli(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flowcodec"), *argv], capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


@pytest.mark.slow
def test_the_quick_start_commands_run(tmp_path):
    assert run_cli(["--help"], 120).returncode == 0
    done = run_cli(["demo", "--quick", "--no-progress"], 3600, cwd=tmp_path)  # a loaded CI box
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "demo_out" / "demo.png").is_file()


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@pytest.mark.slow
def test_the_two_terminal_commands_run_as_written(tmp_path):
    pytest.importorskip("grpc")
    block = next(b for b in blocks(README, "sh") if "flowcodec serve" in b)
    serve, device = [flowcodec_argv(c) for c in commands(block) if flowcodec_argv(c)]
    if port_open("127.0.0.1", 50051):
        pytest.skip("port 50051, the README's default, is in use")
    server = subprocess.Popen([str(BIN / "flowcodec"), *serve], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not port_open("127.0.0.1", 50051):
            assert server.poll() is None, f"the server stopped: {server.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not start in 10 minutes"
            time.sleep(1)
        done = run_cli(device, 1200, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "accuracy" in done.stdout.lower()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
