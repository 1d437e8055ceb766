"""The rows of an ``snr`` sweep, and what is read from them: the best digital pick and the
choice between JSCC and separation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SNRRow", "best_digital", "choose"]


@dataclass
class SNRRow:
    """One measured point."""

    scheme: str  # "reference", "jscc", "separation"
    label: str
    channel: str
    link: str  # "analog", "uncoded", "fast", "exact", "none"
    snr_db: float
    told_snr_db: float | None
    budget: int | None  # channel-use budget (separation) or requested uses (jscc)
    uses: float  # mean channel uses per image actually spent
    accuracy: float
    n: int
    detail: str = ""


def best_digital(acc: dict) -> tuple:
    """The key with the highest accuracy of ``{(rate_point, mcs): accuracy}`` (ties: the
    lower MCS, then the lower rate point)."""
    return max(acc, key=lambda k: (acc[k], -k[1], -k[0]))


def choose(rows: list[SNRRow]) -> list[dict]:
    """Analog or digital, per channel, SNR and channel-use budget: the most accurate JSCC
    row (told the true SNR, at most ``budget`` uses on average) against the separation row
    (fast link) at that budget; ``winner`` is ``"jscc"``, ``"separation"`` or ``"tie"``
    (within 0.1 point). What a policy picks per SNR, and where separation wins."""
    out = []
    seps = [r for r in rows if r.scheme == "separation" and r.link == "fast"]
    for s in seps:
        cands = [r for r in rows if r.scheme == "jscc" and r.told_snr_db is None
                 and r.channel == s.channel and r.snr_db == s.snr_db
                 and r.uses <= s.budget + 1e-9]  # fmt: skip
        if not cands:
            continue
        j = max(cands, key=lambda r: (r.accuracy, -r.uses))
        gap = 100 * (j.accuracy - s.accuracy)
        out.append({"channel": s.channel, "snr_db": s.snr_db, "budget": s.budget,
                    "jscc": j.label, "jscc_link": j.link, "jscc_uses": j.uses,
                    "jscc_accuracy": j.accuracy, "separation_accuracy": s.accuracy,
                    "separation": s.detail, "gap_points": round(gap, 2),
                    "winner": "tie" if abs(gap) < 0.1 else ("jscc" if gap > 0 else
                                                            "separation")})  # fmt: skip
    return out
