"""Modulation and coding schemes (MCS): the 5G NR PDSCH MCS table 1 and custom entries."""

from __future__ import annotations

from dataclasses import dataclass

from channels._errors import ChannelError

__all__ = ["MCS", "MCS_TABLE", "get_mcs"]


@dataclass(frozen=True)
class MCS:
    """One modulation and coding scheme.

    Attributes:
        modulation_order: bits per QAM symbol (1 = BPSK, 2 = QPSK, 4, 6, 8).
        code_rate: LDPC code rate in (0, 0.95].
        index: position in :data:`MCS_TABLE` (``None`` for a custom MCS).

    Example:
        >>> mcs = MCS(modulation_order=2, code_rate=0.5)
        >>> mcs.spectral_efficiency
        1.0
    """

    modulation_order: int
    code_rate: float
    index: int | None = None

    def __post_init__(self):
        if self.modulation_order not in (1, 2, 4, 6, 8):
            raise ChannelError(
                f"modulation_order must be one of 1, 2, 4, 6, 8, got {self.modulation_order!r}")
        if not (0.0 < float(self.code_rate) <= 0.95):
            raise ChannelError(f"code_rate must be in (0, 0.95], got {self.code_rate!r}")

    @property
    def spectral_efficiency(self) -> float:
        """Information bits per complex symbol: ``modulation_order * code_rate``."""
        return self.modulation_order * self.code_rate

    @property
    def name(self) -> str:
        mod = {1: "BPSK", 2: "QPSK", 4: "16QAM", 6: "64QAM", 8: "256QAM"}[self.modulation_order]
        tag = f"MCS{self.index} " if self.index is not None else ""
        return f"{tag}{mod} R={self.code_rate:.4f}"


# 3GPP TS 38.214 Table 5.1.3.1-1 (PDSCH MCS index table 1): (Qm, R x 1024).
_TABLE1 = [
    (2, 120), (2, 157), (2, 193), (2, 251), (2, 308), (2, 379), (2, 449), (2, 526), (2, 602),
    (2, 679), (4, 340), (4, 378), (4, 434), (4, 490), (4, 553), (4, 616), (4, 658), (6, 438),
    (6, 466), (6, 517), (6, 567), (6, 616), (6, 666), (6, 719), (6, 772), (6, 822), (6, 873),
    (6, 910), (6, 948),
]

#: The 5G NR PDSCH MCS table 1, indices 0..28.
MCS_TABLE: tuple[MCS, ...] = tuple(
    MCS(modulation_order=q, code_rate=r / 1024, index=i) for i, (q, r) in enumerate(_TABLE1))


def get_mcs(mcs: int | MCS) -> MCS:
    """Return an :class:`MCS`: an index into :data:`MCS_TABLE` (0..28) or an MCS itself."""
    if isinstance(mcs, MCS):
        return mcs
    if isinstance(mcs, bool) or not isinstance(mcs, int):
        raise TypeError(f"mcs must be an int index or an MCS, got {type(mcs).__name__}")
    if not 0 <= mcs < len(MCS_TABLE):
        raise ChannelError(f"MCS index must be in 0..{len(MCS_TABLE) - 1}, got {mcs}")
    return MCS_TABLE[mcs]
