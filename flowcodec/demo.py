"""``flowcodec demo``: the whole flow on the embedded digits set (or CIFAR-10).

1. Load the family (the digits family is trained on first use and cached).
2. Train a learned, packetised codec at three rate points for the device's split point
   (cached too; for CIFAR-10 the codecs shipped in ``flowcodec/zoo/codecs`` are used).
3. Run device (member 1) -> uplink -> edge (member 2) -> backhaul -> cloud (member 3)
   over the exact 5G-style digital link (LDPC, QAM, CRC through Sionna) at several SNRs
   of AWGN and Rayleigh block fading, each sample exiting where it is confident enough.
4. Print a table (channel x SNR x rate point -> accuracy, bytes per sample, latency, exit
   mix) and write ``demo.csv`` and ``demo.png`` in ``--out``.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowcodec.errors import ConfigError

__all__ = ["DemoConfig", "run_demo", "demo_codecs"]


@dataclass
class DemoConfig:
    dataset: str = "digits"
    snrs_db: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0)
    channels: tuple[str, ...] = ("awgn", "rayleigh")
    lams: tuple[float, ...] = (0.3, 1.0, 3.0)
    samples: int | None = None
    exit_threshold: float = 0.9
    uplink_symbol_rate: float = 1e6
    uplink_delay_s: float = 0.002
    backhaul_delay_s: float = 0.02
    coherence_length: int = 64
    seed: int = 0

    @classmethod
    def quick(cls, dataset: str = "digits") -> DemoConfig:
        return cls(dataset=dataset, snrs_db=(3.0, 15.0), lams=(1.0,), samples=120)


def demo_codecs(family, train, test, lams, progress: bool = True) -> dict[str, object]:
    """Learned codecs at the device's split point (point 1), one per rate point ``lam``.

    Digits: trained here (30 epochs, about 25 s each on 2 cores) and cached; CIFAR-10: the shipped
    packetised codecs.
    """
    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import train_codec
    from flowcodec.codecs.zoo import list_pretrained, load_codec, load_pretrained_codec, save_codec
    from flowcodec.data import cache_dir

    out = {}
    if family.config.get("name") == "cifar10":
        names = [n for n in list_pretrained()
                 if n.startswith("cifar10-") and ("fact_" in n or "robust" in n)]
        if not names:
            raise ConfigError("no shipped CIFAR-10 codecs in flowcodec/zoo/codecs")
        for n in names[: len(lams)]:
            out[n.removeprefix("cifar10-")] = load_pretrained_codec(n)
        return out
    kwargs = {"latent": 8, "hidden": 32, "packets": 4}
    for lam in lams:
        tag = f"{lam:g}".replace(".", "p")  # no dots: they would read as a file suffix
        path = cache_dir() / "models" / f"digits-demo-codec-v2-l{tag}"
        codec = None
        if path.with_suffix(".safetensors").is_file():
            try:
                codec = load_codec(path)
            except ValueError:
                codec = None  # an older format in the cache: retrain
        if codec is None:
            codec = build_codec("factorized", family.feature_shape(1), **kwargs)
            train_codec(codec, family, family.num_members, 1, train, lam=lam, epochs=30,
                        lr=5e-3, drop_prob=0.15, progress=progress)  # fmt: skip
            codec.update(force=True)
            save_codec(codec, path, kwargs, half=False)
            codec = load_codec(path)
        out[f"lam{lam:g}"] = codec
    return out


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True) -> tuple[list[dict], dict]:
    """Run the demo; returns the table rows and run facts, writes demo.csv / demo.png."""
    from channels import AWGN, ExactLink, IIDPacketErasure, RayleighBlockFading
    from flowcodec.codecs import build_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.pipeline import DEFAULT_TIERS, Flow, Hop, Tier
    from flowcodec.policy import link_adaptation_mcs
    from flowcodec.progress import tqdm

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    fam = load_pretrained(cfg.dataset, progress=progress)
    if fam.num_members < 3:
        raise ConfigError("the demo needs a family of at least 3 members")
    train, test = load_dataset(cfg.dataset)
    if cfg.samples:
        test = test.subset(min(cfg.samples, len(test)), seed=cfg.seed)
    x, y = next(test.batches(len(test)))
    codecs = demo_codecs(fam, train, test, cfg.lams, progress)
    backhaul_codec = build_codec("raw", fam.feature_shape(2), dtype="float16")
    tiers = [Tier("device", DEFAULT_TIERS["device"], 1, cfg.exit_threshold),
             Tier("edge", DEFAULT_TIERS["edge"], 2, cfg.exit_threshold),
             Tier("cloud", DEFAULT_TIERS["cloud"], fam.num_members)]  # fmt: skip
    rows = []
    runs = [(ch, snr, name) for ch in cfg.channels for snr in cfg.snrs_db for name in codecs]
    gen = torch.Generator().manual_seed(cfg.seed)
    for ch, snr, name in tqdm(runs, desc="demo flows", disable=not progress, leave=False):
        codec = codecs[name]
        with torch.no_grad():
            sample = codec.compress(fam.features(x[:1], 1))[0]
        mcs = link_adaptation_mcs([max(len(p) for p in sample.link_packets())], snr)
        channel = (AWGN(seed=cfg.seed) if ch == "awgn" else
                   RayleighBlockFading(coherence_length=cfg.coherence_length, seed=cfg.seed))
        link = ExactLink(mcs=mcs, channel=channel, snr_db=snr, seed=cfg.seed)
        hops = [Hop(codec, link, cfg.uplink_symbol_rate, cfg.uplink_delay_s),
                Hop(backhaul_codec, IIDPacketErasure(0.0), 1e9, cfg.backhaul_delay_s)]
        res = Flow(fam, tiers, hops).run(x, generator=gen)
        mix = res.exit_mix()
        sent = [t.hops[0] for t in res.traces if t.hops]
        rows.append({
            "channel": ch, "snr_db": snr, "rate_point": name, "mcs": mcs,
            "accuracy": res.accuracy(y), "bytes_per_sample": res.mean_bits(0) / 8,
            "latency_ms": 1e3 * res.mean_latency_s,
            "exit_device": mix.get("device", 0.0), "exit_edge": mix.get("edge", 0.0),
            "exit_cloud": mix.get("cloud", 0.0),
            "uplink_packet_loss": (sum(h.packets_lost for h in sent)
                                   / max(1, sum(h.packets for h in sent))),
        })  # fmt: skip
    _write(rows, out)
    rows_meta = {"seconds": time.perf_counter() - t_start, "samples": len(test)}
    return rows, rows_meta


def _write(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    chans = sorted({r["channel"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ch, ls in zip(chans, ("-", "--")):
        for rp in sorted({r["rate_point"] for r in rows}):
            pts = sorted((r["snr_db"], r) for r in rows
                         if r["channel"] == ch and r["rate_point"] == rp)  # fmt: skip
            s = [p[0] for p in pts]
            lab = f"{ch}, {rp}"
            axes[0].plot(s, [100 * p[1]["accuracy"] for p in pts], ls, marker="o", label=lab)
            axes[1].plot(s, [p[1]["latency_ms"] for p in pts], ls, marker="o", label=lab)
            axes[2].plot(s, [p[1]["uplink_packet_loss"] for p in pts], ls, marker="o", label=lab)
    axes[0].set(xlabel="uplink SNR (dB)", ylabel="accuracy (%)")
    axes[1].set(xlabel="uplink SNR (dB)", ylabel="mean latency (ms)")
    axes[2].set(xlabel="uplink SNR (dB)", ylabel="uplink packet loss (after CRC)")
    for a in axes:
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("flowcodec demo: device -> edge -> cloud over the exact 5G-style link")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    head = (f"{'channel':>8} {'SNR dB':>6} {'rate point':>12} {'MCS':>3} {'acc %':>6} "
            f"{'bytes':>6} {'latency ms':>10} {'exits device/edge/cloud':>24} {'loss':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mix = f"{r['exit_device']:.2f}/{r['exit_edge']:.2f}/{r['exit_cloud']:.2f}"
        lines.append(f"{r['channel']:>8} {r['snr_db']:6.1f} {r['rate_point']:>12} {r['mcs']:3d} "
                     f"{100 * r['accuracy']:6.2f} {r['bytes_per_sample']:6.1f} "
                     f"{r['latency_ms']:10.3f} {mix:>24} {r['uplink_packet_loss']:5.2f}")
    return "\n".join(lines)
