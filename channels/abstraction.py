"""Fast link: packet success drawn from BLER-vs-SNR tables (PHY abstraction).

Per code block of ``k`` information bits, the block error rate at an (effective) Es/N0 is
read from a table and a Bernoulli draw decides success; a packet succeeds when all its
code blocks do. Tables:

1. this project's tables under ``channels/tables/*.json``, generated with
   :class:`~channels.link.ExactLink` (same encoder, decoder, demapper) by
   ``experiments/make_bler_tables.py``; used whenever they cover the MCS;
2. otherwise Sionna SYS's PDSCH table-1 BLER tables (``sionna/sys/bler_tables``).

Lookup: ``log10(BLER)`` is interpolated linearly in SNR [dB] and in ``log(k)`` between the
two nearest tabulated block sizes (clamped at the edges).

Fading: the channel's per-symbol post-equalisation SNRs of each code block are drawn from
the same channel model (:meth:`~channels.analog.AnalogChannel.post_equalization_snr`) and
mapped to one effective SNR by EESM (beta per MCS from Sionna's calibration table). HARQ
chase combining adds per-symbol SNRs over transmissions (maximum ratio combining).
"""

from __future__ import annotations

import importlib.util
import json
import math
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from channels._errors import ChannelError
from channels.analog import AWGN, AnalogChannel
from channels.base import LinkBase, LinkReport, check_packets, plan_packet
from channels.mcs import MCS, MCS_TABLE

__all__ = ["FastLink", "BlerTable", "load_project_tables", "load_sionna_tables", "eesm"]

_BLER_FLOOR = 1e-9


class BlerTable:
    """BLER curves for one MCS at several code block sizes.

    Args:
        curves: ``{k: (snr_db array, bler array)}``.
        source: where the data came from (``"project"`` or ``"sionna"``).

    ``bler(k, snr_db)``: ``k`` int, ``snr_db`` float ndarray (any shape) -> BLER, same shape.

    Example:
        >>> t = BlerTable({512: ([0.0, 1.0], [0.5, 0.01])})
        >>> float(t.bler(512, np.array(0.5)))  # doctest: +ELLIPSIS
        0.07...
    """

    def __init__(self, curves: dict[int, tuple], source: str = "project"):
        if not curves:
            raise ChannelError("a BLER table needs at least one curve")
        self.source = source
        self.ks = np.array(sorted(int(k) for k in curves), dtype=np.float64)
        self._curves = {}
        for k in self.ks.astype(int):
            snr, bler = (np.asarray(v, dtype=np.float64) for v in curves[k])
            order = np.argsort(snr)
            snr, bler = snr[order], bler[order]
            # enforce a non-increasing curve (Monte Carlo noise) before log interpolation
            bler = np.minimum.accumulate(np.clip(bler, 0.0, 1.0))
            self._curves[int(k)] = (snr, np.log10(np.maximum(bler, _BLER_FLOOR)))

    def _at_k(self, k: int, snr_db: np.ndarray) -> np.ndarray:
        snr, logb = self._curves[k]
        return np.interp(snr_db, snr, logb, left=logb[0], right=logb[-1])

    def bler(self, k: int, snr_db) -> np.ndarray:
        snr_db = np.asarray(snr_db, dtype=np.float64)
        ks = self.ks
        if k <= ks[0] or k >= ks[-1] or len(ks) == 1:
            kk = int(ks[0] if k <= ks[0] else ks[-1])
            logb = self._at_k(kk, snr_db)
        else:
            hi = int(np.searchsorted(ks, k))
            k0, k1 = int(ks[hi - 1]), int(ks[hi])
            w = (math.log(k) - math.log(k0)) / (math.log(k1) - math.log(k0))
            logb = (1 - w) * self._at_k(k0, snr_db) + w * self._at_k(k1, snr_db)
        out = 10.0 ** logb
        return np.where(logb <= math.log10(_BLER_FLOOR) + 1e-9, 0.0, out)


def _sionna_sys_dir() -> Path:
    # locate sionna/sys without importing sionna.sys (which pulls in plotting and more)
    spec = importlib.util.find_spec("sionna")
    if spec is None or not spec.submodule_search_locations:
        raise ChannelError("sionna is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "sys"


def _tables_dir() -> Path:
    return Path(str(resources.files("channels") / "tables"))


@cache
def load_project_tables(path: str | None = None) -> dict[int, BlerTable]:
    """Tables shipped in ``channels/tables/bler_*.json``: ``{mcs_index: BlerTable}``.

    JSON layout: ``{"mcs_table": 1, "curves": [{"mcs": i, "k": k, "n": n,
    "snr_db": [...], "bler": [...], "blocks": [...], "errors": [...]}, ...]}``.
    """
    files = [Path(path)] if path else sorted(_tables_dir().glob("bler_*.json"))
    per_mcs: dict[int, dict[int, tuple]] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        for c in data.get("curves", []):
            per_mcs.setdefault(int(c["mcs"]), {})[int(c["k"])] = (c["snr_db"], c["bler"])
    return {m: BlerTable(curves, "project") for m, curves in per_mcs.items()}


@cache
def load_sionna_tables() -> dict[int, BlerTable]:
    """Sionna SYS's PDSCH MCS table 1 BLER tables: ``{mcs_index: BlerTable}``."""
    f = _sionna_sys_dir() / "bler_tables" / "PDSCH_table1.json"
    data = json.loads(f.read_text())
    out = {}
    for mcs_s, entry in data["category"]["1"]["index"]["1"]["MCS"].items():
        snr = entry["SNR_db"]
        curves = {int(k): (snr, v["BLER"]) for k, v in entry["CBS"].items()}
        out[int(mcs_s)] = BlerTable(curves, "sionna")
    return out


@cache
def _eesm_betas() -> list[float]:
    f = _sionna_sys_dir() / "esm_params" / "eesm_beta_table.json"
    return list(json.loads(f.read_text())["index"]["1"])


def eesm(sinr: torch.Tensor, beta: float) -> torch.Tensor:
    """Exponential effective SINR mapping over the last axis (linear in, linear out).

    ``sinr_eff = -beta * ln(mean(exp(-sinr / beta)))``, computed stably.
    """
    x = -sinr / beta
    return -beta * (torch.logsumexp(x, dim=-1) - math.log(sinr.shape[-1]))


def _beta_for(mcs: MCS) -> float:
    if mcs.index is not None:
        return _eesm_betas()[mcs.index]
    # custom MCS: the beta of the table entry with the closest spectral efficiency
    best = min(MCS_TABLE, key=lambda t: (t.modulation_order != mcs.modulation_order,
                                         abs(t.code_rate - mcs.code_rate)))
    return _eesm_betas()[best.index]


class FastLink(LinkBase):
    """Table-driven link with the same constructor keywords and ``transmit()`` as ExactLink.

    Args:
        mcs, channel, snr_db, harq_max_tx, device, seed: as :class:`~channels.link.ExactLink`.
        table: a :class:`BlerTable` to use instead of the shipped / Sionna tables.

    ``transmit(packets: list[bytes], snr_db=None, generator=None)`` ->
    ``(list[bytes | None], LinkReport)``; delivered packets are the input bytes unchanged.

    Example:
        >>> link = FastLink(mcs=4, snr_db=5.0, seed=0)
        >>> out, rep = link.transmit([b"x" * 100] * 10)
    """

    def __init__(self, mcs=9, channel: AnalogChannel | None = None, snr_db: float = 10.0,
                 harq_max_tx: int = 1, device: str = "cpu", seed: int = 0,
                 table: BlerTable | None = None):
        super().__init__(mcs=mcs, channel=channel, snr_db=snr_db, harq_max_tx=harq_max_tx,
                         device=device, seed=seed)
        if table is None:
            idx = self.mcs.index
            if idx is None:
                raise ChannelError("a custom MCS needs an explicit BLER table (table=...)")
            table = load_project_tables().get(idx) or load_sionna_tables().get(idx)
            if table is None:
                raise ChannelError(f"no BLER table for MCS index {idx}")
        if not isinstance(table, BlerTable):
            raise ChannelError(f"table must be a BlerTable, got {type(table).__name__}")
        self.table = table
        self._awgn = type(self.channel) is AWGN
        self._beta = _beta_for(self.mcs)

    def block_error_rate(self, k: int, snr_db) -> np.ndarray:
        """Tabulated BLER of one code block of ``k`` info bits at Es/N0 ``snr_db``."""
        return self.table.bler(k, snr_db)

    def transmit(self, packets: list[bytes], snr_db: float | None = None,
                 generator: torch.Generator | None = None):
        """Send ``packets``; returns ``(list[bytes | None], LinkReport)``."""
        packets = check_packets(packets)
        snr, gen = self._resolve(snr_db, generator)
        n_pk = len(packets)
        success = [False] * n_pk
        uses = [0] * n_pk
        ntx_all = [0] * n_pk
        ncb = [0] * n_pk
        m = self.mcs.modulation_order
        for nbytes, idx in self._groups(packets).items():
            plan = plan_packet(nbytes, self.mcs)
            p, c, nsym = len(idx), plan.num_cb, plan.n // m
            ok = np.zeros(p, dtype=bool)
            ntx = np.zeros(p, dtype=np.int64)
            sinr_sum = None
            active = np.arange(p)
            for t in range(self.harq_max_tx):
                if active.size == 0:
                    break
                ntx[active] += 1
                if self._awgn:
                    eff_db = np.full((active.size, c), snr + 10 * math.log10(t + 1))
                else:
                    s = self.channel.post_equalization_snr((active.size * c, nsym), snr_db=snr,
                                                           generator=gen)
                    s = s.reshape(active.size, c, nsym)
                    if sinr_sum is None:
                        sinr_sum = torch.zeros(p, c, nsym, device=s.device)
                    act_t = torch.as_tensor(active, device=s.device)
                    sinr_sum[act_t] += s
                    eff = eesm(sinr_sum[act_t], self._beta).clamp_min(1e-30)
                    eff_db = (10 * torch.log10(eff)).cpu().numpy().astype(np.float64)
                bler = self.table.bler(plan.k, eff_db)
                u = torch.rand(bler.shape, generator=gen, device=gen.device).cpu().numpy()
                good = (u >= bler).all(axis=1)
                ok[active[good]] = True
                active = active[~good]
            per_tx = c * self.channel.channel_uses(nsym)
            for j, i in enumerate(idx):
                success[i] = bool(ok[j])
                uses[i] = int(ntx[j]) * per_tx
                ntx_all[i] = int(ntx[j])
                ncb[i] = c
        delivered = [p if s else None for p, s in zip(packets, success)]
        report: LinkReport = self._report(packets, success, uses, ntx_all, ncb, snr)
        return delivered, report
