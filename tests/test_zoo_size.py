"""The shipped zoo (family and codec checkpoints in the wheel) stays under 30 MB."""

from pathlib import Path

import flowcodec

ZOO = Path(flowcodec.__file__).parent / "zoo"
LIMIT = 30_000_000  # bytes


def test_the_shipped_zoo_is_under_30_mb():
    files = [p for p in ZOO.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
    assert files, f"no checkpoints under {ZOO}"
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size)[-3:]
    assert total < LIMIT, (f"zoo holds {total:,} B (limit {LIMIT:,}); largest: "
                           + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in biggest))
