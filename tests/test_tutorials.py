"""Every tutorial runs as written: the python blocks of docs/tutorials/*.md are executed."""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
TUTORIALS = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def code_of(path: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python block"
    return "\n".join(blocks)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, capsys, digits_family):
    from flowcodec.codecs.base import CODECS

    before = set(CODECS)
    module = types.ModuleType(f"tutorial_{path.stem}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    code = compile(code_of(path), str(path), "exec")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(code, module.__dict__)
            if path.stem == "add_codec":  # a notebook cell run twice registers again
                exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
        for name in set(CODECS) - before:  # tutorials may register demo codecs
            del CODECS[name]
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if "flowcodec" in w.filename or "channels" in w.filename]  # fmt: skip
    assert not ours, f"a tutorial should run without warnings from the library: {ours}"
    out = capsys.readouterr().out
    assert out.strip(), "a tutorial should print what it shows"
    if path.stem == "add_channel":  # the example's packets must get through its link
        lost, sent = map(int, re.search(r"(\d+) of (\d+) packets lost", out).groups())
        assert lost < sent / 2
        assert float(re.search(r"accuracy ([\d.]+) %", out).group(1)) > 80


def test_reproduce_page_names_existing_configs():
    text = (DOCS / "reproduce.md").read_text()
    root = DOCS.parents[1]
    for cfg in re.findall(r"experiments/[\w.-]+\.(?:json|py)", text):
        assert (root / cfg).is_file(), cfg
