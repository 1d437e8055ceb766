"""Choosing split point, rate point, MCS and exit threshold for the current link.

A :class:`Profile` is measured offline (:func:`build_profile`): for each candidate split
point, codec rate point, packet loss rate and exit threshold, the accuracy of the flow
and the fraction of samples the device answers itself, plus the bytes and packets each
rate point sends and the FLOPs each side spends. :class:`Policy` then searches that table
exhaustively for the configuration of least expected latency whose expected accuracy
stays above a floor, given the uplink's SNR and symbol rate; it re-decides whenever the
SNR changes (:meth:`Policy.track`).

Options are **digital** (a byte-making codec whose packets go through CRC + LDPC + QAM at
an MCS the policy picks; accuracy measured per packet loss rate) or **analog** (a JSCC
codec, ``sends_symbols``: features straight to channel symbols, no MCS and no packet loss;
accuracy measured per SNR of ``snr_grid`` over AWGN, channel uses per sample from the
codec's schedule). The policy compares both kinds at the decision's SNR; a decision says
which it took (``Decision.kind``, ``mcs=None`` for analog).

The packet loss rate of an MCS at an SNR comes from the same BLER tables that
``channels.FastLink`` draws from, so a decision and its simulation agree.

Example
-------
>>> from flowcodec.policy import Policy, toy_profile
>>> pol = Policy(toy_profile(), accuracy_floor=0.8)
>>> d = pol.decide(snr_db=10.0, symbol_rate=1e6)
>>> d.feasible, d.point in (0, 1)
(True, True)
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowcodec.codecs.base import FeatureCodec
from flowcodec.errors import ConfigError
from flowcodec.pipeline import DEFAULT_MAX_CONCEALED, check_max_concealed, concealed_fraction

__all__ = [
    "RatePoint",
    "Profile",
    "Decision",
    "Policy",
    "build_profile",
    "option_receivers",
    "packet_loss_rate",
    "channel_uses",
    "link_adaptation_mcs",
    "toy_profile",
    "LOSS_GRID",
    "SNR_GRID",
    "THRESHOLDS",
]

#: Packet loss rates at which profiles are measured (accuracy is interpolated between).
LOSS_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
#: SNRs (dB, AWGN) at which analog (JSCC) options are measured (accuracy is interpolated
#: between, and held at the ends outside the grid).
SNR_GRID = (-5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0)
#: Exit thresholds tried (``None``: the device never answers itself).
THRESHOLDS: tuple[float | None, ...] = (None, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass
class RatePoint:
    """One (split point, codec) option of a profile.

    ``packet_bytes`` are the link packets one sample sends (header first), measured;
    ``accuracy[threshold][loss index]`` is the flow's accuracy; ``exit_fraction[threshold]``
    the share answered on the device; FLOPs are per sample; ``receiver`` is the member that
    finished the option's samples (None in profiles saved before it was recorded).

    An analog option (``kind="analog"``, a JSCC codec) sends no packets
    (``packet_bytes=[]``): ``accuracy[threshold][i]`` is the accuracy at ``snr_grid[i]`` dB
    (AWGN, the codec told the true SNR); ``analog_uses`` is the most channel uses one sample
    takes and ``uses_schedule`` the codec's ``[min_snr_db, channel uses]`` steps (the uses at
    an SNR are those of the last step not above it; below every step, the first one's).
    The defaults describe a digital option, so profiles saved before analog options existed
    load unchanged.
    """

    point: int
    rate: str
    packet_bytes: list[int]
    device_flops: int  # head + encoder
    exit_flops: int  # the device exit, paid only when a threshold is used
    remote_flops: int  # decoder + rest of the large member
    accuracy: dict[str, list[float]]
    exit_fraction: dict[str, float]
    kind: str = "digital"
    analog_uses: int = 0
    snr_grid: list[float] = field(default_factory=list)
    uses_schedule: list[list[float]] = field(default_factory=list)
    receiver: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("digital", "analog"):
            raise ConfigError(f"option kind must be 'digital' or 'analog', got {self.kind!r}")
        if self.kind == "analog":
            n = len(self.snr_grid)
            if n == 0 or any(b <= a for a, b in zip(self.snr_grid, self.snr_grid[1:])):
                raise ConfigError(f"analog option {self.point}/{self.rate}: snr_grid must be "
                                  f"a non-empty increasing list, got {self.snr_grid}")  # fmt: skip
            if any(len(v) != n for v in self.accuracy.values()):
                raise ConfigError(f"analog option {self.point}/{self.rate}: every accuracy "
                                  f"list needs one value per snr_grid entry ({n})")  # fmt: skip
            if not self.analog_uses >= 1:
                raise ConfigError(f"analog option {self.point}/{self.rate}: analog_uses must "
                                  f"be at least 1, got {self.analog_uses}")  # fmt: skip

    @property
    def bytes_per_sample(self) -> int:
        return sum(self.packet_bytes)

    @property
    def is_analog(self) -> bool:
        return self.kind == "analog"

    def uses_at(self, snr_db: float) -> int:
        """Channel uses per sample of an analog option at ``snr_db`` (its schedule's step,
        or ``analog_uses`` without one)."""
        if not self.uses_schedule:
            return int(self.analog_uses)
        steps = sorted((float(s), int(n)) for s, n in self.uses_schedule)
        n = steps[0][1]
        for s, k in steps:
            if snr_db >= s:
                n = k
        return n


def _tkey(t: float | None) -> str:
    return "none" if t is None else f"{t:g}"


@dataclass
class Profile:
    """A measured table of options, saved and loaded as JSON."""

    options: list[RatePoint]
    loss_grid: list[float] = field(default_factory=lambda: list(LOSS_GRID))
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"loss_grid": self.loss_grid, "meta": self.meta,
                                          "options": [asdict(o) for o in self.options]}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        try:
            d = json.loads(Path(path).read_text())
            return cls([RatePoint(**o) for o in d["options"]], d["loss_grid"], d.get("meta", {}))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not a flowcodec profile: {e}") from e


def packet_loss_rate(nbytes: int, mcs, snr_db: float) -> float:
    """Probability that one packet of ``nbytes`` fails at ``snr_db`` over AWGN with ``mcs``
    (all its code blocks must decode), from the links' BLER tables."""
    from channels.mcs import get_mcs

    return _packet_loss_rate(int(nbytes), get_mcs(mcs), float(snr_db))


@functools.lru_cache(maxsize=65536)
def _packet_loss_rate(nbytes: int, mcs, snr_db: float) -> float:
    from channels.abstraction import load_project_tables, load_sionna_tables
    from channels.link import plan_packet

    table = _TABLES.get(mcs.index)
    if table is None:
        table = load_project_tables().get(mcs.index) or load_sionna_tables().get(mcs.index)
        _TABLES[mcs.index] = table
    plan = plan_packet(nbytes, mcs)
    bler = float(np.asarray(table.bler(plan.k, np.array([snr_db]))).reshape(-1)[0])
    return 1.0 - (1.0 - min(max(bler, 0.0), 1.0)) ** plan.num_cb


_TABLES: dict = {}


def link_adaptation_mcs(packet_bytes: Sequence[int], snr_db: float, target: float = 0.1,
                        mcs_indices: Sequence[int] = tuple(range(29))) -> int:  # fmt: skip
    """Link adaptation: the highest MCS at which every packet size in ``packet_bytes`` fails
    with probability at most ``target`` over AWGN at ``snr_db`` (the lowest MCS if none)."""
    ok = [m for m in mcs_indices
          if max(packet_loss_rate(b, m, snr_db) for b in packet_bytes) <= target]  # fmt: skip
    return max(ok) if ok else min(mcs_indices)


def channel_uses(nbytes: int, mcs) -> int:
    """Complex channel uses of one transmission of a packet of ``nbytes`` with ``mcs``."""
    from channels.mcs import get_mcs

    return _channel_uses(int(nbytes), get_mcs(mcs))


@functools.lru_cache(maxsize=65536)
def _channel_uses(nbytes: int, mcs) -> int:
    from channels.link import plan_packet

    plan = plan_packet(nbytes, mcs)
    return plan.num_cb * (plan.n // mcs.modulation_order)


@dataclass
class Decision:
    """What the policy chose, and what it expects.

    ``kind`` is ``"digital"`` (packets at MCS ``mcs``) or ``"analog"`` (a JSCC codec's
    symbols: ``mcs`` is None, ``packet_loss`` 0, ``channel_uses`` the uses per sample)."""

    point: int
    rate: str
    mcs: int | None
    threshold: float | None
    expected_accuracy: float
    expected_latency_s: float
    packet_loss: float
    feasible: bool
    decide_time_s: float = 0.0
    kind: str = "digital"
    channel_uses: int = 0


class Policy:
    """Exhaustive search of a profile for the least expected latency above a floor.

    Parameters
    ----------
    profile : Profile
    accuracy_floor : float
        Required expected accuracy; if nothing reaches it, the most accurate option is
        returned with ``feasible=False``.
    device_flops_per_s, remote_flops_per_s : float
        Compute capabilities (see :data:`flowcodec.pipeline.DEFAULT_TIERS`).
    delay_s : float
        Fixed delay added to every sample that leaves the device.
    mcs_indices : sequence of int
        MCS candidates (default: the whole 5G NR table 1).
    """

    def __init__(self, profile: Profile, accuracy_floor: float,
                 device_flops_per_s: float = 20e9, remote_flops_per_s: float = 20e12,
                 delay_s: float = 0.0, mcs_indices: Sequence[int] = tuple(range(29))):  # fmt: skip
        if not profile.options:
            raise ConfigError("empty profile")
        self.profile = profile
        self.floor = accuracy_floor
        self.dev_fps, self.rem_fps, self.delay = device_flops_per_s, remote_flops_per_s, delay_s
        self.mcs_indices = list(mcs_indices)

    def evaluate(self, opt: RatePoint, mcs: int | None, threshold: float | None,
                 snr_db: float, symbol_rate: float) -> tuple[float, float, float]:  # fmt: skip
        """(expected accuracy, expected latency in s, packet loss) of one configuration.

        For an analog option ``mcs`` is ignored (pass None): the accuracy is interpolated
        over its ``snr_grid`` at ``snr_db`` and the transmission takes its channel uses at
        that SNR over ``symbol_rate``; packet loss is 0."""
        ex = opt.exit_fraction[_tkey(threshold)]
        dev = opt.device_flops + (opt.exit_flops if threshold is not None else 0)
        if opt.is_analog:
            acc = float(np.interp(snr_db, opt.snr_grid, opt.accuracy[_tkey(threshold)]))
            remote = (opt.uses_at(snr_db) / symbol_rate + self.delay
                      + opt.remote_flops / self.rem_fps)  # fmt: skip
            return acc, dev / self.dev_fps + (1 - ex) * remote, 0.0
        if mcs is None:
            raise ConfigError(f"digital option {opt.point}/{opt.rate} needs an MCS")
        loss = float(np.mean([packet_loss_rate(b, mcs, snr_db) for b in opt.packet_bytes]))
        acc = float(np.interp(loss, self.profile.loss_grid, opt.accuracy[_tkey(threshold)]))
        uses = sum(channel_uses(b, mcs) for b in opt.packet_bytes)
        remote = uses / symbol_rate + self.delay + opt.remote_flops / self.rem_fps
        return acc, dev / self.dev_fps + (1 - ex) * remote, loss

    def decide(self, snr_db: float, symbol_rate: float) -> Decision:
        """The best configuration for an uplink at ``snr_db`` and ``symbol_rate``."""
        if not math.isfinite(snr_db) or not symbol_rate > 0:
            raise ConfigError("snr_db must be finite and symbol_rate positive")
        t0 = time.perf_counter()
        best, fallback = None, None
        for opt in self.profile.options:
            thresholds = [None] if opt.point == 0 else [
                None if k == "none" else float(k) for k in opt.exit_fraction]  # fmt: skip
            if opt.is_analog:
                mcs_list: list[int | None] = [None]
            else:
                mcs_list = self.mcs_indices if opt.packet_bytes else [self.mcs_indices[0]]
            for mcs in mcs_list:
                for thr in thresholds:
                    acc, lat, loss = self.evaluate(opt, mcs, thr, snr_db, symbol_rate)
                    d = Decision(opt.point, opt.rate, mcs, thr, acc, lat, loss, acc >= self.floor,
                                 kind=opt.kind,
                                 channel_uses=opt.uses_at(snr_db) if opt.is_analog else 0)
                    if d.feasible and (best is None or lat < best.expected_latency_s):
                        best = d
                    if fallback is None or (acc, -lat) > (fallback.expected_accuracy,
                                                          -fallback.expected_latency_s):
                        fallback = d
        out = best or fallback
        assert out is not None
        if out.kind == "digital" and out.mcs is not None:
            opt = next(o for o in self.profile.options if (o.point, o.rate, o.kind)
                       == (out.point, out.rate, "digital"))  # fmt: skip
            out.channel_uses = sum(channel_uses(b, out.mcs) for b in opt.packet_bytes)
        out.decide_time_s = time.perf_counter() - t0
        return out

    def track(self, snr_trace_db: Sequence[float], symbol_rate: float) -> list[Decision]:
        """Re-decide at every SNR of a trace (e.g. along a fading trace)."""
        return [self.decide(float(s), symbol_rate) for s in snr_trace_db]


def option_receivers(family, member: int | None,
                     options: Sequence[tuple[int, str]]) -> dict[tuple[int, str], int]:  # fmt: skip
    """The member that receives each option ``(split point, rate name)``.

    Parameters
    ----------
    family : EarlyExitFamily
    member : int or None
        None: each option is received by the largest member whose path passes through its
        point (``family.receiver(point)``; for a chain family, the last member). An int: that
        member receives every option, and each option's point must be on its path.
    options : sequence of (int, str)
        The options' ``(split point, rate name)`` keys.

    Returns
    -------
    dict
        ``{(point, rate): member}``, in the order of ``options``.

    Raises
    ------
    ConfigError
        Naming every option whose point ``member`` does not pass through, its path, and the
        member that does receive from there.

    Example
    -------
    >>> from flowcodec.family import build_family
    >>> fam = build_family("cifar10-cloud", width=8)  # member 4 branches after stage 1
    >>> option_receivers(fam, None, [(1, "a"), (2, "b")])
    {(1, 'a'): 4, (2, 'b'): 3}
    """
    if member is None:
        return {(p, r): family.receiver(p) for p, r in options}
    path = family.path(member)
    off = [(p, r) for p, r in options if p not in path]
    if off:
        raise ConfigError(
            f"member {member} passes through split points {path} only: "
            + "; ".join(f"option (point {p}, rate {r!r}) is sent from point {p}, off its path "
                        f"(family.receiver({p}) = member {family.receiver(p)} receives from "
                        f"there)" for p, r in off)
            + "; set member to one whose path holds every option's point, or leave it unset "
              "(null) for family.receiver(point) at each point")  # fmt: skip
    return {(p, r): member for p, r in options}


@torch.no_grad()
def build_profile(
    family,
    member: int | None,
    options: Mapping[tuple[int, str], FeatureCodec],
    data,
    batch_size: int = 500,
    loss_grid: Sequence[float] = LOSS_GRID,
    thresholds: Sequence[float | None] = THRESHOLDS,
    seed: int = 0,
    progress: bool = True,
    framing: str = "sample",
    snr_grid: Sequence[float] = SNR_GRID,
    max_concealed: float | None = DEFAULT_MAX_CONCEALED,
) -> Profile:
    """Measure a profile of ``family`` on ``data`` (an ArrayDataset).

    ``options`` maps ``(split point, rate name)`` to a codec for the features at that
    point. ``member`` receives every option (each option's point must be on its path), or,
    when None, each option is received by the largest member whose path passes through its
    point (:func:`option_receivers`; a chain family's last member); ``RatePoint.receiver``
    records which. Each sample's link packets (``Bitstream.units(framing)``: with the default
    ``"sample"`` framing the header is one of them) are dropped i.i.d. at each loss rate of
    ``loss_grid``; the receiver conceals what is lost. As in a :class:`~flowcodec.pipeline.Flow`,
    a sample more than ``max_concealed`` of whose packets were concealed is answered by the
    device's exit at the split point (when it has one, point >= 1), so the profile predicts
    what the flow does; ``None`` measures the concealed answers instead. (The exit's FLOPs
    on those samples are not in ``exit_flops``, which counts the exit a threshold runs.)

    An analog (JSCC) codec (``sends_symbols``) is profiled as an analog option: each batch
    is sent through ``channels.AWGN`` at every SNR of ``snr_grid`` (the codec told the true
    SNR, channel uses from its schedule), noise drawn from the profile's seeded generator.
    """
    from flowcodec.bitstream import Bitstream
    from flowcodec.flops import count_flops
    from flowcodec.progress import tqdm

    max_concealed = check_max_concealed(max_concealed)
    receivers = option_receivers(family, member, list(options))
    fam = family.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    snr_grid = [float(s) for s in snr_grid]
    if any(not math.isfinite(s) for s in snr_grid) or snr_grid != sorted(set(snr_grid)):
        raise ConfigError(f"snr_grid must be finite and strictly increasing, got {snr_grid}")
    analog = {k: bool(getattr(c, "sends_symbols", False)) for k, c in options.items()}
    if any(analog.values()) and not snr_grid:
        raise ConfigError("analog (JSCC) options need a non-empty snr_grid")
    total = sum(len(snr_grid) if analog[k] else len(loss_grid) for k in options)
    bar = tqdm(total=total, desc="profile", disable=not progress, leave=False)
    for (point, rate), codec in options.items():
        receiver = receivers[(point, rate)]
        head, tail = fam.split(receiver, point)
        grid = snr_grid if analog[(point, rate)] else list(loss_grid)
        exit_ok, exit_conf, remote_ok = [], [], {g: [] for g in grid}
        packet_bytes = None
        for x, y in data.batches(batch_size):
            h = head(x)
            if point >= 1:
                lg = fam.exits[point - 1](h)
                exit_conf.append(lg.softmax(1).amax(1))
                exit_ok.append(lg.argmax(1) == y)
            if analog[(point, rate)]:
                from channels import AWGN

                for snr in grid:
                    feats, _ = codec.transmit(h, AWGN(), snr, None, gen)
                    remote_ok[snr].append(tail(feats).argmax(1) == y)
                continue
            streams = codec.compress(h)
            exit_right = lg.argmax(1) == y if point >= 1 else None
            if packet_bytes is None:
                s = streams[0]
                packet_bytes = [len(u) for u in s.units(framing)]
            units = [s.units(framing) for s in streams]
            for loss in loss_grid:
                rec = []
                for s, us in zip(streams, units):
                    drop = (torch.rand(len(us), generator=gen) < loss).tolist()
                    got = [None if d else u for d, u in zip(drop, us)]
                    rec.append(Bitstream.from_units(s.header, got, framing))
                ok = tail(codec.decompress(rec)).argmax(1) == y
                if max_concealed is not None and exit_right is not None:
                    fall = torch.tensor([concealed_fraction(r) > max_concealed for r in rec])
                    ok = torch.where(fall, exit_right, ok)
                remote_ok[loss].append(ok)
        bar.update(len(grid))
        r_ok = {g: torch.cat(v).float() for g, v in remote_ok.items()}
        accuracy, exit_fraction = {}, {}
        for thr in thresholds if point >= 1 else [None]:
            if thr is None:
                took = torch.zeros_like(r_ok[grid[0]], dtype=torch.bool)
                e_ok = took.float()
            else:
                took = torch.cat(exit_conf) >= thr
                e_ok = torch.cat(exit_ok).float()
            exit_fraction[_tkey(thr)] = float(took.float().mean())
            accuracy[_tkey(thr)] = [
                float(torch.where(took, e_ok, r_ok[g]).mean()) for g in grid
            ]
        # Counting FLOPs may leave a codec in training mode (a JSCC codec's encoder wrapper
        # is a fresh module, and count_flops restores *its* mode): keep the caller's.
        was_training = codec.training
        dev_flops = (fam.head_flops(point) if point else 0) + codec.encoder_flops()
        exit_flops = count_flops(fam.exits[point - 1], fam.feature_shape(point)) if point else 0
        rem = count_flops(tail, fam.feature_shape(point))
        rem += getattr(codec, "decoder_flops", lambda: 0)()
        codec.train(was_training)
        if analog[(point, rate)]:
            from channels import AWGN

            ch = AWGN()
            # The codec's schedule (a first step at -inf is written finite: JSON).
            sched = [[s if math.isfinite(s) else -1e9, ch.channel_uses(n)]
                     for s, n in codec.schedule]  # fmt: skip
            out.append(RatePoint(point, rate, [], dev_flops, exit_flops, rem, accuracy,
                                 exit_fraction, "analog", ch.channel_uses(codec.symbols),
                                 list(snr_grid), sched, receiver=receiver))  # fmt: skip
            continue
        out.append(RatePoint(point, rate, packet_bytes or [], dev_flops, exit_flops, rem,
                             accuracy, exit_fraction, receiver=receiver))  # fmt: skip
    bar.close()
    return Profile(out, list(loss_grid), {"member": member, "samples": len(data),
                                          "framing": framing,
                                          "max_concealed": max_concealed})  # fmt: skip


def toy_profile() -> Profile:
    """A small hand-written profile (for examples and tests): send the input (point 0,
    2 kB, accurate) or features at point 1 at two rates (with a device exit)."""
    grid = [0.0, 0.5, 1.0]

    def acc(a0, a1):
        return [a0, (a0 + a1) / 2, a1]

    return Profile([
        RatePoint(0, "input", [40, 2000], 0, 0, 2_000_000_000,
                  {"none": acc(0.90, 0.10)}, {"none": 0.0}),
        RatePoint(1, "high", [40, 300, 300], 400_000_000, 10_000_000, 1_600_000_000,
                  {"none": acc(0.90, 0.20), "0.9": acc(0.89, 0.50)},
                  {"none": 0.0, "0.9": 0.5}),
        RatePoint(1, "low", [40, 60], 400_000_000, 10_000_000, 1_600_000_000,
                  {"none": acc(0.85, 0.20), "0.9": acc(0.86, 0.50)},
                  {"none": 0.0, "0.9": 0.5}),
    ], grid)  # fmt: skip
