"""``flowcodec demo``: the whole flow on the embedded digits set (or CIFAR-10).

1. Load the family (the digits family is trained on first use and cached).
2. Train a learned, packetised codec at three rate points for the device's split point
   (cached too; for CIFAR-10 the codecs shipped in ``flowcodec/zoo/codecs`` are used).
   A rate point ``lamX`` is a codec trained with rate weight ``lambda = X`` (loss = task
   loss + ``X`` * kilobits per sample): a larger ``X`` sends fewer bytes.
3. Run device (member 1) -> uplink -> edge (member 2) -> backhaul -> cloud (member 3)
   over the exact 5G-style digital link (LDPC, QAM, CRC through Sionna) at several SNRs
   of AWGN and Rayleigh block fading, each sample exiting where it is confident enough.
   Link adaptation (:func:`adapt_mcs`) picks, for each SNR, channel and rate point, the
   MCS of fewest expected channel uses whose packet loss after HARQ stays at or below
   ``target_bler``, measured on the channel the flow runs on (fading included), planned
   with an SNR back-off of ``backoff_db``.
4. Print a table (channel x SNR x rate point -> MCS, accuracy, bytes per sample, latency,
   exit mix) and write ``demo.csv`` and ``demo.png`` in ``--out``.

The flows' results are cached (``$FLOWCODEC_CACHE/demo``) under a key made of the
settings, the weights of the family and codecs and the library's source, so a second run
with nothing changed only reads them back.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowcodec.errors import ConfigError

__all__ = ["DemoConfig", "run_demo", "demo_codecs", "adapt_mcs", "LinkChoice", "format_table",
           "markdown_table", "read_csv"]  # fmt: skip


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
    target_bler: float = 0.01  # packet loss after HARQ that link adaptation aims at
    harq_max_tx: int = 4  # transmissions per packet (chase combining)
    backoff_db: float = 1.0  # link adaptation plans for this much less SNR than measured
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


@dataclass
class LinkChoice:
    """What link adaptation chose: the MCS, and the packet loss after HARQ and channel
    uses per sample it expects there (measured with the table-driven link)."""

    mcs: int
    expected_loss: float
    expected_uses: float
    feasible: bool


def adapt_mcs(packets: list[list[bytes]], snr_db: float, channel_factory, target: float = 0.01,
              harq_max_tx: int = 4, repeats: int = 25, seed: int = 0,
              mcs_indices=tuple(range(29))) -> LinkChoice:  # fmt: skip
    """Link adaptation on the channel the flow runs on.

    ``packets`` are the link packets of a few samples (one list per sample);
    ``channel_factory()`` makes a fresh instance of the flow's channel (AWGN, block fading,
    ...). For each MCS the packets are sent ``repeats`` times through a
    :class:`~channels.FastLink` on that channel with ``harq_max_tx`` transmissions; the
    choice is the MCS of fewest channel uses per sample whose packet loss after HARQ is at
    most ``target``, or, when none reaches it, the one of least loss. MCS are tried from
    the most robust up, and the search stops once the loss passes one half above a
    feasible MCS (faster MCS only lose more).
    """
    from channels import FastLink

    if not 0 < target < 1:
        raise ConfigError(f"target must be in (0, 1), got {target!r}")
    flat = [p for sample in packets for p in sample] * repeats
    n_samples = len(packets) * repeats
    best, fallback = None, None
    for m in mcs_indices:
        link = FastLink(mcs=m, channel=channel_factory(), harq_max_tx=harq_max_tx, seed=seed)
        _, rep = link.transmit(flat, snr_db=snr_db)
        loss = 1.0 - sum(rep.per_packet_success) / len(flat)
        uses = rep.channel_uses / n_samples
        c = LinkChoice(m, loss, uses, loss <= target)
        if c.feasible and (best is None or uses < best.expected_uses):
            best = c
        if fallback is None or (loss, uses) < (fallback.expected_loss, fallback.expected_uses):
            fallback = c
        if best is not None and loss > 0.5:
            break
    out = best or fallback
    assert out is not None
    return out


def _source_digest() -> str:
    """A digest of the code that makes the demo's numbers (this module, the flow and the
    links) and the library's version: cached results are dropped when they change. After
    changing other code (a codec's coder, say), run with ``--no-cache``."""
    from pathlib import Path

    from flowcodec import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    files = [root / "flowcodec" / "demo.py", root / "flowcodec" / "pipeline.py",
             *root.joinpath("channels").glob("*.py")]  # fmt: skip
    for p in sorted(files):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _weights_digest(*modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")  # fmt: skip
    return h.hexdigest()


def _cache_path(kind: str, key: dict):
    from flowcodec.data import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "demo" / f"{kind}-{digest[:24]}.json"


def cached_family_accuracies(family, test, use_cache: bool = True) -> list[float]:
    """Each member's test accuracy on its own (cached like the flows)."""
    from flowcodec.family import evaluate_family

    path = _cache_path("family", {"family": _weights_digest(family), "n": len(test),
                                  "labels": int(test.labels.sum()), "src": _source_digest()})
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    accs = [float(a) for a in evaluate_family(family, test)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(accs))
    return accs


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True,
             use_cache: bool = True) -> tuple[list[dict], dict]:  # fmt: skip
    """Run the demo; returns the table rows and run facts, writes demo.csv / demo.png.

    With ``use_cache`` (default) the rows of an earlier run with the same settings,
    weights and source are read back instead of recomputed (``meta["cached"]`` says so).
    """
    from dataclasses import asdict

    from channels import AWGN, ExactLink, IIDPacketErasure, RayleighBlockFading
    from flowcodec.codecs import build_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.pipeline import DEFAULT_TIERS, Flow, Hop, Tier
    from flowcodec.progress import tqdm

    if not 0 < cfg.target_bler < 1 or cfg.harq_max_tx < 1:
        raise ConfigError("target_bler must be in (0, 1) and harq_max_tx >= 1")
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
    key = {"cfg": asdict(cfg), "family": _weights_digest(fam),
           "codecs": {n: _weights_digest(c) for n, c in codecs.items()},
           "n": len(test), "labels": int(y.sum()), "src": _source_digest()}  # fmt: skip
    path = _cache_path("flows", key)
    if use_cache and path.is_file():
        rows = json.loads(path.read_text())
        _write(rows, out, cfg)
        return rows, {"seconds": time.perf_counter() - t_start, "samples": len(test),
                      "cached": True, "cache_file": str(path)}  # fmt: skip
    backhaul_codec = build_codec("raw", fam.feature_shape(2), dtype="float16")
    tiers = [Tier("device", DEFAULT_TIERS["device"], 1, cfg.exit_threshold),
             Tier("edge", DEFAULT_TIERS["edge"], 2, cfg.exit_threshold),
             Tier("cloud", DEFAULT_TIERS["cloud"], fam.num_members)]  # fmt: skip

    def channel(ch: str):
        return (AWGN(seed=cfg.seed) if ch == "awgn" else
                RayleighBlockFading(coherence_length=cfg.coherence_length, seed=cfg.seed))

    with torch.no_grad():  # the packets link adaptation is tuned on: a few samples' worth
        probe = {n: [s.units() for s in c.compress(fam.features(x[:16], 1))]
                 for n, c in codecs.items()}  # fmt: skip
    rows = []
    runs = [(ch, snr, name) for ch in cfg.channels for snr in cfg.snrs_db for name in codecs]
    for ch, snr, name in tqdm(runs, desc="demo flows", disable=not progress, leave=False):
        codec = codecs[name]
        # The fast link's tables are a little optimistic for short packets: plan with a
        # back-off (docs/results.md, the demo).
        la = adapt_mcs(probe[name], snr - cfg.backoff_db, lambda ch=ch: channel(ch),
                       cfg.target_bler, cfg.harq_max_tx, seed=cfg.seed)  # fmt: skip
        link = ExactLink(mcs=la.mcs, channel=channel(ch), snr_db=snr,
                         harq_max_tx=cfg.harq_max_tx, seed=cfg.seed)  # fmt: skip
        hops = [Hop(codec, link, cfg.uplink_symbol_rate, cfg.uplink_delay_s),
                Hop(backhaul_codec, IIDPacketErasure(0.0), 1e9, cfg.backhaul_delay_s)]
        res = Flow(fam, tiers, hops).run(x, generator=torch.Generator().manual_seed(cfg.seed))
        mix = res.exit_mix()
        sent = [t.hops[0] for t in res.traces if t.hops]
        rows.append({
            "channel": ch, "snr_db": snr, "rate_point": name, "mcs": la.mcs,
            "accuracy": res.accuracy(y), "bytes_per_sample": res.mean_bits(0) / 8,
            "latency_ms": 1e3 * res.mean_latency_s,
            "exit_device": mix.get("device", 0.0), "exit_edge": mix.get("edge", 0.0),
            "exit_cloud": mix.get("cloud", 0.0),
            "uplink_packet_loss": (sum(h.packets_lost for h in sent)
                                   / max(1, sum(h.packets for h in sent))),
            "target_bler": cfg.target_bler, "expected_loss": la.expected_loss,
            "harq_max_tx": cfg.harq_max_tx,
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    _write(rows, out, cfg)
    return rows, {"seconds": time.perf_counter() - t_start, "samples": len(test),
                  "cached": False, "cache_file": str(path)}  # fmt: skip


def _rate_order(rp: str):
    """``lam0.3`` < ``lam1`` < ``lam3`` (by the number), other names after, by name."""
    try:
        return (0, float(rp.removeprefix("lam")), rp)
    except ValueError:
        return (1, 0.0, rp)


RATE_NOTE = ("rate point lamX: the codec trained with rate weight lambda = X "
             "(loss = task + X * kbit per sample); a larger X sends fewer bytes")


def _write(rows: list[dict], out: Path, cfg: DemoConfig | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    chans = sorted({r["channel"] for r in rows})
    rates = sorted({r["rate_point"] for r in rows}, key=_rate_order)
    snrs = sorted({r["snr_db"] for r in rows})
    # Series that coincide (the same accuracy on both channels, say) must stay visible:
    # colour = rate point, line style and marker = channel, and each series is shifted a
    # little along the SNR axis (the x ticks mark the true SNRs).
    gap = min((b - a for a, b in zip(snrs, snrs[1:])), default=1.0)
    n = len(chans) * len(rates)
    shift = [gap * 0.035 * (i - (n - 1) / 2) for i in range(n)]
    centre = [sum(shift[j * len(rates):(j + 1) * len(rates)]) / len(rates)
              for j in range(len(chans))]  # fmt: skip
    styles = [("-", "o", "full"), ("--", "s", "none"), (":", "^", "full"), ("-.", "D", "none")]
    colours = [f"C{i}" for i in range(10)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.9))
    for j, ch in enumerate(chans):
        ls, mk, fill = styles[j % len(styles)]
        for k, rp in enumerate(rates):
            pts = sorted((r["snr_db"], r) for r in rows
                         if r["channel"] == ch and r["rate_point"] == rp)  # fmt: skip
            s = [p[0] + shift[j * len(rates) + k] for p in pts]
            kw = dict(ls=ls, marker=mk, fillstyle=fill, color=colours[k % len(colours)],
                      label=f"{ch}, {rp}", ms=6, lw=1.3)  # fmt: skip
            axes[0].plot(s, [100 * p[1]["accuracy"] for p in pts], **kw)
            axes[1].plot(s, [p[1]["latency_ms"] for p in pts], **kw)
            axes[2].plot(s, [p[1]["uplink_packet_loss"] for p in pts], **kw)
            axes[3].plot(s, [p[1]["mcs"] for p in pts], **kw)
    # One MCS label per channel and SNR, in a row of its own at the top (first channel) or
    # the bottom (second) of the accuracy panel, clear of the curves and of each other.
    axes[0].margins(y=0.35)
    rows_y = [0.95, 0.05, 0.88, 0.12]
    for j, ch in enumerate(chans[: len(rows_y)]):
        for snr in snrs:
            used = sorted({r["mcs"] for r in rows if r["channel"] == ch and r["snr_db"] == snr})
            if used:
                axes[0].annotate("/".join(str(m) for m in used), (snr + centre[j], rows_y[j]),
                                 xycoords=("data", "axes fraction"), ha="center", va="center",
                                 fontsize=7, color="dimgrey")  # fmt: skip
    where = ", ".join(f"{pos}: {ch}" for pos, ch in zip(("top", "bottom", "2nd row",
                                                         "2nd from bottom"), chans))  # fmt: skip
    axes[0].set(xlabel="uplink SNR (dB)", ylabel="accuracy (%)",
                title=f"accuracy (numbers: MCS; {where})")  # fmt: skip
    axes[1].set(xlabel="uplink SNR (dB)", ylabel="mean latency (ms)",
                title="latency (incl. HARQ retransmissions)")  # fmt: skip
    axes[2].set(xlabel="uplink SNR (dB)", ylabel="uplink packet loss after HARQ (CRC)",
                title="packet loss")  # fmt: skip
    if cfg is not None:
        axes[2].axhline(cfg.target_bler, color="grey", lw=0.8, ls=":")
        axes[2].annotate(f"target {cfg.target_bler:g}", (0.02, cfg.target_bler),
                         xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    axes[3].set(xlabel="uplink SNR (dB)", ylabel="MCS index (5G NR table 1)",
                title="MCS chosen by link adaptation")  # fmt: skip
    for a in axes:
        a.set_xticks(snrs)
    for a in axes:
        a.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 6), fontsize=8,
               frameon=False)  # fmt: skip
    harq = f", HARQ up to {cfg.harq_max_tx} transmissions" if cfg is not None else ""
    fig.suptitle("flowcodec demo: device -> edge -> cloud over the exact 5G-style link; "
                 f"MCS adapted per SNR and channel{harq}\n{RATE_NOTE}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // 6), 1, 1))
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


def read_csv(path) -> list[dict]:
    """The rows of a ``demo.csv``, with numbers as numbers."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                try:
                    row[k] = int(v) if k in ("mcs", "harq_max_tx") else float(v)
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def markdown_table(rows: list[dict]) -> str:
    """The demo's table as Markdown (docs/results.md quotes the one made from docs/demo.csv)."""
    lines = ["| channel | SNR dB | rate point | MCS | accuracy % | bytes/sample | latency ms | "
             "exits device/edge/cloud | uplink loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['channel']} | {r['snr_db']:g} | {r['rate_point']} | {r['mcs']} | "
            f"{100 * r['accuracy']:.2f} | {r['bytes_per_sample']:.1f} | {r['latency_ms']:.3f} | "
            f"{r['exit_device']:.2f}/{r['exit_edge']:.2f}/{r['exit_cloud']:.2f} | "
            f"{r['uplink_packet_loss']:.3f} |")  # fmt: skip
    return "\n".join(lines)
