"""``flowcodec latency``: latency and accuracy of the adaptive flow against baselines.

The scenario (all figures in the config under ``experiments/``):

- the device hosts the family's smallest member and computes up to a split point;
- an uplink (``channels.FastLink`` over AWGN at a given SNR and symbol rate) reaches an
  edge server that hosts the receiving members; a wired backhaul (fixed delay) reaches a
  cloud that hosts them too. ``"member"`` in the config names the one member that receives
  every option (each option's split point must be on its path, ``family.path``); unset (the
  default), an option at split point ``p`` is received by ``family.receiver(p)``, the
  largest member whose path passes through ``p`` (for a chain family, the last member;
  a branching family's cloud member receives only from the points it passes through).
  Every row's ``receiver`` column says which member answered it;
- **adaptive flow**: :class:`~flowcodec.policy.Policy` picks split point, codec rate
  point, MCS and device exit threshold for the current SNR from a measured profile, with
  the accuracy floor set 1 point below the cloud-only baseline's accuracy on a clean
  link;
- **fixed split**: a configured split and rate point with the MCS the policy picks at the
  reference SNR, kept at every SNR, no exits;
- **cloud only** / **edge only**: the input image, compressed by the configured input
  codec (JPEG), sent with link adaptation (the highest MCS whose packet error rate is at
  most ``target_bler``) and HARQ, run through ``member`` (default: the largest) in the
  cloud or at the edge;
- **device only**: the smallest member on the device, no link.

``"framing"`` in the config (``"sample"`` by default, or ``"session"``) says whether every
sample sends its bitstream header over the uplink or the header went once at session
set-up (``Bitstream.units``); it applies to every scheme alike.

The profile is measured on the first half of the evaluation samples and every scheme is
evaluated on the second half, so no decision is tuned on the samples it is scored on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowcodec.config import validate_latency_config
from flowcodec.errors import ConfigError
from flowcodec.sweeps.codec_spec import codec_from_spec
from flowcodec.sweeps.runner import Sweep, map_units, raise_failures, worker_context, write_csv

__all__ = ["LatencyConfig", "run_latency", "add_parser", "load_option_codec", "SWEEP"]


@dataclass
class LatencyConfig:
    dataset: str
    options: list[dict]
    input_codec: dict
    fixed_split: dict
    member: int | None = None  # receives every option (default: family.receiver(point))
    samples: int = 2000
    seed: int = 0
    compute: dict | None = None
    delay_s: dict | None = None
    symbol_rates: list[float] | None = None
    snrs_db: list[float] | None = None
    reference: dict | None = None
    harq_max_tx_baselines: int = 4
    target_bler: float = 0.1
    framing: str = "sample"
    floor_points: float = 1.0
    cell_seeds: bool = False
    family: str | None = None  # the trained family (default: the one named like the dataset)

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> LatencyConfig:
        """The config ``path`` names (a path, or a name such as ``digits``), with
        ``overrides`` set, checked whole."""
        cfg = cls(**SWEEP.load(path, overrides))
        SWEEP.mark_checked(asdict(cfg))  # the same config with its defaults filled in
        return cfg

    def __post_init__(self) -> None:
        self.compute = {"device": 20e9, "edge": 2e12, "cloud": 20e12, **(self.compute or {})}
        self.delay_s = {"edge": 0.002, "cloud": 0.030, **(self.delay_s or {})}
        self.symbol_rates = self.symbol_rates or [1e6]
        self.snrs_db = self.snrs_db or [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0]
        self.reference = self.reference or {"snr_db": 10.0, "symbol_rate": 1e6}


def load_option_codec(spec: dict, family, train_data=None, progress: bool = True):
    """Build the codec an option names (:func:`~flowcodec.sweeps.codec_from_spec`):
    ``pretrained`` (codec zoo name), ``checkpoint`` (path), or ``codec`` + ``kwargs``
    (fitted on training features when ``fit`` is set, trained with ``train`` arguments for
    learned codecs); ``rate_point`` picks a rate point of a variable-rate codec."""
    return codec_from_spec(spec, family, int(spec["point"]), train_data=train_data,
                           progress=progress, what=f"option {spec.get('rate')}")  # fmt: skip


def run_latency(cfg: LatencyConfig, out: Path, progress: bool = True,
                engine=None, family=None) -> list[dict]:  # fmt: skip
    """Run the experiment; writes ``latency.csv``, ``profile.json`` and plots in ``out``.

    ``family`` (optional, serial runs only) replaces the trained family the config names
    (tests).

    With ``cfg.cell_seeds`` every (symbol rate, SNR) cell draws its channel from its own
    generator (seeded by the config's seed and the cell's place in the grid), so cells are
    independent units; ``engine`` (a :class:`~flowcodec.scale.RayEngine`, which needs
    ``cell_seeds``) runs each cell as a Ray task that loads the family, data and codecs by
    name, and gives the same rows as the serial run of the same config. Without
    ``cell_seeds`` one generator runs through the cells in order (the earlier behaviour).
    """
    SWEEP.check(asdict(cfg))  # whole, before any work
    if engine is not None:
        _check_cell_seeds(cfg.cell_seeds)
        if family is not None:
            raise ConfigError("a Ray engine loads the family by its name in every task: "
                              "family= is for serial runs")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    ctx = _LatencyContext(cfg, progress, family)
    t0 = time.perf_counter()
    from flowcodec.policy import build_profile

    profile = build_profile(ctx.fam, cfg.member, ctx.codecs, ctx.prof_data, progress=progress,
                            seed=cfg.seed, framing=cfg.framing)  # fmt: skip
    profile.meta.update(seconds=round(time.perf_counter() - t0, 1))
    profile.save(out / "profile.json")
    grid = [(r, s) for r in cfg.symbol_rates for s in cfg.snrs_db]
    if engine is not None:
        rows = _run_latency_ray(cfg, grid, out, engine)
    else:
        setup = ctx.setup(profile)
        gen = torch.Generator().manual_seed(cfg.seed)  # without cell_seeds: one for all cells

        def cell(i: int, sym_rate: float, snr: float) -> list[dict]:
            g = _cell_generator(cfg.seed, i) if cfg.cell_seeds else gen
            return _cell_rows(cfg, ctx, setup, sym_rate, snr, g)

        cells, _ = map_units(cell, [(i, r, s) for i, (r, s) in enumerate(grid)], desc="latency",
                             progress=progress, leave=False)  # fmt: skip
        rows = [row for c in cells for row in c]
    _write(rows, out)
    return rows


def _check_cell_seeds(cell_seeds: bool) -> None:
    if not cell_seeds:
        raise ConfigError('a latency run on Ray computes grid cells independently: set '
                          '"cell_seeds": true in the config (each cell then draws its '
                          'channel from its own generator; a serial run of that config '
                          'gives the same rows)')  # fmt: skip


def _cell_generator(seed: int, index: int) -> torch.Generator:
    """The generator of grid cell ``index`` (``cell_seeds``): independent of the others."""
    return torch.Generator().manual_seed(1_000_003 * (int(seed) + 1) + int(index))


class _LatencyContext:
    """What every cell of a latency run shares: the family, the member that receives each
    option, the data halves and the options' codecs (built, fitted or trained once per
    process)."""

    def __init__(self, cfg: LatencyConfig, progress: bool, family=None) -> None:
        from flowcodec.data import load_dataset
        from flowcodec.family import load_pretrained
        from flowcodec.policy import option_receivers

        self.cfg = cfg
        self.fam = fam = family if family is not None else load_pretrained(
            cfg.family or cfg.dataset, progress=progress)  # fmt: skip
        # checked before any codec is built: an explicit member must pass through every point
        self.receivers = option_receivers(fam, cfg.member, [(int(o["point"]), o["rate"])
                                                            for o in cfg.options])  # fmt: skip
        self.member = cfg.member or fam.receiver(0)  # receives the input image (baselines)
        train, test = load_dataset(cfg.dataset)
        data = test.subset(min(cfg.samples, len(test)), seed=cfg.seed)
        half = len(data) // 2
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 1))
        self.prof_idx, self.eval_idx = idx[:half], idx[half:]
        self.prof_data = data.take(self.prof_idx)
        self.eval_data = data.take(self.eval_idx)
        self.x_eval = data.normalize(data.images[self.eval_idx])
        self.y_eval = data.labels[self.eval_idx]
        self.codecs = {(int(o["point"]), o["rate"]): load_option_codec(o, fam, train, progress)
                       for o in cfg.options}  # fmt: skip
        input_spec = {"point": 0, "rate": "input", **cfg.input_codec}
        self.in_codec = load_option_codec(input_spec, fam, train, progress)
        probe = self.in_codec.compress(self.x_eval[:1])[0]
        self.in_bytes = [len(u) for u in probe.units(cfg.framing)]
        self._setup = None

    def setup(self, profile) -> dict:
        """Accuracy floor, policy, fixed split and device-only accuracy (deterministic)."""
        if self._setup is not None and self._setup["profile"] is profile:
            return self._setup
        from channels import IIDPacketErasure
        from flowcodec.family.train import accuracy
        from flowcodec.pipeline import Flow, Hop, Tier
        from flowcodec.policy import Policy

        cfg, fam, comp, delay = self.cfg, self.fam, self.cfg.compute, self.cfg.delay_s
        # Cloud-only accuracy on a clean link, through the real codec: the accuracy floor.
        ref_flow = Flow(fam, [Tier("device", comp["device"], 0), Tier("cloud", comp["cloud"],
                        self.member)], [Hop(self.in_codec, IIDPacketErasure(0.0), 1e9,
                                            framing=cfg.framing)])  # fmt: skip
        floor_acc = ref_flow.run(self.x_eval).accuracy(self.y_eval)
        floor = floor_acc - cfg.floor_points / 100
        policy = Policy(profile, floor, comp["device"], comp["edge"], delay["edge"])
        ref = cfg.reference
        fixed_rate = cfg.fixed_split["rate"]
        fixed_point = int(cfg.fixed_split.get("point", 1))
        fixed_opt = next(o for o in profile.options
                         if (o.point, o.rate) == (fixed_point, fixed_rate))  # fmt: skip
        fixed_mcs = _best_mcs_for(policy, fixed_opt, ref["snr_db"], ref["symbol_rate"])
        dev_acc = accuracy(fam.member(1), self.eval_data)
        self._setup = dict(profile=profile, floor_acc=floor_acc, policy=policy,
                           fixed_rate=fixed_rate, fixed_point=fixed_point, fixed_mcs=fixed_mcs,
                           dev_acc=dev_acc)  # fmt: skip
        return self._setup


def _cell_rows(cfg: LatencyConfig, ctx: _LatencyContext, setup: dict, sym_rate: float,
               snr: float, gen: torch.Generator) -> list[dict]:  # fmt: skip
    """Every scheme's row at one (symbol rate, SNR) cell of the grid."""
    from channels import FastLink
    from flowcodec.pipeline import Flow, Hop, Tier
    from flowcodec.policy import link_adaptation_mcs

    fam, member, comp, delay = ctx.fam, ctx.member, cfg.compute, cfg.delay_s
    x_eval, y_eval, codecs = ctx.x_eval, ctx.y_eval, ctx.codecs
    policy, fixed_point, fixed_rate = setup["policy"], setup["fixed_point"], setup["fixed_rate"]
    fixed_mcs = setup["fixed_mcs"]
    rows = []
    base = {"symbol_rate": sym_rate, "snr_db": snr}
    # Device only.
    rows.append({**base, "scheme": "device-only", "accuracy": setup["dev_acc"],
                 "latency_ms": 1e3 * fam.info()[0].flops / comp["device"],
                 "bytes": 0, "mcs": "", "config": "member 1", "exit_device": 1.0,
                 "receiver": ""})  # fmt: skip
    # Cloud only and edge only: the input image with link adaptation and HARQ.
    mcs_in = link_adaptation_mcs(ctx.in_bytes, snr, cfg.target_bler)
    for scheme, tier, d in (("cloud-only", "cloud", delay["cloud"]),
                            ("edge-only", "edge", delay["edge"])):  # fmt: skip
        link = FastLink(mcs=mcs_in, snr_db=snr, harq_max_tx=cfg.harq_max_tx_baselines,
                        seed=cfg.seed)  # fmt: skip
        fl = Flow(fam, [Tier("device", comp["device"], 0), Tier(tier, comp[tier], member)],
                  [Hop(ctx.in_codec, link, sym_rate, d, framing=cfg.framing)])  # fmt: skip
        r = fl.run(x_eval, generator=gen)
        rows.append({**base, "scheme": scheme, **_summary(r, y_eval), "mcs": mcs_in,
                     "config": f"{cfg.input_codec.get('codec')} "
                               f"{cfg.input_codec.get('kwargs', {})}",
                     "receiver": member})  # fmt: skip
    # Fixed split.
    recv = ctx.receivers[(fixed_point, fixed_rate)]
    rows.append({**base, "scheme": "fixed-split", "mcs": fixed_mcs,
                 "config": f"point {fixed_point}, {fixed_rate}", "receiver": recv,
                 **_run_option(fam, recv, codecs[(fixed_point, fixed_rate)], fixed_point,
                               None, fixed_mcs, snr, sym_rate, comp, delay, x_eval, y_eval,
                               gen, cfg.framing)})  # fmt: skip
    # Adaptive flow.
    t1 = time.perf_counter()
    dec = policy.decide(snr, sym_rate)
    dt = time.perf_counter() - t1
    # An analog (JSCC) choice has no MCS: it runs through an analog hop (AWGN at the SNR).
    recv = ctx.receivers[(dec.point, dec.rate)]
    rows.append({**base, "scheme": "adaptive", "mcs": "" if dec.mcs is None else dec.mcs,
                 "kind": dec.kind,
                 "config": f"point {dec.point}, {dec.rate}, exit>={dec.threshold}",
                 "decide_ms": 1e3 * dt, "expected_accuracy": dec.expected_accuracy,
                 "expected_latency_ms": 1e3 * dec.expected_latency_s, "receiver": recv,
                 **_run_option(fam, recv, codecs[(dec.point, dec.rate)], dec.point,
                               dec.threshold, dec.mcs, snr, sym_rate, comp, delay, x_eval,
                               y_eval, gen, cfg.framing)})  # fmt: skip
    adaptive = rows[-1]
    # Edge only with the input codec of least latency that is as accurate as the
    # adaptive flow's choice (within the profile's standard error).
    m = _matched_input(policy, dec, snr, sym_rate, len(ctx.prof_idx))
    if m is not None:
        opt, mcs_m = m
        recv = ctx.receivers[(0, opt.rate)]
        rows.append({**base, "scheme": "edge-only-matched", "mcs": mcs_m,
                     "config": f"input {opt.rate}", "receiver": recv,
                     **_run_option(fam, recv, codecs[(0, opt.rate)], 0, None, mcs_m, snr,
                                   sym_rate, comp, delay, x_eval, y_eval, gen,
                                   cfg.framing)})  # fmt: skip
        adaptive["speedup_vs_edge_matched"] = rows[-1]["latency_ms"] / adaptive["latency_ms"]
    for r in rows:
        r["cloud_only_clean_accuracy"] = setup["floor_acc"]
    return rows


def latency_unit(cfg_dict: dict, profile_dict: dict, index: int) -> list[dict]:
    """One grid cell of a latency run, as a Ray task runs it: the family, data and codecs
    are loaded by name once per worker process; the profile comes from the driver (a small
    JSON object)."""
    from flowcodec.policy import Profile, RatePoint

    ctx, profiles = worker_context("latency", cfg_dict, lambda: (
        _LatencyContext(LatencyConfig(**cfg_dict), False), {}))  # fmt: skip
    pkey = json.dumps(profile_dict, sort_keys=True)
    if pkey not in profiles:
        profiles.clear()
        d = profile_dict
        profiles[pkey] = Profile([RatePoint(**o) for o in d["options"]], d["loss_grid"],
                                 d.get("meta", {}))  # fmt: skip
    setup = ctx.setup(profiles[pkey])
    cfg = ctx.cfg
    grid = [(r, s) for r in cfg.symbol_rates for s in cfg.snrs_db]
    sym_rate, snr = grid[index]
    return _cell_rows(cfg, ctx, setup, sym_rate, snr, _cell_generator(cfg.seed, index))


def _run_latency_ray(cfg: LatencyConfig, grid: list, out: Path, engine) -> list[dict]:
    """The grid cells of a latency run on a Ray engine; rows in the serial run's order."""
    cfg_dict = asdict(cfg)
    profile_dict = json.loads((out / "profile.json").read_text())
    labels = [f"{r:g} symbol/s, {s:g} dB" for r, s in grid]
    args = [(cfg_dict, profile_dict, i) for i in range(len(grid))]
    results, failures = map_units(latency_unit, args, labels, engine=engine,
                                  desc="latency (ray)")  # fmt: skip
    rows = [row for res in results if res is not None for row in res]
    raise_failures(failures, rows, out, lambda rs: _write(rs, out))
    return rows


def _matched_input(policy, dec, snr, sym_rate, n):
    """``(option, mcs)`` of the input-codec option (split point 0) of least expected latency
    whose expected accuracy is at least the decision's, less one standard error of the
    profile (``n`` samples); the most accurate one if none is. None without such options."""
    import math

    se = math.sqrt(max(dec.expected_accuracy * (1 - dec.expected_accuracy), 1e-12) / max(n, 1))
    best, most = None, None
    for opt in policy.profile.options:
        if opt.point != 0 or opt.is_analog:
            continue
        for mcs in policy.mcs_indices:
            acc, lat, _ = policy.evaluate(opt, mcs, None, snr, sym_rate)
            if acc >= dec.expected_accuracy - se and (best is None or lat < best[0]):
                best = (lat, opt, mcs)
            if most is None or (acc, -lat) > most[0]:
                most = ((acc, -lat), opt, mcs)
    if best is not None:
        return best[1], best[2]
    return (most[1], most[2]) if most is not None else None


def _best_mcs_for(policy, opt, snr, sym_rate) -> int | None:
    """The MCS of least expected latency that keeps the floor; if none does, the MCS of
    highest expected accuracy (the fastest among equals). None for an analog option."""
    if opt.is_analog:
        return None
    scored = [(policy.evaluate(opt, m, None, snr, sym_rate), m) for m in policy.mcs_indices]
    ok = [(lat, m) for (acc, lat, _), m in scored if acc >= policy.floor]
    if ok:
        return min(ok)[1]
    return max(scored, key=lambda s: (round(s[0][0], 4), -s[0][1]))[1]


def _summary(res, y) -> dict:
    mix = res.exit_mix()
    return {"accuracy": res.accuracy(y), "latency_ms": 1e3 * res.mean_latency_s,
            "bytes": res.mean_bits(0) / 8, "exit_device": mix.get("device", 0.0)}  # fmt: skip


def _run_option(fam, member, codec, point, threshold, mcs, snr, sym_rate, comp, delay, x, y,
                gen, framing="sample") -> dict:  # fmt: skip
    from channels import AWGN, FastLink
    from flowcodec.pipeline import Flow, Hop, Tier

    tiers = [Tier("device", comp["device"], point, threshold if point >= 1 else None),
             Tier("edge", comp["edge"], member)]  # fmt: skip
    if getattr(codec, "sends_symbols", False):
        # An analog (JSCC) option: its symbols through AWGN at the SNR, no MCS.
        if mcs is not None:
            raise ConfigError("an analog (JSCC) option takes no MCS")
        hop = Hop(codec, AWGN(), sym_rate, delay["edge"], snr_db=snr)
    else:
        if mcs is None:
            raise ConfigError("a digital option needs an MCS")
        link = FastLink(mcs=mcs, snr_db=snr, harq_max_tx=1, seed=0)
        hop = Hop(codec, link, sym_rate, delay["edge"], framing=framing)
    was_training = codec.training
    flow = Flow(fam, tiers, [hop])
    # Flow counts the codec's FLOPs, which can leave a JSCC codec in training mode (its
    # encoder wrapper is a fresh module): run it in the mode it came in.
    codec.train(was_training)
    res = flow.run(x, generator=gen)
    return _summary(res, y)


def _write(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the leading columns, the others by name, and the receiver column (added later) last
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in (
        "symbol_rate", "snr_db", "scheme", "accuracy", "latency_ms", "bytes", "mcs"),
        k == "receiver", k))  # fmt: skip
    write_csv(out / "latency.csv", rows, fields=keys)
    schemes = ["adaptive", "edge-only-matched", "fixed-split", "edge-only", "cloud-only",
               "device-only"]  # fmt: skip
    rates = sorted({r["symbol_rate"] for r in rows})
    fig, axes = plt.subplots(2, len(rates), figsize=(5 * len(rates), 7), squeeze=False)
    for j, sr in enumerate(rates):
        for s in schemes:
            pts = sorted((r["snr_db"], r["latency_ms"], r["accuracy"]) for r in rows
                         if r["scheme"] == s and r["symbol_rate"] == sr)  # fmt: skip
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            axes[1][j].plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=s)
        axes[0][j].set(yscale="log", xlabel="uplink SNR (dB)", ylabel="mean latency (ms)",
                       title=f"{sr / 1e6:g} Msymbol/s")  # fmt: skip
        axes[1][j].set(xlabel="uplink SNR (dB)", ylabel="accuracy (%)")
        axes[0][j].grid(alpha=0.3)
        axes[1][j].grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_snr.png", dpi=120)
    plt.close(fig)
    # Latency-accuracy Pareto view at each SNR of the reference symbol rate.
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in schemes:
        pts = [(r["latency_ms"], 100 * r["accuracy"]) for r in rows if r["scheme"] == s]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=s, s=18)
    ax.set(xscale="log", xlabel="mean latency (ms)", ylabel="accuracy (%)",
           title="every (SNR, symbol rate) point")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_pareto.png", dpi=120)
    plt.close(fig)


class LatencySweep(Sweep):
    """``flowcodec latency``."""

    name = "latency"
    outputs = "latency.csv"
    default_config = "cifar10"
    help = ("latency and accuracy of the adaptive flow against device-, edge- and cloud-only "
            "baselines, over uplink SNR and bandwidth")
    description = ("Compare the adaptive flow (the policy picks split point, codec rate, MCS "
                   "and device exit threshold for each SNR) with a fixed split and with "
                   "device-, edge- and cloud-only baselines, over a grid of uplink SNRs and "
                   "symbol rates. The config is checked whole before any work starts. Writes "
                   "latency.csv, profile.json and plots.")
    samples_help = "test samples, >= 2 (default: the config's); half profile, half evaluate"

    def validate(self, cfg, where):
        return validate_latency_config(cfg, where)

    def overrides(self, args) -> dict:
        return {"samples": args.samples} if args.samples else {}

    def check_engine(self, cfg: dict, args) -> None:
        _check_cell_seeds(cfg.get("cell_seeds", False))

    def execute(self, cfg: dict, args, engine) -> list[dict]:
        lc = LatencyConfig(**cfg)
        self.mark_checked(asdict(lc))  # the same config with its defaults filled in
        return run_latency(lc, Path(args.out), progress=not args.no_progress, engine=engine)

    def report(self, cfg: dict, rows: list[dict], args) -> None:
        ref = LatencyConfig(**cfg).reference
        print(f"cloud-only accuracy on a clean link: "
              f"{100 * rows[0]['cloud_only_clean_accuracy']:.2f} %  (accuracy floor for the "
              f"adaptive flow: 1 point below)")  # fmt: skip
        print(f"{'symbol/s':>9} {'SNR':>5} {'scheme':>12} {'acc %':>6} {'latency ms':>10} "
              f"{'bytes':>7} {'MCS':>4}  config")
        for r in rows:
            print(f"{r['symbol_rate']:9.0e} {r['snr_db']:5.1f} {r['scheme']:>12} "
                  f"{100 * r['accuracy']:6.2f} {r['latency_ms']:10.3f} {r['bytes']:7.0f} "
                  f"{str(r['mcs']):>4}  {r['config']}")
        by = {r["scheme"]: r for r in rows
              if r["snr_db"] == ref["snr_db"] and r["symbol_rate"] == ref["symbol_rate"]}
        if "adaptive" in by and "cloud-only" in by:
            a, c = by["adaptive"], by["cloud-only"]
            print(f"at {ref['snr_db']} dB, {ref['symbol_rate']:.0e} symbol/s: cloud-only / "
                  f"adaptive latency = {c['latency_ms'] / a['latency_ms']:.2f}x; accuracy "
                  f"{100 * a['accuracy']:.2f} % vs {100 * c['accuracy']:.2f} %")
        print(f"wrote {Path(args.out) / 'latency.csv'} and plots")


SWEEP = LatencySweep()


def add_parser(sub) -> None:
    """Add the ``latency`` subcommand to the ``flowcodec`` command's subparsers."""
    SWEEP.add_parser(sub)
