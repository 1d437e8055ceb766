"""The shipped zoo (family and codec checkpoints in the wheel) stays under 34 MB.

The limit was 30 MB with one family; the ViT family (float16, about 2 MB) and its token
codecs raised it to 34 MB. A wheel that size is still far below PyPI's 100 MB default.
"""

from pathlib import Path

import flowcodec

ZOO = Path(flowcodec.__file__).parent / "zoo"
LIMIT = 34_000_000  # bytes


def test_the_shipped_zoo_is_under_34_mb():
    files = [p for p in ZOO.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    assert files, f"no checkpoints under {ZOO}"
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size)[-3:]
    assert total < LIMIT, (f"zoo holds {total:,} B (limit {LIMIT:,}); largest: "
                           + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in biggest))
