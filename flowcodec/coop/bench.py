"""The cooperative benchmark: fused devices against the baselines, from real bytes.

On the multi-view test set (the generator's parameters come from the model's checkpoint and
are written into every record), for K devices of the model's kinds:

- ``device-own``: each device position alone with its own exit answer (its member, no
  bytes but an answer); ``best`` is the best fixed position on average, not an oracle;
- ``member3-view``: one view, uncompressed, through the largest member: with
  ``--finetuned PATH``, the member fine-tuned on single device views
  (:mod:`flowcodec.coop.finetune`), with the shipped member's rows kept as
  ``member3-view-shipped``; without it, the shipped member;
- ``average-own``: the devices' own class probabilities, 8 bits each (10 B per device),
  averaged at the edge; ``average-own-drop[k]`` the same without device ``k`` (what losing
  one view costs the average, beside ``coop-drop``);
- ``centralised``: the largest member on the whole image (the bound);
- ``coop-all``: every device's real stream decoded and fused; ``coop-single`` one position
  through the fusion; ``coop-drop-one`` each device missing in turn; ``coop-loss``: each
  device lost i.i.d. with probability ``--loss`` (seeded; with none arriving the class
  prior answers, counted);
- ``selective-confidence`` / ``selective-fixed``: the threshold sweep of
  :mod:`flowcodec.coop.selective`;
- ``webp-q{q}`` (with ``--webp-qualities``): every view sent as WebP (method 6, constant
  headers stripped: :class:`~flowcodec.codecs.image.WebPCodec` with ``strip=True``, as the
  project's WebP baselines), decoded at the edge and fused by the largest member (the
  fine-tuned one when given) averaging its class probabilities over the decoded views; its
  bytes are the real WebP streams, framed as the devices' streams are.

Every row states the bytes per device (the stream in session framing, and the full
stream with its header) and the device's MFLOPs (head plus encoder; plus its exit's linear
layer where it sends a confidence or its own answer), and the total.

``python -m flowcodec.coop.bench --model PATH --out-dir DIR`` writes ``DIR/coop.csv``,
``DIR/coop.json`` (the records with the view and training configs) and
``DIR/coop.png`` (bytes per scene against accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flowcodec.coop.fusion import CoopModel, load_coop
from flowcodec.coop.selective import (
    CONFIDENCE_BYTES,
    confidence_byte,
    device_order,
    prefix_masks,
    sweep,
)
from flowcodec.coop.targets import check, print_targets
from flowcodec.coop.views import ViewConfig, ViewGenerator, anchor_ids
from flowcodec.errors import ConfigError

__all__ = ["collect", "summarise", "fixed_prefixes", "check_qualities", "webp_codecs",
           "webp_fuse", "write_plot", "add_arguments", "run", "main", "THRESHOLDS"]

THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.01)


def check_qualities(qualities: Sequence[int]) -> list[int]:
    """``qualities`` without repeats; ConfigError unless each is an int in 1..100."""
    qs = list(dict.fromkeys(qualities))
    bad = [q for q in qs if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100]
    if bad:
        raise ConfigError(f"WebP qualities must be ints in 1..100, got {bad}")
    return qs


def webp_codecs(shape, mean, std, qualities: Sequence[int]) -> dict:
    """``{quality: WebPCodec}``: method 6, constant headers stripped (the project's WebP
    baseline settings), for images of ``shape`` normalised with ``mean`` / ``std``."""
    from flowcodec.codecs.image import WebPCodec

    return {q: WebPCodec(tuple(shape), quality=q, mean=tuple(mean), std=tuple(std), method=6,
                         strip=True) for q in check_qualities(qualities)}


@torch.no_grad()
def webp_fuse(codec, member: nn.Module, views: torch.Tensor) -> dict:
    """Every view of ``views`` ``(B, N, C, H, W)`` through ``codec`` (real bytes), decoded,
    and ``member``'s class probabilities averaged over the decoded views: ``{"probs":
    (B, classes), "bytes": (B, N) session framing, "full": (B, N) whole streams,
    "payload": (B, N) the codec's payload alone}``."""
    b, n = views.shape[:2]
    probs = 0.0
    sizes: dict[str, list] = {"bytes": [], "full": [], "payload": []}
    for k in range(n):
        streams = codec.compress(views[:, k])
        sizes["bytes"].append(torch.tensor([s.compact_nbytes for s in streams]))
        sizes["full"].append(torch.tensor([len(s.to_bytes()) for s in streams]))
        sizes["payload"].append(torch.tensor([sum(len(p) for p in s.packets) for s in streams]))
        probs = probs + torch.softmax(member(codec.decompress(streams)).float(), 1)
    return {"probs": probs / n, **{k: torch.stack(v, 1) for k, v in sizes.items()}}


@torch.no_grad()
def collect(model: CoopModel, kinds: tuple[str, ...], views: ViewGenerator, data,
            loss: float = 0.3, seed: int = 0, batch_size: int = 250,
            progress: bool = True, finetuned: nn.Module | None = None,
            webp_qualities: Sequence[int] = (), anchors: Sequence[int] | None = None) -> dict:
    """Run every method on ``data``; returns per-sample tensors (logits, bytes, masks).

    ``anchors``: each device position's anchor id (session metadata; default the view
    protocol's, :func:`~flowcodec.coop.views.anchor_ids`).

    ``finetuned``: the largest member fine-tuned on single views (the ``member3-view``
    baseline and the WebP fusion use it; the shipped member's views are kept as
    ``m3shipped``). ``webp_qualities``: the ``webp-q{q}`` baselines to run."""
    from flowcodec.progress import tqdm

    if len(kinds) != views.devices:
        raise ConfigError(f"{len(kinds)} device kinds for {views.devices} views")
    fam = model.family.eval()
    model.eval()
    big = fam.member(model.cfg.member)
    m3 = big if finetuned is None else finetuned.eval()
    webp = webp_codecs(fam.input_shape, data.mean, data.std, webp_qualities)
    n_dev = len(kinds)
    gen = torch.Generator().manual_seed(seed)
    keys = ["y", "central", "own", "m3view", "all", "single", "drop", "loss",
            "loss_mask", "conf", "bytes", "full_bytes", "conf_prefix", "lats"]
    if finetuned is not None:
        keys.append("m3shipped")
    for q in webp:
        keys += [f"webp{q}", f"webp{q}_bytes", f"webp{q}_full", f"webp{q}_payload"]
    acc: dict[str, list] = {k: [] for k in keys}
    at = 0
    steps = math.ceil(len(data) / batch_size)
    for x, y in tqdm(data.batches(batch_size), total=steps, desc="coop bench",
                     disable=not progress, leave=False):
        b = len(y)
        idx = torch.arange(at, at + b)
        at += b
        v = views(x, idx)
        lats, own, m3v, nbytes, fbytes, shipped = [], [], [], [], [], []
        for k, kind in enumerate(kinds):
            h = model.device_features(kind, v[:, k])
            z = model.pooled(kind, h=h)
            own.append(model.own_logits(kind, z))
            m3v.append(m3(v[:, k]))
            if finetuned is not None:
                shipped.append(big(v[:, k]))
            streams = model.compress(kind, h)
            nbytes.append(torch.tensor([s.compact_nbytes for s in streams]))
            fbytes.append(torch.tensor([len(s.to_bytes()) for s in streams]))
            lats.append(model.decompress(kind, streams))
        own_t = torch.stack(own, 1)
        acc["y"].append(y)
        acc["central"].append(big(x))
        acc["own"].append(own_t)
        acc["m3view"].append(torch.stack(m3v, 1))
        if finetuned is not None:
            acc["m3shipped"].append(torch.stack(shipped, 1))
        for q, codec in webp.items():
            w = webp_fuse(codec, m3, v)
            acc[f"webp{q}"].append(w["probs"])
            for part in ("bytes", "full", "payload"):
                acc[f"webp{q}_{part}"].append(w[part])
        acc["bytes"].append(torch.stack(nbytes, 1))
        acc["full_bytes"].append(torch.stack(fbytes, 1))
        kl = list(kinds)
        acc["lats"].append(torch.stack(lats, 1))

        def fuse(mask, lats=lats, kl=kl):
            return model.edge(lats, kl, mask, anchors=anchors).logits

        eye = torch.eye(n_dev, dtype=torch.bool)
        acc["all"].append(fuse(None))
        acc["single"].append(torch.stack([fuse(eye[k].expand(b, -1)) for k in range(n_dev)], 1))
        acc["drop"].append(torch.stack([fuse(~eye[k].expand(b, -1)) for k in range(n_dev)], 1)
                           if n_dev > 1 else fuse(None)[:, None])
        lm = torch.rand(b, n_dev, generator=gen) >= loss
        acc["loss_mask"].append(lm)
        acc["loss"].append(fuse(lm))
        conf = torch.stack([confidence_byte(o) for o in own], 1)
        acc["conf"].append(conf)
        order = device_order("confidence", conf)
        acc["conf_prefix"].append(torch.stack([fuse(m) for m in prefix_masks(order, b)], 1))
    out = {k: torch.cat(v) for k, v in acc.items()}
    out["webp_qualities"] = list(webp)
    out["anchors"] = None if anchors is None else list(anchors)
    return out


def _mflops(f: int) -> float:
    return round(f / 1e6, 3)


def summarise(model: CoopModel, kinds, res: dict, view_record: dict,
              thresholds=THRESHOLDS, finetuned: str | None = None) -> list[dict]:
    """The result rows (one per method / setting) from :func:`collect`'s tensors
    (``finetuned``: where the fine-tuned member came from, for the rows' notes)."""
    y = res["y"]
    n_dev = len(kinds)
    n = len(y)

    def acc(logits):
        return round(float((logits.argmax(-1) == y).float().mean()), 4)

    fl = {k: model.device_flops(k) for k in set(kinds)}
    fl_own = {k: model.device_flops(k, own_answer=True) for k in set(kinds)}
    member_fl = {k: fl[k]["member"] for k in set(kinds)}
    big = model.family.info()[model.cfg.member - 1].flops
    sess = res["bytes"].float().mean(0)  # (N,) per device position
    full = res["full_bytes"].float().mean(0)
    raw = float(math.prod(model.family.input_shape))  # an uncompressed 8-bit image
    rows = []

    def row(method, accuracy, devices, bytes_dev, device_mflops, extra=None, full_dev=None):
        r = {"method": method, "accuracy": accuracy, "devices": devices,
             "bytes_per_device": None if bytes_dev is None else round(bytes_dev, 2),
             "stream_bytes_per_device": None if full_dev is None else round(full_dev, 2),
             "bytes_total": None if bytes_dev is None else round(bytes_dev * devices, 2),
             "device_mflops": device_mflops,
             "total_mflops": round(device_mflops * devices, 3), "n": n}
        r.update(extra or {})
        rows.append(r)

    own_acc = [acc(res["own"][:, k]) for k in range(n_dev)]
    m3_acc = [acc(res["m3view"][:, k]) for k in range(n_dev)]
    co_acc = [acc(res["single"][:, k]) for k in range(n_dev)]
    m3_note = (f"raw 8-bit view to the edge, uncompressed; member fine-tuned on single views "
               f"({finetuned})" if "m3shipped" in res else
               "raw 8-bit view to the edge, uncompressed; shipped member")
    for k, kind in enumerate(kinds):
        row(f"device-own[{k}]", own_acc[k], 1, 0.0, _mflops(member_fl[kind]), {"kind": kind})
        row(f"member3-view[{k}]", m3_acc[k], 1, raw, 0.0, {"note": m3_note})
        row(f"coop-single[{k}]", co_acc[k], 1, float(sess[k]), _mflops(fl[kind]["total"]),
            {"kind": kind}, float(full[k]))
    kb = max(range(n_dev), key=lambda k: own_acc[k])
    row("device-own[best]", own_acc[kb], 1, 0.0, _mflops(member_fl[kinds[kb]]),
        {"position": kb})
    km = max(range(n_dev), key=lambda k: m3_acc[k])
    row("member3-view[best]", m3_acc[km], 1, raw, 0.0, {"position": km, "note": m3_note})
    if "m3shipped" in res:
        sh_acc = [acc(res["m3shipped"][:, k]) for k in range(n_dev)]
        for k in range(n_dev):
            row(f"member3-view-shipped[{k}]", sh_acc[k], 1, raw, 0.0,
                {"note": "raw 8-bit view, the shipped member (not fine-tuned)"})
        ks = max(range(n_dev), key=lambda k: sh_acc[k])
        row("member3-view-shipped[best]", sh_acc[ks], 1, raw, 0.0, {"position": ks})
    q = torch.round(torch.softmax(res["own"], -1) * 255) / 255  # 8-bit probabilities
    classes = q.shape[2]
    own_mf = _mflops(max(member_fl.values()))
    row("average-own", acc(q.mean(1)), n_dev, float(classes), own_mf,
        {"note": f"{classes} 8-bit probabilities/device"})
    if n_dev > 1:
        for k in range(n_dev):
            rest = torch.cat([q[:, :k], q[:, k + 1:]], 1).mean(1)
            row(f"average-own-drop[{k}]", acc(rest), n_dev - 1, float(classes), own_mf)
    row("centralised", acc(res["central"]), 1, raw, 0.0,
        {"note": f"member {model.cfg.member} on the whole image ({_mflops(big)} MFLOPs)"})
    dev_mf = _mflops(max(f["total"] for f in fl.values()))
    row("coop-all", acc(res["all"]), n_dev, float(sess.mean()), dev_mf,
        {"per_device_bytes": [round(float(s), 2) for s in sess], "cells": model.cfg.cells,
         "numbers_per_device": model.width}, float(full.mean()))
    drops = [acc(res["drop"][:, k]) for k in range(res["drop"].shape[1])]
    for k, a in enumerate(drops):
        row(f"coop-drop[{k}]", a, n_dev - 1, float(sess.mean()), dev_mf)
    lm = res["loss_mask"]
    row("coop-loss", acc(res["loss"]), n_dev, float((res["bytes"] * lm).sum() / lm.sum()),
        dev_mf, {"delivered_share": round(float(lm.float().mean()), 4),
                 "empty_share": round(float((~lm.any(1)).float().mean()), 4)})
    # selective transmission: confidence order, and the best fixed position order
    order_c = device_order("confidence", res["conf"])
    order_f = torch.tensor(sorted(range(n_dev), key=lambda k: -co_acc[k]))
    prefixes_c = list(res["conf_prefix"].unbind(1))
    dev_mf_conf = _mflops(max(f["total"] for f in fl_own.values()))
    for name, order, prefixes, conf_round, mf in (
            ("selective-confidence", order_c, prefixes_c, True, dev_mf_conf),
            ("selective-fixed", order_f.view(1, -1), None, False, dev_mf)):
        if prefixes is None:  # fixed order: re-fuse the kept latents, round by round
            prefixes = list(fixed_prefixes(model, kinds, res["lats"], order,
                                           anchors=res.get("anchors")).unbind(1))
        for r in sweep(prefixes, order, res["bytes"], y, thresholds, conf_round):
            row(name, round(r["accuracy"], 4), n_dev, r["bytes_per_scene"] / n_dev, mf,
                {"threshold": r["threshold"], "bytes_per_scene": round(r["bytes_per_scene"], 2),
                 "devices_asked": round(r["devices_asked"], 3), "rounds": round(r["rounds"], 3),
                 **({"confidence_bytes": CONFIDENCE_BYTES} if conf_round else {})})
    for q in res.get("webp_qualities", []):
        sb = res[f"webp{q}_bytes"].float()
        fused_by = "fine-tuned" if "m3shipped" in res else "shipped"
        row(f"webp-q{q}", acc(res[f"webp{q}"]), n_dev, float(sb.mean()), 0.0,
            {"quality": q, "bytes_per_scene": round(float(sb.sum(1).mean()), 2),
             "payload_bytes_per_device": round(float(res[f"webp{q}_payload"].float().mean()), 2),
             "edge_mflops": round(n_dev * big / 1e6, 3),
             "note": f"WebP method 6, headers stripped, every view; {fused_by} member "
                     f"{model.cfg.member} on each decoded view, probabilities averaged "
                     "(device: the encoder, not counted in FLOPs)"},
            float(res[f"webp{q}_full"].float().mean()))
    for r in rows:
        r["views"] = json.dumps(view_record, sort_keys=True)
    return rows


@torch.no_grad()
def fixed_prefixes(model: CoopModel, kinds, lats: torch.Tensor, order: torch.Tensor,
                   batch_size: int = 500, anchors: Sequence[int] | None = None) -> torch.Tensor:
    """Fused logits ``(n, N, classes)`` after each round of a fixed asking ``order`` ``(N,)``,
    from the decoded latents ``(n, N, width)`` that :func:`collect` kept."""
    outs = []
    for s in range(0, len(lats), batch_size):
        lat = lats[s:s + batch_size]
        masks = prefix_masks(order.view(1, -1), len(lat))
        outs.append(torch.stack([model.edge(list(lat.unbind(1)), list(kinds), m,
                                            anchors=anchors).logits for m in masks], 1))
    return torch.cat(outs)


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in (("selective-confidence", "o-"), ("selective-fixed", "s--"),
                        ("webp", "^-.")):
        pts = sorted((r["bytes_per_scene"], 100 * r["accuracy"]) for r in rows
                     if r["method"] == name or (name == "webp" and r["method"].startswith(
                         "webp-q")))
        if pts:
            ax.plot(*zip(*pts), style, ms=3, label=name if name != "webp" else
                    "webp (method 6, stripped), every view, member fused")
    if any(r["method"].startswith("webp-q") for r in rows):
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    for name, color in (("coop-all", "k"), ("centralised", "g"), ("device-own[best]", "r"),
                        ("member3-view[best]", "m"), ("average-own", "c")):
        r = next((r for r in rows if r["method"] == name), None)
        if r is not None:
            tuned = " (fine-tuned)" if "fine-tuned" in str(r.get("note", "")) else ""
            ax.axhline(100 * r["accuracy"], color=color, lw=0.8, ls=":",
                       label=f"{name}{tuned} {100 * r['accuracy']:.1f}%")
    ax.set_xlabel("bytes per scene (streams in session framing + requests + confidences)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this command's options to ``p`` (``flowcodec.cli`` reuses them)."""
    p.add_argument("--model", required=True, help="coop checkpoint (flowcodec.coop.train --out)")
    p.add_argument("--family", default="cifar10", help="the family the model was trained on")
    p.add_argument("--n", type=int, default=None,
                   help="N test images, a fixed random subset (default all)")
    p.add_argument("--loss", type=float, default=0.3, help="i.i.d. device loss probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the device losses")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="selective transmission's confidence thresholds")
    p.add_argument("--finetuned", default=None,
                   help="the largest member fine-tuned on single views (finetune-coop's "
                        "--out): the member3-view rows and the WebP fusion use it")
    p.add_argument("--webp-qualities", type=int, nargs="+", default=[],
                   help="WebP qualities (1..100) of the baseline sending every view as WebP "
                        "(method 6, headers stripped); none by default")
    p.add_argument("--out-dir", required=True, help="where coop.csv, coop.json, coop.png go")
    from flowcodec.sweeps import add_common_arguments

    add_common_arguments(p, threads=None)  # --threads (default: torch's), --no-progress


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowcodec.coop.bench",
                                description="Benchmark cooperative inference against its "
                                            "baselines (docs/cooperative.md).")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """``python -m`` entry point: parse ``argv`` and :func:`run`."""
    return run(_parser().parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Run the command with parsed options ``a`` (what ``flowcodec.cli`` calls)."""
    from flowcodec.coop.finetune import load_finetuned
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.checkpoint import read_config

    if not 0 <= a.loss < 1:
        raise ConfigError(f"--loss must be in [0, 1), got {a.loss}")
    check_qualities(a.webp_qualities)  # before any work
    if a.threads:
        torch.set_num_threads(a.threads)
    fam = load_pretrained(a.family, progress=not a.no_progress).eval()
    model = load_coop(a.model, fam)
    extra = read_config(a.model).get("extra") or {}
    vrec = dict(extra.get("views") or {})
    vrec.pop("views", None)
    kinds = tuple(extra.get("kinds") or (model.cfg.kinds[0],) * vrec.get("devices", 4))
    views = ViewGenerator(ViewConfig(**vrec))
    anchors = extra.get("anchors") or list(anchor_ids(views.devices))
    finetuned, ft_record = None, None
    if a.finetuned:
        finetuned = load_finetuned(a.finetuned, fam, views.cfg)
        if finetuned.index != model.cfg.member:
            raise ConfigError(f"--finetuned holds member {finetuned.index}; the coop model "
                              f"finishes with member {model.cfg.member}")
        ft_extra = read_config(a.finetuned).get("extra") or {}
        ft_record = {k: ft_extra.get(k) for k in ("train", "budget_from", "seconds", "epochs",
                                                    "steps", "train_n", "view_accuracy",
                                                    "shipped_view_accuracy")}
    _, test = load_dataset(a.family)
    if a.n:
        test = test.sample(a.n)  # a fixed random subset: the test split is stored by class
    t0 = time.perf_counter()
    res = collect(model, kinds, views, test, a.loss, a.seed, progress=not a.no_progress,
                  finetuned=finetuned, webp_qualities=a.webp_qualities, anchors=anchors)
    rows = summarise(model, kinds, res, views.cfg.record(), a.thresholds,
                     finetuned=a.finetuned)
    seconds = time.perf_counter() - t0
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k))
    with open(out / "coop.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    flops = {k: model.device_flops(k, own_answer=True) for k in set(kinds)}
    (out / "coop.json").write_text(json.dumps({
        "model": str(a.model), "views": views.cfg.record(), "kinds": list(kinds),
        "cells": model.cfg.cells, "anchors": anchors,
        "train": extra.get("train"), "device_flops": flops, "seconds": round(seconds, 1),
        "finetuned": a.finetuned, "finetuned_record": ft_record, "rows": rows}, indent=1))
    write_plot(rows, out / "coop.png")
    for r in rows:
        if r["method"].startswith("selective") and r.get("threshold") not in (0.9, 0.99, 1.01):
            continue
        print(f"{r['method']:<24} {100 * r['accuracy']:6.2f}%  "
              f"{r['bytes_per_device'] if r['bytes_per_device'] is not None else '-':>6} B/dev  "
              f"{r['device_mflops']:8.2f} MFLOPs/dev"
              + (f"  t={r['threshold']}" if "threshold" in r else ""))
    print_targets(check(rows, _mflops(model.family.info()[1].flops)),
                  "targets (docs/cooperative.md; python -m flowcodec.coop.targets):")
    print(f"wrote {out / 'coop.csv'}, {out / 'coop.json'}, {out / 'coop.png'} "
          f"({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
