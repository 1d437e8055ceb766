"""``flowcodec rd``: accuracy vs. bytes per image for every codec in a config.

The config (JSON, see ``experiments/rd_cifar10.json`` and ``experiments/rd_digits.json``)
names a family, a member (the receiver's), a split point and a list of codec entries.
Each entry is a baseline (built, fitted on training features, swept over parameters), a
shipped trained codec (``"pretrained"``), or a learned codec trained here over a
``lam`` sweep (``"train"``). Every result row holds the accuracy of the member's tail on
the decoded features, the measured bytes per image (``8 * len(to_bytes())`` / 8, headers
included), the likelihood estimate where there is one, and the device's FLOPs (head plus
codec encoder) as a share of the whole member's. Optional ``"channels"`` entries re-run
codecs through an i.i.d. packet-erasure channel or flip payload bits (BSC).

    flowcodec rd --config experiments/rd_cifar10.json --out runs/rd_cifar10

writes ``rd.csv``, ``rd.json``, ``targets.csv`` (:func:`compare`: each learned codec
against the input baselines and float32 at its accuracy) and ``rd.png`` (and
``channel.png`` with channel rows). Rates are given in both framings of
``docs/bitstream.md``: self-contained (``bytes_per_image``, header in every sample) and
session (``session_bytes``, header sent once per session).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RDRow", "Comparison", "run_rd", "compare", "add_parser", "load_config"]

FRAMINGS = {"bytes_per_image": "self-contained", "session_bytes": "session"}


@dataclass
class Comparison:
    """A learned codec against the input baselines and float32, in one framing.

    ``input_bytes`` is the cheapest input-compression row (JPEG/WebP, point 0) that is at
    least as accurate as the codec (``None`` when none is); ``input_ratio`` is the codec's
    bytes divided by it, ``float32_ratio`` its bytes divided by the raw float32 row's.
    """

    label: str
    framing: str
    accuracy: float
    gap_points: float
    bytes: float
    input_label: str | None
    input_bytes: float | None
    input_ratio: float | None
    float32_ratio: float | None


def compare(rows: list[RDRow]) -> list[Comparison]:
    """Set every clean learned row against the targets of the codecs issue (both framings)."""
    from flowcodec.codecs.zoo import LEARNED_CODECS

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    raw = next((r for r in clean if r.codec == "raw" and "32" in r.label), None)
    inputs = [r for r in clean if r.codec in ("jpeg", "webp")]
    out = []
    for r in clean:
        if r.codec not in LEARNED_CODECS:
            continue
        for key, framing in FRAMINGS.items():
            b = getattr(r, key)
            better = [i for i in inputs if i.accuracy >= r.accuracy]
            best = min(better, key=lambda i: getattr(i, key)) if better else None
            ib = getattr(best, key) if best else None
            out.append(Comparison(
                r.label, framing, r.accuracy,
                round(100 * (ref.accuracy - r.accuracy), 2) if ref else math.nan, b,
                best.label if best else None, ib, b / ib if ib else None,
                b / getattr(raw, key) if raw else None))  # fmt: skip
    return out


@dataclass
class RDRow:
    """One measured point: a codec configuration under one condition."""

    label: str
    group: str
    codec: str
    point: int
    condition: str
    accuracy: float
    bytes_per_image: float
    session_bytes: float
    payload_bytes: float
    est_bytes: float | None
    coder_overhead_pct: float | None
    device_mflops: float
    device_flops_pct: float
    n: int
    seconds: float


def load_config(path: str | Path) -> dict:
    """Read and check an rd config (JSON)."""
    from flowcodec.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rd config {p} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
    for key in ("dataset", "family", "member", "point", "codecs"):
        if key not in cfg:
            raise ConfigError(f"{p}: missing key {key!r}")
    return cfg


def _expand(entry: dict) -> list[tuple[str, dict]]:
    """(label, kwargs) for every point of an entry's ``sweep``."""
    sweep = entry.get("sweep", {})
    keys = list(sweep)
    out = []
    for values in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
        kw = {**entry.get("kwargs", {}), **dict(zip(keys, values))}
        out.append((entry.get("label", entry.get("codec", "codec")).format(**kw), kw))
    return out


def run_rd(cfg: dict, out: str | Path, progress: bool = True, n: int | None = None,
           device: str = "cpu", family=None) -> list[RDRow]:  # fmt: skip
    """Run every entry of ``cfg``; write CSV, JSON and plots under ``out``; return the rows.

    ``family`` (optional) replaces the trained family named in the config (tests).
    """
    import torch
    from tqdm.auto import tqdm

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import collect_features, evaluate_codec, train_codec
    from flowcodec.codecs.zoo import load_pretrained_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    fam = family if family is not None else load_pretrained(cfg["family"], progress=progress)
    train, test = load_dataset(cfg["dataset"])
    n = n or cfg.get("test_subset")
    if n and n < len(test):
        test = test.subset(int(n), seed=seed)
    member, point = int(cfg["member"]), int(cfg["point"])
    member_flops = fam.info()[member - 1].flops
    fit_n = int(cfg.get("fit_samples", 2000))
    heads, fits = {}, {}

    def split(p):
        if p not in heads:
            heads[p] = fam.split(member, p)
            fits[p] = collect_features(heads[p][0], train, n=fit_n)
        return heads[p]

    # each job: (group, label, builder) where builder returns a ready codec
    jobs = []
    for entry in cfg["codecs"]:
        group = entry.get("group", entry.get("codec", "pretrained"))
        p = int(entry.get("point", point))
        if "pretrained" in entry:
            for name in entry["pretrained"]:
                jobs.append((group, name, p, lambda name=name: load_pretrained_codec(name)))
        elif "train" in entry:
            t = entry["train"]
            for lam in t["lam"]:
                label = entry.get("label", entry["codec"] + "-l{lam}").format(lam=lam)

                def build(entry=entry, t=t, lam=lam, p=p):
                    codec = build_codec(entry["codec"], fam.feature_shape(p),
                                        **entry.get("kwargs", {}))  # fmt: skip
                    res = train_codec(codec, fam, member, p, train, None, lam=lam,
                                      beta=t.get("beta", 1.0), epochs=t.get("epochs", 10),
                                      drop_prob=t.get("drop_prob", 0.0),
                                      flip_prob=t.get("flip_prob", 0.0),
                                      batch_size=t.get("batch_size", 64), lr=t.get("lr", 2e-3),
                                      seed=seed, progress=False, device=device)  # fmt: skip
                    codec.to("cpu").update(force=True)
                    codec.train_history = res.history
                    return codec

                jobs.append((group, label, p, build))
        else:
            for label, kw in _expand(entry):
                if entry["codec"] in ("jpeg", "webp"):
                    kw = {"mean": list(train.mean), "std": list(train.std), **kw}

                def build(entry=entry, kw=kw, p=p):
                    codec = build_codec(entry["codec"], fam.feature_shape(p), **kw)
                    return codec.fit(fits[p]) if entry.get("fit", True) else codec

                jobs.append((group, label, p, build))

    rows: list[RDRow] = []
    histories = {}
    head, tail = split(point)
    ref_t = time.perf_counter()
    ref_acc = _reference_accuracy(head, tail, test)
    rows.append(RDRow("uncompressed", "reference", "none", point, "clean", ref_acc, 0.0, 0.0,
                      0.0, None, None, fam.head_flops(point) / 1e6,
                      100 * fam.head_flops(point) / member_flops, len(test),
                      round(time.perf_counter() - ref_t, 1)))  # fmt: skip
    built = {}
    bar = tqdm(jobs, desc="rd", disable=not progress)
    for group, label, p, build in bar:
        bar.set_postfix_str(label)
        head, tail = split(p)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        codec = build().eval()
        built[label] = (codec, p)
        if hasattr(codec, "train_history"):
            histories[label] = codec.train_history
        ev = evaluate_codec(codec, head, tail, test)
        rows.append(_row(label, group, codec, p, "clean", ev, fam, member_flops, t0))
    for ch in cfg.get("channels", []):
        gen_seed = int(ch.get("seed", seed))
        for label in ch["codecs"]:
            if label not in built:
                continue
            codec, p = built[label]
            head, tail = split(p)
            t0 = time.perf_counter()
            if "loss_rate" in ch:
                cond = f"iid loss {ch['loss_rate']:g}"
                channel = _erasure(ch["loss_rate"], gen_seed)
                ev = evaluate_codec(codec, head, tail, test, channel=channel)
            else:
                from flowcodec.codecs.learned import flip_bits

                g = torch.Generator().manual_seed(gen_seed)
                prob = float(ch["flip_prob"])
                cond = f"bsc {prob:g}"
                ev = evaluate_codec(codec, head, tail, test,
                                    transform=lambda s, g=g, prob=prob: flip_bits(s, prob, g))
            rows.append(_row(label, built_group(rows, label), codec, p, cond, ev, fam,
                             member_flops, t0))  # fmt: skip
    write_outputs(rows, out, cfg, histories)
    return rows


def built_group(rows: list[RDRow], label: str) -> str:
    for r in rows:
        if r.label == label:
            return r.group
    return "?"


def _erasure(loss_rate: float, seed: int):
    """Packet erasure: channels.discrete.IIDPacketErasure (one generator for the whole run)."""
    import torch

    from channels.discrete import IIDPacketErasure

    ch = IIDPacketErasure(loss_rate, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return lambda packets: ch.transmit(packets, generator=g)[0]


def _reference_accuracy(head, tail, data) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for x, y in data.batches(250):
            correct += int((tail(head(x)).argmax(1) == y).sum())
    return correct / len(data)


def _row(label, group, codec, p, cond, ev, fam, member_flops, t0) -> RDRow:
    dev = fam.head_flops(p) + codec.encoder_flops()
    over = None
    if ev.est_bytes_per_image:
        over = round(100 * (ev.payload_bytes_per_image / ev.est_bytes_per_image - 1), 3)
    return RDRow(label, group, codec.name, p, cond, ev.accuracy, ev.bytes_per_image,
                 ev.session_bytes_per_image, ev.payload_bytes_per_image,
                 ev.est_bytes_per_image, over, dev / 1e6,
                 100 * dev / member_flops, ev.n, round(time.perf_counter() - t0, 1))  # fmt: skip


def _write_csv(path: Path, items: list) -> None:
    """Dataclass rows as CSV, floats rounded to 4 decimals."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(items[0])))
        w.writeheader()
        for it in items:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in asdict(it).items()})  # fmt: skip


def write_outputs(rows: list[RDRow], out: Path, cfg: dict, histories: dict) -> None:
    """rd.csv, rd.json, targets.csv and the plots."""
    _write_csv(out / "rd.csv", rows)
    (out / "rd.json").write_text(json.dumps({"config": cfg, "rows": [asdict(r) for r in rows],
                                             "train_histories": histories}, indent=1))
    comps = compare(rows)
    if comps:
        _write_csv(out / "targets.csv", comps)
    plot_rd(rows, out / "rd.png", title=cfg.get("title", ""))
    if any(r.condition != "clean" for r in rows):
        plot_channel(rows, out / "channel.png")


def plot_rd(rows: list[RDRow], path: Path, title: str = "") -> None:
    """Accuracy vs. bytes per image (log x), one line per codec group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r for r in rows if r.condition == "clean"]
    ref = next((r for r in clean if r.group == "reference"), None)
    groups: dict[str, list[RDRow]] = {}
    for r in clean:
        if r.group != "reference":
            groups.setdefault(r.group, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    lo = min((100 * r.accuracy for r in clean), default=0)
    for ax, (key, framing) in zip(axes, FRAMINGS.items()):
        for g, rs in groups.items():
            rs = sorted(rs, key=lambda r: getattr(r, key))
            ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs], "o-",
                    label=f"{g} (device {max(r.device_flops_pct for r in rs):.0f}% FLOPs)",
                    ms=4)  # fmt: skip
        if ref is not None:
            ax.axhline(100 * ref.accuracy, color="k", ls="--", lw=1,
                       label=f"uncompressed member ({100 * ref.accuracy:.2f}%)")
            ax.axhline(100 * ref.accuracy - 1, color="gray", ls=":", lw=1,
                       label="1 point below")  # fmt: skip
        ax.set_xscale("log")
        what = "header in every sample" if key == "bytes_per_image" else "header once per session"
        ax.set_xlabel(f"bytes per image (measured, {framing} framing: {what})")
        ax.set_ylim(max(0, lo - 2), 100)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_channel(rows: list[RDRow], path: Path) -> None:
    """Accuracy per codec under each channel condition (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r.label for r in rows if r.condition != "clean"})
    conds = ["clean"] + sorted({r.condition for r in rows if r.condition != "clean"})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(conds))
    for j, c in enumerate(conds):
        vals = []
        for lab in labels:
            r = next((r for r in rows if r.label == lab and r.condition == c), None)
            vals.append(100 * r.accuracy if r else math.nan)
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=c)
    ax.set_xticks([i + width * (len(conds) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_rd(args) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    cfg = load_config(args.config)
    rows = run_rd(cfg, args.out, progress=not args.no_progress, n=args.n, device=args.device)
    cols = ("label", "condition", "accuracy", "bytes_per_image", "session_bytes",
            "device_flops_pct")  # fmt: skip
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        vals = [r.label, r.condition, f"{100 * r.accuracy:.2f}", f"{r.bytes_per_image:.1f}",
                f"{r.session_bytes:.1f}", f"{r.device_flops_pct:.1f}"]  # fmt: skip
        print("  ".join(f"{v:>18}" for v in vals))
    comps = compare(rows)
    if comps:
        print("\nlearned codecs against the targets (input = cheapest JPEG/WebP at least as "
              "accurate):")  # fmt: skip
        for c in comps:
            ratio = f"{c.input_ratio:.3f} of {c.input_label}" if c.input_ratio else "no input row"
            f32 = f"{c.float32_ratio:.5f}" if c.float32_ratio else "-"
            print(f"  {c.label:>24} {c.framing:>14}: {100 * c.accuracy:.2f}% "
                  f"({c.gap_points:+.2f} pt below), {c.bytes:.1f} B, {ratio}, float32 x{f32}")
    print(f"wrote {Path(args.out) / 'rd.csv'} and plots")
    return 0


def add_parser(subparsers) -> None:
    """Add the ``rd`` subcommand to the ``flowcodec`` command's subparsers."""
    p = subparsers.add_parser("rd", help="accuracy vs. bytes per image for the codecs of a config")
    p.add_argument("--config", required=True, help="JSON config (see experiments/rd_*.json)")
    p.add_argument("--out", default="runs/rd", help="output folder (default runs/rd)")
    p.add_argument("--n", type=int, default=None, help="test images (default: the config's)")
    p.add_argument("--device", default="cpu", help="device for training entries")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_rd)
