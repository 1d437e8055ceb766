"""Every tutorial runs as written: the python blocks of docs/tutorials/*.md are executed."""

from __future__ import annotations

import re
import sys
import types
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
    try:
        exec(compile(code_of(path), str(path), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
        for name in set(CODECS) - before:  # tutorials may register demo codecs
            del CODECS[name]
    assert capsys.readouterr().out.strip(), "a tutorial should print what it shows"


def test_reproduce_page_names_existing_configs():
    text = (DOCS / "reproduce.md").read_text()
    root = DOCS.parents[1]
    for cfg in re.findall(r"experiments/[\w.-]+\.(?:json|py)", text):
        assert (root / cfg).is_file(), cfg
