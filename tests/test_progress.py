"""Progress bars (flowcodec.progress): fit for logs, and the only way the library draws one."""

from __future__ import annotations

import io
import re
import sys

from helpers import ROOT


# --- progress bars fit for logs -------------------------------------------------------------
def test_bars_redraw_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    import time

    from flowcodec import progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("FLOWCODEC_PROGRESS_INTERVAL", raising=False)
    assert progress.log_interval() == progress.LOG_INTERVAL_S >= 30
    log = io.StringIO()
    for _ in progress.tqdm(range(400), file=log):
        time.sleep(0.002)  # about a second: tqdm's default would redraw ten times
    assert log.getvalue().count("\r") <= 3


def test_every_bar_in_the_library_uses_the_helper():
    offenders = []
    for p in sorted((ROOT / "flowcodec").rglob("*.py")):
        if p.name == "progress.py":
            continue
        if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), flags=re.M):
            offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, f"use flowcodec.progress.tqdm in {offenders}"
