"""The rows of an ``rd`` run and the comparison against the targets (:func:`compare`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from flowcodec.sweeps.codec_spec import INPUT_CODECS

__all__ = ["RDRow", "Comparison", "FRAMINGS", "is_answer_codec", "cheapest_at_least", "compare",
           "load_rows"]

FRAMINGS = {"bytes_per_image": "self-contained", "session_bytes": "session"}


@dataclass
class Comparison:
    """A learned codec against the input baselines and float32, in one framing.

    ``input_bytes`` is the cheapest input-compression row (JPEG/WebP, point 0) that is at
    least as accurate as the codec (``None`` when none is); ``input_ratio`` is the codec's
    bytes divided by it, ``float32_ratio`` its bytes divided by the raw float32 row's.
    ``webp_*``: the same against WebP rows only (the issue's target: the cheapest WebP at
    least as accurate). ``floor_*``: the device-answer floor at the codec's split point
    (the most accurate ``answers`` row, e.g. ``exit-top1``, at that point), its bytes, and
    whether the codec is more accurate than it (``None`` when there is no such row).
    """

    label: str
    framing: str
    accuracy: float
    gap_points: float
    bytes: float
    input_label: str | None
    input_bytes: float | None
    input_ratio: float | None
    float32_ratio: float | None
    webp_label: str | None = None
    webp_bytes: float | None = None
    webp_ratio: float | None = None
    floor_label: str | None = None
    floor_accuracy: float | None = None
    floor_bytes: float | None = None
    beats_floor: bool | None = None


def is_answer_codec(name: str) -> bool:
    """True for a registered codec whose decoder returns the receiver's answer (scores)."""
    from flowcodec.codecs import CODECS

    return bool(getattr(CODECS.get(name), "answers", False))


def cheapest_at_least(rows: list[RDRow], accuracy: float, key: str = "session_bytes",
                      codecs: tuple[str, ...] = INPUT_CODECS) -> RDRow | None:  # fmt: skip
    """The clean row of ``codecs`` with the fewest bytes (``key``: ``"session_bytes"`` or
    ``"bytes_per_image"``) among those at least ``accuracy`` accurate; ``None`` if none is.

    ``cheapest_at_least(rows, 0.89, codecs=("webp",))`` answers "what does WebP need for
    89%?" for a learned codec's point measured elsewhere.
    """
    if key not in FRAMINGS:
        raise ValueError(f"key must be one of {sorted(FRAMINGS)}, got {key!r}")
    ok = [r for r in rows if r.condition == "clean" and r.codec in codecs
          and r.accuracy >= accuracy]  # fmt: skip
    return min(ok, key=lambda r: getattr(r, key)) if ok else None


def compare(rows: list[RDRow]) -> list[Comparison]:
    """Set every clean learned row against the targets of the codecs issue (both framings).

    A row is learned when its codec is in the zoo's ``LEARNED_CODECS`` or it came from a
    ``"pretrained"`` or ``"train"`` entry (``source``).
    """
    from flowcodec.codecs.zoo import LEARNED_CODECS

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    raw = next((r for r in clean if r.codec == "raw" and "32" in r.label), None)
    answers = [r for r in clean if is_answer_codec(r.codec)]
    out = []
    for r in clean:
        if r.codec not in LEARNED_CODECS and r.source not in ("pretrained", "trained"):
            continue
        floors = [a for a in answers if a.point == r.point]
        floor = max(floors, key=lambda a: (a.accuracy, -a.session_bytes)) if floors else None
        for key, framing in FRAMINGS.items():
            b = getattr(r, key)
            best = cheapest_at_least(clean, r.accuracy, key)
            ib = getattr(best, key) if best else None
            wp = cheapest_at_least(clean, r.accuracy, key, codecs=("webp",))
            wb = getattr(wp, key) if wp else None
            out.append(Comparison(
                r.label, framing, r.accuracy,
                round(100 * (ref.accuracy - r.accuracy), 2) if ref else math.nan, b,
                best.label if best else None, ib, b / ib if ib else None,
                b / getattr(raw, key) if raw else None,
                wp.label if wp else None, wb, b / wb if wb else None,
                floor.label if floor else None, floor.accuracy if floor else None,
                getattr(floor, key) if floor else None,
                (r.accuracy > floor.accuracy) if floor else None))  # fmt: skip
    return out


@dataclass
class RDRow:
    """One measured point: a codec configuration under one condition.

    ``receiver`` is the member whose tail finished the row's features (the config's member,
    or ``family.receiver(point)`` at a point off that member's path); ``device_flops_pct``
    is the device's share of that member's FLOPs. None in runs saved before it was recorded.
    """

    label: str
    group: str
    codec: str
    point: int
    condition: str
    accuracy: float
    bytes_per_image: float
    session_bytes: float
    payload_bytes: float
    est_bytes: float | None
    coder_overhead_pct: float | None
    device_mflops: float
    device_flops_pct: float
    n: int
    seconds: float
    source: str = "baseline"  # "reference", "baseline", "pretrained" or "trained"
    receiver: int | None = None


def load_rows(path: str | Path) -> list[RDRow]:
    """The rows of an earlier run's ``rd.json``."""
    from flowcodec.errors import ConfigError

    p = Path(path)
    try:
        rows = json.loads(p.read_text())["rows"]
        return [RDRow(**r) for r in rows]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{p} is not the rd.json of a flowcodec rd run: {e}") from e
