"""Digital link: packets of bytes in, the same number out, each delivered or erased (None).

:class:`ExactLink` simulates every bit: transport-block CRC, code-block segmentation (with
code-block CRC), 5G NR LDPC encoding and BP decoding (Sionna), Gray QAM mapping and APP
soft demapping (Sionna), any :class:`~channels.analog.AnalogChannel`, optional HARQ with
chase combining (LLRs of retransmissions are added) and a retransmission budget.
:class:`~channels.abstraction.FastLink` (re-exported here) has the same interface and draws
packet success from BLER tables. The types both share (:class:`LinkReport`,
:func:`plan_packet`) live in :mod:`channels.base` and are re-exported here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from channels._errors import ChannelError
from channels.abstraction import FastLink
from channels.analog import AnalogChannel
from channels.base import (
    CodeBlockPlan,
    LinkBase,
    LinkReport,
    check_packets,
    encoded_length,
    plan_packet,
)
from channels.mcs import MCS

__all__ = ["ExactLink", "FastLink", "LinkReport", "CodeBlockPlan", "plan_packet"]


_CODERS: dict = {}
_CRCS: dict = {}


class ExactLink(LinkBase):
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
                             _m=m, n_enc=encoded_length(k, n, m))
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
        packets = check_packets(packets)
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

