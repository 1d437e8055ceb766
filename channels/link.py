"""Digital link: packets of bytes in, the same number out, each delivered or erased (None).

:class:`ExactLink` simulates every bit: transport-block CRC, code-block segmentation (with
code-block CRC), 5G NR LDPC encoding and BP decoding (Sionna), Gray QAM mapping and APP
soft demapping (Sionna), any :class:`~channels.analog.AnalogChannel`, optional HARQ with
chase combining (LLRs of retransmissions are added) and a retransmission budget.
:class:`~channels.abstraction.FastLink` (re-exported here) has the same interface and draws
packet success from BLER tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from channels._errors import ChannelError, ChannelTypeError
from channels.analog import AWGN, AnalogChannel, _check_device, _check_snr, _device_str
from channels.mcs import MCS, get_mcs

__all__ = ["ExactLink", "FastLink", "LinkReport", "CodeBlockPlan", "plan_packet"]


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


def _n_enc(k: int, n: int, m: int) -> int:
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
                         _m=m, n_enc=_n_enc(k, n, m))


def _check_packets(packets) -> list[bytes]:
    if not isinstance(packets, (list, tuple)):
        raise ChannelTypeError(f"packets must be a list of bytes, got {type(packets).__name__}")
    for i, p in enumerate(packets):
        if not isinstance(p, (bytes, bytearray)):
            raise ChannelTypeError(f"packet {i} must be bytes, got {type(p).__name__}")
    return [bytes(p) for p in packets]


class _LinkBase:
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


_CODERS: dict = {}
_CRCS: dict = {}


class ExactLink(_LinkBase):
    """Bit-exact 5G-NR-style link built from Sionna blocks.

    Args:
        mcs: index into :data:`~channels.mcs.MCS_TABLE` (0..28) or an :class:`MCS`.
        channel: any :class:`~channels.analog.AnalogChannel` (default: AWGN on ``device``).
        snr_db: default Es/N0 [dB]. harq_max_tx: transmissions per packet (1 = no HARQ).
        device: ``"cpu"`` or ``"cuda:0"``. seed: seed of the link's generator.
        num_iter: BP iterations of the LDPC decoder (default 20).

    ``transmit(packets: list[bytes], snr_db=None, generator=None)`` returns
    ``(delivered, report)``: ``delivered`` is ``list[bytes | None]`` of the same length
    (``None`` = erasure: a CRC failed after all HARQ tries), ``report`` a :class:`LinkReport`.

    Packets of equal length are coded together: all their code blocks go through the
    encoder, mapper, channel, demapper and decoder as one tensor.

    Example:
        >>> link = ExactLink(mcs=4, snr_db=5.0, seed=0)
        >>> out, rep = link.transmit([b"hello", b"world!"])
    """

    def __init__(self, mcs: int | MCS = 9, channel: AnalogChannel | None = None,
                 snr_db: float = 10.0, harq_max_tx: int = 1, device: str = "cpu",
                 seed: int = 0, num_iter: int = 20):
        super().__init__(mcs=mcs, channel=channel, snr_db=snr_db, harq_max_tx=harq_max_tx,
                         device=device, seed=seed)
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ChannelError(f"num_iter must be an int >= 1, got {num_iter!r}")
        self.num_iter = num_iter
        from sionna.phy.mapping import Constellation, Demapper, Mapper

        m = self.mcs.modulation_order
        const = Constellation("pam" if m == 1 else "qam", m, device=self._dev)
        self._mapper = Mapper(constellation=const, device=self._dev)
        self._demapper = Demapper("app", constellation=const, device=self._dev)

    # -- cached Sionna blocks --------------------------------------------------------------
    def _coder(self, k: int, n: int, bg: str):
        # Shared by all links: building a 5G LDPC code takes about a second on a CPU, and
        # entropy-coded packets come in many lengths. The blocks hold no per-call state.
        key = (k, n, bg, self.mcs.modulation_order, self.num_iter, self._dev)
        if key not in _CODERS:
            from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder

            enc = LDPC5GEncoder(k, n, num_bits_per_symbol=self.mcs.modulation_order, bg=bg,
                                device=self._dev, check_input=False)
            dec = LDPC5GDecoder(enc, num_iter=self.num_iter, hard_out=True, device=self._dev)
            _CODERS[key] = (enc, dec)
        return _CODERS[key]

    def _crc(self, poly: str, k: int):
        key = (poly, k, self._dev)
        if key not in _CRCS:
            from sionna.phy.fec.crc import CRCDecoder, CRCEncoder

            enc = CRCEncoder(poly, k=k, device=self._dev)
            _CRCS[key] = (enc, CRCDecoder(enc, device=self._dev))
        return _CRCS[key]

    # -- code-block level ------------------------------------------------------------------
    def _run_blocks(self, info: torch.Tensor, plan: CodeBlockPlan, snr: float,
                    gen: torch.Generator, done_fn):
        """Encode ``info`` ``[P, C, k]``, transmit with HARQ, decode.

        ``done_fn(bits_hat [P', C, k]) -> bool [P']`` decides success of the active packets.
        Returns (decoded bits [P, C, k], success [P], transmissions [P]).
        """
        enc, dec = self._coder(plan.k, plan.n_enc, plan.bg)
        p, c, k = info.shape
        cw = enc(info.reshape(p * c, k))
        rep_idx = None
        if plan.n_enc != plan.n:  # cyclic repetition below rate 1/5
            rep_idx = torch.arange(plan.n, device=self.device) % plan.n_enc
            cw = cw[:, rep_idx]
        x = self._mapper(cw).reshape(p, c, -1)
        llr_sum = torch.zeros(p, c, plan.n_enc, device=self.device)
        success = torch.zeros(p, dtype=torch.bool, device=self.device)
        ntx = torch.zeros(p, dtype=torch.long, device=self.device)
        bits_hat = torch.zeros_like(info)
        active = torch.arange(p, device=self.device)
        for _ in range(self.harq_max_tx):
            if active.numel() == 0:
                break
            xa = x[active].reshape(active.numel() * c, -1)
            x_eq, no_eff = self.channel.receive(xa, snr_db=snr, generator=gen)
            llr = self._demapper(x_eq, no_eff)
            if rep_idx is not None:
                llr = torch.zeros(llr.shape[0], plan.n_enc, device=self.device).index_add_(
                    1, rep_idx, llr)
            llr_sum[active] += llr.reshape(active.numel(), c, plan.n_enc)
            ntx[active] += 1
            b = dec(llr_sum[active].reshape(-1, plan.n_enc)).reshape(active.numel(), c, k)
            bits_hat[active] = b
            ok = done_fn(b)
            success[active[ok]] = True
            active = active[~ok]
        return bits_hat, success, ntx

    def simulate_code_blocks(self, k: int, num_blocks: int, snr_db: float,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Block errors of ``num_blocks`` random code blocks of ``k`` info bits (no HARQ).

        Uses this link's MCS, channel, encoder and decoder; ``n`` follows :func:`plan_packet`'s
        rate matching. Returns a bool tensor ``[num_blocks]`` (True = some info bit wrong).
        Used to generate the BLER tables of the fast link.
        """
        snr, gen = self._resolve(snr_db, generator)
        m, r = self.mcs.modulation_order, self.mcs.code_rate
        n = math.ceil(k / r / m) * m
        bg = "bg2" if (k <= 292 or (k <= 3824 and r <= 0.67) or r <= 0.25) else "bg1"
        if bg == "bg1" and r < 1 / 3:
            bg = "bg2"
        plan = CodeBlockPlan(payload_bits=k, tb_crc="", num_cb=1, k=k, n=n, pad_bits=0, bg=bg,
                             _m=m, n_enc=_n_enc(k, n, m))
        info = torch.randint(0, 2, (num_blocks, 1, k), generator=gen, device=self.device,
                             dtype=torch.int64).float()
        max_tx, self.harq_max_tx = self.harq_max_tx, 1
        try:
            bits_hat, _, _ = self._run_blocks(
                info, plan, snr, gen, lambda b: torch.zeros(b.shape[0], dtype=torch.bool,
                                                             device=b.device))
        finally:
            self.harq_max_tx = max_tx
        return (bits_hat != info).any(-1).squeeze(-1)

    # -- packet level ---------------------------------------------------------------------
    def transmit(self, packets: list[bytes], snr_db: float | None = None,
                 generator: torch.Generator | None = None):
        """Send ``packets``; returns ``(list[bytes | None], LinkReport)``."""
        packets = _check_packets(packets)
        snr, gen = self._resolve(snr_db, generator)
        n_pk = len(packets)
        delivered: list[bytes | None] = [None] * n_pk
        success = [False] * n_pk
        uses = [0] * n_pk
        ntx_all = [0] * n_pk
        ncb = [0] * n_pk
        for nbytes, idx in self._groups(packets).items():
            plan = plan_packet(nbytes, self.mcs)
            p, c = len(idx), plan.num_cb
            raw = np.frombuffer(b"".join(packets[i] for i in idx), dtype=np.uint8)
            bits = torch.from_numpy(np.unpackbits(raw).reshape(p, 8 * nbytes).astype(np.float32))
            bits = bits.to(self.device)
            tb_enc, tb_dec = self._crc(plan.tb_crc, plan.payload_bits)
            tb = tb_enc(bits)  # [P, B]
            if c > 1:
                tb = torch.nn.functional.pad(tb, (0, plan.pad_bits))
                cb_enc, cb_dec = self._crc("CRC24B", plan.k - 24)
                info = cb_enc(tb.reshape(p, c, plan.k - 24))
            else:
                cb_dec = None
                info = tb.reshape(p, 1, plan.k)

            def done(b, cb_dec=cb_dec, tb_dec=tb_dec, plan=plan):
                if cb_dec is None:
                    return tb_dec(b[:, 0])[1].squeeze(-1)
                payload, cb_ok = cb_dec(b)
                flat = payload.reshape(b.shape[0], -1)
                flat = flat[:, : flat.shape[1] - plan.pad_bits]
                return cb_ok.squeeze(-1).all(-1) & tb_dec(flat)[1].squeeze(-1)

            bits_hat, ok, ntx = self._run_blocks(info, plan, snr, gen, done)
            if c > 1:
                bits_hat = bits_hat[..., : plan.k - 24].reshape(p, -1)
            else:
                bits_hat = bits_hat[:, 0]
            payload = bits_hat[:, : plan.payload_bits].to(torch.uint8).cpu().numpy()
            out_bytes = np.packbits(payload, axis=1)
            per_tx_uses = c * self.channel.channel_uses(plan.n // self.mcs.modulation_order)
            ok_l, ntx_l = ok.tolist(), ntx.tolist()
            for j, i in enumerate(idx):
                success[i] = ok_l[j]
                delivered[i] = out_bytes[j].tobytes() if ok_l[j] else None
                uses[i] = ntx_l[j] * per_tx_uses
                ntx_all[i] = ntx_l[j]
                ncb[i] = c
        return delivered, self._report(packets, success, uses, ntx_all, ncb, snr)


from channels.abstraction import FastLink  # noqa: E402  (re-export; abstraction imports link)
