"""Base types shared by the exact and the fast link: what a link reports, how a packet is
segmented and rate-matched, and the constructor checks every link makes.

:mod:`channels.link` (:class:`~channels.link.ExactLink`) and :mod:`channels.abstraction`
(:class:`~channels.abstraction.FastLink`) both build on this module and on nothing of each
other's.

Example:
    >>> from channels.mcs import get_mcs
    >>> plan_packet(100, get_mcs(9)).num_cb
    1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from channels._errors import ChannelError, ChannelTypeError
from channels.analog import AWGN, AnalogChannel, _check_device, _check_snr, _device_str
from channels.mcs import MCS, get_mcs

__all__ = ["LinkReport", "CodeBlockPlan", "plan_packet", "encoded_length", "check_packets",
           "LinkBase"]


@dataclass
class LinkReport:
    """What a link call spent and delivered.

    Attributes:
        channel_uses: complex channel uses, retransmissions included (int).
        per_packet_success: ``list[bool]``, CRC passed within the HARQ budget.
        per_packet_channel_uses: ``list[int]``, channel uses spent on each packet.
        n_transmissions: ``list[int]``, transmissions of each packet (1 = no retransmission).
        info_bits: payload bits offered (8 x total bytes).
        delivered_bits: payload bits of the delivered packets.
        effective_rate: ``delivered_bits / channel_uses`` (bit per channel use; 0 if unused).
        snr_db: Es/N0 used. mcs: the :class:`~channels.mcs.MCS`.
        num_code_blocks: ``list[int]``, LDPC code blocks per packet.
    """

    channel_uses: int
    per_packet_success: list[bool]
    per_packet_channel_uses: list[int]
    n_transmissions: list[int]
    info_bits: int
    delivered_bits: int
    effective_rate: float
    snr_db: float
    mcs: MCS
    num_code_blocks: list[int] = field(default_factory=list)

    @property
    def packet_error_rate(self) -> float:
        n = len(self.per_packet_success)
        return 0.0 if n == 0 else 1.0 - sum(self.per_packet_success) / n


@dataclass(frozen=True)
class CodeBlockPlan:
    """How one packet of ``payload_bits`` is coded (3GPP TS 38.212 style, simplified).

    Attributes:
        payload_bits: A, packet bits. tb_crc: ``"CRC16"`` (A <= 3824) or ``"CRC24A"``.
        num_cb: C, code blocks. k: LDPC information bits per block (incl. CRC24B if C > 1).
        n: coded bits per block (a multiple of the modulation order).
        pad_bits: zero bits appended to fill C equal blocks. bg: ``"bg1"`` / ``"bg2"``.
        n_enc: length of the LDPC codeword; below Sionna's lowest rate 1/5 (MCS 0-2) the
            codeword of rate ~1/5 is repeated cyclically up to ``n`` bits (LLRs of repeated
            bits are added at the receiver), as 5G's circular-buffer rate matching does.
    """

    payload_bits: int
    tb_crc: str
    num_cb: int
    k: int
    n: int
    pad_bits: int
    bg: str

    @property
    def symbols_per_cb(self) -> int:
        return self.n // self._m

    _m: int = 1
    n_enc: int = 0


def encoded_length(k: int, n: int, m: int) -> int:
    """Length of the LDPC codeword for ``k`` info bits sent as ``n`` bits of order ``m``
    (``n``, or about ``5 k`` below Sionna's lowest rate 1/5, then repeated up to ``n``)."""
    return n if k / n >= 0.2 else (5 * k // m) * m


def plan_packet(num_bytes: int, mcs: MCS) -> CodeBlockPlan:
    """Segmentation and rate matching of a ``num_bytes`` packet for ``mcs``."""
    a = 8 * int(num_bytes)
    r = mcs.code_rate
    tb_crc, crc_len = ("CRC24A", 24) if a > 3824 else ("CRC16", 16)
    b = a + crc_len
    bg = "bg2" if (a <= 292 or (a <= 3824 and r <= 0.67) or r <= 0.25) else "bg1"
    if bg == "bg1" and r < 1 / 3:
        bg = "bg2"
    kcb = 8448 if bg == "bg1" else 3840
    if b <= kcb:
        c, k, pad = 1, b, 0
    else:
        c = math.ceil(b / (kcb - 24))
        per = math.ceil(b / c)
        k, pad = per + 24, c * per - b
    m = mcs.modulation_order
    n = math.ceil(k / r / m) * m
    return CodeBlockPlan(payload_bits=a, tb_crc=tb_crc, num_cb=c, k=k, n=n, pad_bits=pad, bg=bg,
                         _m=m, n_enc=encoded_length(k, n, m))


def check_packets(packets) -> list[bytes]:
    """``packets`` as a list of ``bytes``; :class:`ChannelTypeError` for anything else."""
    if not isinstance(packets, (list, tuple)):
        raise ChannelTypeError(f"packets must be a list of bytes, got {type(packets).__name__}")
    for i, p in enumerate(packets):
        if not isinstance(p, (bytes, bytearray)):
            raise ChannelTypeError(f"packet {i} must be bytes, got {type(p).__name__}")
    return [bytes(p) for p in packets]


class LinkBase:
    """Constructor checks shared by the exact and the fast link."""

    def __init__(self, mcs: int | MCS = 9, channel: AnalogChannel | None = None,
                 snr_db: float = 10.0, harq_max_tx: int = 1, device: str = "cpu",
                 seed: int = 0):
        self.mcs = get_mcs(mcs)
        self.device = _check_device(device)
        self._dev = _device_str(self.device)
        if channel is None:
            channel = AWGN(device=self._dev, seed=seed)
        if not isinstance(channel, AnalogChannel):
            raise ChannelTypeError(
                f"channel must be a channels.analog.AnalogChannel, got {type(channel).__name__}")
        if channel.device != self.device:
            raise ChannelError(f"channel is on {channel.device} but the link on {self.device}")
        self.channel = channel
        self.snr_db = _check_snr(snr_db)
        if isinstance(harq_max_tx, bool) or not isinstance(harq_max_tx, int) or harq_max_tx < 1:
            raise ChannelError(f"harq_max_tx must be an int >= 1, got {harq_max_tx!r}")
        self.harq_max_tx = harq_max_tx
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ChannelTypeError(f"seed must be an int, got {type(seed).__name__}")
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def _resolve(self, snr_db, generator):
        snr = self.snr_db if snr_db is None else _check_snr(snr_db)
        if isinstance(snr, torch.Tensor):
            if snr.numel() != 1:
                raise ChannelError("a link takes one scalar snr_db per call")
            snr = float(snr)
        if generator is None:
            generator = self._generator
        elif not isinstance(generator, torch.Generator):
            raise ChannelTypeError(f"generator must be a torch.Generator, got {type(generator)}")
        return snr, generator

    @staticmethod
    def _groups(packets: list[bytes]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(packets):
            groups.setdefault(len(p), []).append(i)
        return groups

    def _report(self, packets, success, uses, ntx, ncb, snr):
        info = 8 * sum(len(p) for p in packets)
        delivered = 8 * sum(len(p) for p, s in zip(packets, success) if s)
        total = int(sum(uses))
        return LinkReport(channel_uses=total, per_packet_success=list(success),
                          per_packet_channel_uses=[int(u) for u in uses],
                          n_transmissions=list(ntx), info_bits=info, delivered_bits=delivered,
                          effective_rate=(delivered / total) if total else 0.0, snr_db=snr,
                          mcs=self.mcs, num_code_blocks=list(ncb))
