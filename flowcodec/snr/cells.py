"""The measurements of an ``snr`` sweep, one cell at a time.

- JSCC: an entry's cells are ``(channel, snr, uses)`` (:func:`jscc_jobs`); :func:`jscc_cell`
  sends the test images' features through the channel and measures the tail's accuracy;
- digital (separation): :func:`digital_tables` codes the images once per rate point,
  :func:`digital_uses` counts the channel uses of each (rate point, MCS), and
  :func:`digital_cell` picks the best pair per budget on the fast link and reruns it on the
  exact link.

A cell's place ``j`` in its list of jobs seeds its channel and generator, so a cell gives
the same row run alone (a Ray unit) or in the serial loop.
"""

from __future__ import annotations

import math

import torch

from flowcodec.errors import ConfigError
from flowcodec.snr.rows import SNRRow, best_digital
from flowcodec.sweeps.runner import map_units

__all__ = ["accuracy_of", "jscc_jobs", "jscc_cell", "jscc_rows", "digital_tables",
           "digital_jobs", "digital_uses", "digital_cell", "digital_base_rows", "digital_rows"]


@torch.no_grad()
def accuracy_of(tail, feats: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> torch.Tensor:
    """Per-image correctness ``(N,)`` bool of the tail on ``feats``."""
    out = [tail(feats[i:i + bs]).argmax(1) == y[i:i + bs] for i in range(0, len(y), bs)]
    return torch.cat(out)


def jscc_jobs(cfg: dict, entry: dict) -> list[tuple]:
    """The cells of a JSCC entry, in order: ``(channel, snr, uses or None)``. A cell's
    place ``j`` in this list seeds its channel and its generator."""
    uses_spec = entry.get("uses", "schedule")
    return [(c, s, u) for c in entry.get("channels", cfg["channels"]) for s in cfg["snrs"]
            for u in ([None] if uses_spec == "schedule" else uses_spec)]  # fmt: skip


@torch.no_grad()
def jscc_cell(codec, label, hs, y, tail, cfg, entry, ch_name, snr, u, j) -> SNRRow | None:
    """The row of one cell (``j``: its place in :func:`jscc_jobs`); ``None`` when the
    codec has fewer than ``u`` symbols."""
    from channels import make_channel

    if u is not None and u > codec.symbols:
        return None
    told = entry.get("told_snr")
    uncoded = bool(entry.get("uncoded", False))
    seed = int(cfg.get("seed", 0))
    ch = make_channel(ch_name, seed=seed + j, coherence=int(cfg.get("coherence", 1)))
    gen = torch.Generator().manual_seed(seed + 1000 + j)
    told_s = float(snr) if told is None else float(told)
    correct, spent = [], 0
    for i in range(0, len(y), 500):
        h = hs[i:i + 500]
        if uncoded:
            f, tx = codec.send_uncoded(h, ch, told_s, u, gen, true_snr_db=float(snr))
        else:
            f, tx = codec.transmit(h, ch, told_s, u, gen, true_snr_db=float(snr))
        correct.append(tail(f).argmax(1) == y[i:i + 500])
        spent += tx.channel_uses
    acc = float(torch.cat(correct).float().mean())
    return SNRRow("jscc", label, ch_name, "uncoded" if uncoded else "analog", float(snr),
                  None if told is None else float(told), u, spent / len(y), acc, len(y),
                  "schedule" if u is None else f"{u} uses")  # fmt: skip


@torch.no_grad()
def jscc_rows(codec, label, hs, y, tail, cfg, entry, channels, progress) -> list[SNRRow]:
    jobs = jscc_jobs(cfg, {**entry, "channels": channels})
    args = [(codec, label, hs, y, tail, cfg, entry, c, s, u, j) for j, (c, s, u) in enumerate(jobs)]
    rows, _ = map_units(jscc_cell, args, desc=f"jscc {label}", progress=progress, leave=False)
    return [r for r in rows if r is not None]


def digital_tables(codec, hs, y, tail, rate_points) -> dict:
    """Per rate point: payload bytes per image, correctness when delivered, and the
    correctness of the concealed (lost) decode."""
    from flowcodec.bitstream import Bitstream

    out = {}
    for r in rate_points:
        view = codec.at_rate(r) if hasattr(codec, "at_rate") else codec
        streams = []
        for i in range(0, len(y), 500):
            streams += view.compress(hs[i:i + 500])
        if any(len(s.packets) != 1 for s in streams):
            raise ConfigError("digital: the codec must send one packet per image "
                              "(e.g. cifar10-task_p2_1p)")  # fmt: skip
        payloads = [bytes(s.packets[0]) for s in streams]
        feats = torch.cat([view.decompress(streams[i:i + 500]) for i in range(0, len(y), 500)])
        ok = accuracy_of(tail, feats, y)
        lost = [Bitstream(streams[0].header, [None])]
        conceal = tail(view.decompress(lost)).argmax(1).expand(len(y)) == y
        out[r] = {"payloads": payloads, "ok": ok, "conceal": conceal}
    return out


def digital_jobs(cfg: dict) -> list[tuple]:
    """The cells of the digital chain, in order: ``(channel, snr)``; a cell's place ``j``
    seeds its channel and link."""
    return [(c, s) for c in cfg["channels"] for s in cfg["snrs"]]


def digital_uses(tables, dcfg) -> dict:
    """Channel uses per image of each (rate point, mcs): flat channels, one use per symbol."""
    from channels import get_mcs
    from channels.link import plan_packet

    uses = {}
    for r, t in tables.items():
        for m in dcfg.get("mcs", list(range(29))):
            mcs = get_mcs(m)
            per_len = {}
            for p in t["payloads"]:
                if len(p) not in per_len:
                    plan = plan_packet(len(p), mcs)
                    per_len[len(p)] = plan.num_cb * plan.n // mcs.modulation_order
            uses[r, m] = torch.tensor([per_len[len(p)] for p in t["payloads"]])
    return uses


def digital_cell(tables, uses, cfg, dcfg, ch_name, snr, j) -> list[SNRRow]:
    """The separation rows of one (channel, SNR) cell, ``j`` its place in
    :func:`digital_jobs`: one per budget on the fast link, and the exact-link rows."""
    from channels import ExactLink, FastLink, get_mcs, make_channel

    seed = int(cfg.get("seed", 0))
    label = dcfg.get("label", "separation")
    mcs_list = dcfg.get("mcs", list(range(29)))
    coh = int(cfg.get("coherence", 1))
    rows = []
    delivered = {}
    for r, t in tables.items():
        for m in mcs_list:
            ch = make_channel(ch_name, seed=seed + j, coherence=coh)
            link = FastLink(mcs=m, channel=ch, snr_db=float(snr), seed=seed + j)
            got, _ = link.transmit(t["payloads"])
            delivered[r, m] = torch.tensor([g is not None for g in got])
    for b in sorted(cfg["budgets"]):
        acc, per = {}, {}
        for (r, m), d in delivered.items():
            t = tables[r]
            fits = uses[r, m] <= b
            good = torch.where(fits & d, t["ok"], t["conceal"])
            acc[r, m] = float(good.float().mean())
            per[r, m] = float(torch.where(fits, uses[r, m], 0).float().mean())
        r, m = best_digital(acc)
        fit_share = float((uses[r, m] <= b).float().mean())
        rows.append(SNRRow("separation", label, ch_name, "fast", float(snr), None, b,
                           per[r, m], acc[r, m], len(tables[r]["ok"]),
                           f"rate point {r}, {get_mcs(m).name}, {100 * fit_share:.0f}% fit"))
        if b in dcfg.get("exact_budgets", []):
            n = min(int(dcfg.get("exact_samples", 500)), len(tables[r]["ok"]))
            t = tables[r]
            ch = make_channel(ch_name, seed=seed + j, coherence=coh)
            link = ExactLink(mcs=m, channel=ch, snr_db=float(snr), seed=seed + j)
            fits = (uses[r, m][:n] <= b)
            sent = [p for p, f in zip(t["payloads"][:n], fits.tolist()) if f]
            ok_exact = torch.zeros(n, dtype=torch.bool)
            if sent:
                got, _ = link.transmit(sent)
                idx = torch.nonzero(fits).squeeze(1)
                for i, g, p in zip(idx.tolist(), got, sent):
                    ok_exact[i] = g == p  # delivered and correct (CRC passed)
            good = torch.where(ok_exact, t["ok"][:n], t["conceal"][:n])
            rows.append(SNRRow("separation", label, ch_name, "exact", float(snr), None, b,
                               float(torch.where(fits, uses[r, m][:n], 0).float().mean()),
                               float(good.float().mean()), n,
                               f"rate point {r}, {get_mcs(m).name} (the fast link's pick)"))
    return rows


def digital_base_rows(tables, dcfg, n: int) -> list[SNRRow]:
    """One row per rate point with no channel: the accuracy of the decoded packets."""
    label = dcfg.get("label", "separation")
    return [SNRRow("separation", f"{label} r{r} (no channel)", "none", "none", math.nan, None,
                   None, 0.0, float(t["ok"].float().mean()), n,
                   f"payload {sum(map(len, t['payloads'])) / n:.2f} B")
            for r, t in tables.items()]  # fmt: skip


def digital_rows(tables, cfg, dcfg, channels, progress) -> list[SNRRow]:
    uses = digital_uses(tables, dcfg)
    jobs = digital_jobs({**cfg, "channels": channels})
    args = [(tables, uses, cfg, dcfg, c, s, j) for j, (c, s) in enumerate(jobs)]
    cells, _ = map_units(digital_cell, args, desc=f"digital {dcfg.get('label', 'separation')}",
                         progress=progress, leave=False)  # fmt: skip
    return [r for cell in cells for r in cell]
