"""The shipped zoo (family and codec checkpoints in the wheel) stays under 60 MB (raised from
30 MB by issue 26; the language family of issue 29 is its first user, float16, 6.4 MB)."""

from pathlib import Path

import flowcodec

ZOO = Path(flowcodec.__file__).parent / "zoo"
LIMIT = 60_000_000  # bytes


def test_the_shipped_zoo_is_under_60_mb():
    files = [p for p in ZOO.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    assert files, f"no checkpoints under {ZOO}"
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size)[-3:]
    assert total < LIMIT, (f"zoo holds {total:,} B (limit {LIMIT:,}); largest: "
                           + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in biggest))
