"""``flowcodec snr``: accuracy against SNR and channel uses, JSCC against separation.

The config (JSON, ``experiments/snr_cifar10.json``, ``experiments/snr_digits.json``) names a
family, a member (the receiver's), a split point, SNRs, channels and channel-use budgets,
and two kinds of entries:

- ``"jscc"``: JSCC codecs (:class:`~flowcodec.codecs.jscc.JSCCCodec`; ``"codec"`` a shipped
  name or a checkpoint path, or ``"train"`` to train one here). Each is measured at every
  SNR and channel at each of its ``"uses"`` (channel-use counts, or ``"schedule"``: what
  its schedule picks per SNR), optionally told a fixed ``"told_snr"`` whatever the channel
  (SNR mismatch), through the exact link's QAM modulator without channel coding
  (``"uncoded": true``, discrete codecs), and coding ``"views"`` input views (1..4) into
  each transmission (:class:`~flowcodec.codecs.jscc.JSCCCodec`'s ``views``; the same
  channel uses, the device runs its layers once per view);
- ``"digital"``: the separation chain: a learned codec (``"codec"``: a shipped task codec
  with one packet, or ``"train"``) at each of its rate points, its payload bytes sent as
  one transport block (CRC16 + 5G LDPC + QAM) at every MCS of ``"mcs"``. For each channel,
  SNR and channel-use budget, the (rate point, MCS) pair with the highest accuracy on the
  fast (table-driven) link among those whose packets fit the budget is the separation row
  (an image whose packet does not fit, or is lost, gets the decoder's concealment); the
  same pair is then run on the exact link for ``"exact_budgets"`` on ``"exact_samples"``
  images. The choice is made on the test images themselves, and the payload is sent
  without the stream's header and prefix (the receiver is told the rate point): both
  favour separation.

Writes ``snr.csv`` (one row per measurement), ``snr.json`` (rows + config + timing),
``choice.csv`` (:func:`choose`: JSCC or separation at each channel, SNR and budget),
``snr.png`` (accuracy against SNR, one panel per channel) and ``uses.png`` (accuracy
against channel uses at each SNR of ``"uses_plot_snrs"``).

    flowcodec snr --config experiments/snr_cifar10.json --out runs/snr_cifar10
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowcodec.config import (
    Any_,
    Bool,
    In,
    ListOf,
    MapOf,
    Num,
    Obj,
    Str,
    _family_members,
    _known,
    _raise,
)
from flowcodec.errors import ConfigError
from flowcodec.sweeps.codec_spec import codec_from_spec, with_views
from flowcodec.sweeps.runner import (
    Sweep,
    map_units,
    raise_failures,
    worker_context,
    write_csv,
    write_json,
)

__all__ = ["SNRRow", "run_snr", "load_config", "validate_config", "add_parser", "best_digital",
           "choose", "SWEEP"]  # fmt: skip


@dataclass
class SNRRow:
    """One measured point."""

    scheme: str  # "reference", "jscc", "separation"
    label: str
    channel: str
    link: str  # "analog", "uncoded", "fast", "exact", "none"
    snr_db: float
    told_snr_db: float | None
    budget: int | None  # channel-use budget (separation) or requested uses (jscc)
    uses: float  # mean channel uses per image actually spent
    accuracy: float
    n: int
    detail: str = ""

def validate_config(cfg: dict, where: str = "snr config") -> dict:
    """Check a whole config before any work; one ConfigError names every bad key and what
    is allowed (the keys: see the module notes and ``experiments/snr_*.json``)."""
    from channels import CHANNELS

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    known = _known()
    k = _family_members(cfg.get("family"))
    note = f"the {cfg.get('family')} family has {k} members" if k else ""
    split = Num(integer=True, lo=1, hi=k, note=note) if k else Num(integer=True, lo=1)
    # values of another key ("exact_budgets" of "budgets"); anything when that key is bad
    listed = {key: In(tuple(cfg[key])) if isinstance(cfg.get(key), list) else Any_()
              for key in ("snrs", "channels", "budgets")}  # fmt: skip
    entries = [e for e in (cfg.get("jscc") if isinstance(cfg.get("jscc"), list) else [])
               if isinstance(e, dict)] + [cfg.get("digital")]  # fmt: skip
    trains = any(isinstance(e, dict) and "train" in e for e in entries)
    shape = _split_shape(cfg, k) if trains else None  # codecs trained here are built on it
    jscc = Obj({
        "label": Str(), "codec": Str(what="a shipped codec name, a checkpoint path or '@label'"),
        "train": Any_(), "uses": Any_(), "told_snr": Num(optional=True),
        "uncoded": Bool(optional=True),
        "channels": ListOf(listed["channels"], what="a list of the config's channels",
                           optional=True),
        "views": Num(integer=True, lo=1, hi=4),
    }, required=("label",), what="a jscc entry (an object)",
        extra=lambda e, path, errors: _check_jscc_entry(e, path, errors, shape))  # fmt: skip
    digital = Obj({
        "codec": Str(what="a shipped codec name or a checkpoint path"), "train": Any_(),
        "label": Str(),
        "mcs": ListOf(Num(integer=True, lo=0, hi=28), min_len=1, what="a list of MCS indices"),
        "exact_budgets": ListOf(listed["budgets"], what="a list of budgets of 'budgets'"),
        "exact_samples": Num(integer=True, lo=1),
        "rate_points": ListOf(Num(integer=True, lo=0), min_len=1, what="a list of rate points"),
    }, what="an object", optional=True,
        extra=lambda d, path, errors: _check_digital(d, path, errors, shape))
    schema = Obj({
        "title": Str(), "dataset": Str(choices=known["datasets"]),
        "family": Str(choices=known["families"]), "member": split, "point": split,
        "samples": Num(integer=True, lo=1, optional=True), "seed": Num(integer=True),
        "snrs": ListOf(Num(lo=-30, hi=60, note="dB"), min_len=1, what="a list of SNRs in dB"),
        "channels": ListOf(Str(choices=tuple(CHANNELS)), min_len=1,
                           what="a list of channel names"),
        "budgets": ListOf(Num(integer=True, lo=1), min_len=1,
                          what="a list of channel-use budgets (ints >= 1)"),
        "jscc": ListOf(jscc, what="a list of jscc entries (objects)"), "digital": digital,
        "uses_plot_snrs": ListOf(listed["snrs"], what="a list of SNRs of 'snrs'"),
        "coherence": Num(integer=True, lo=1), "entry_seeds": Bool(),
    }, required=("dataset", "family", "member", "point", "snrs", "channels", "budgets"))
    errors: list[str] = []
    schema.check(cfg, "", errors)
    labels: list = []  # an "@label" codec is an earlier entry's
    for i, e in enumerate(cfg.get("jscc") if isinstance(cfg.get("jscc"), list) else []):
        if not isinstance(e, dict):
            continue
        ref = e.get("codec")
        if isinstance(ref, str) and ref.startswith("@") and ref[1:] not in labels:
            errors.append(f"jscc[{i}].codec: {ref!r} names no earlier jscc entry; earlier: "
                          f"{', '.join(map(repr, labels)) or 'none'}")  # fmt: skip
        labels.append(e.get("label"))
    _raise(errors, where)
    return cfg


def _split_shape(cfg: dict, members: int | None):
    """The feature shape at the config's split point, or None when the family or point is
    not valid (reported elsewhere)."""
    from flowcodec.family import build_family

    p = cfg.get("point")
    if not members or isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= members:
        return None
    return build_family(cfg["family"]).feature_shape(p)


def _check_one_source(e: dict, path: str, errors: list[str]) -> bool:
    if ("codec" in e) == ("train" in e):
        errors.append(f"{path}: give exactly one of 'codec' (a name or path) and 'train'")
        return False
    return True


def _check_jscc_entry(e: dict, path: str, errors: list[str], shape) -> None:
    u = e.get("uses", "schedule")
    if u != "schedule":
        ListOf(Num(integer=True, lo=1), min_len=1,
               what="'schedule' or a list of channel-use counts (ints >= 1)"
               ).check(u, f"{path}.uses", errors)  # fmt: skip
    if _check_one_source(e, path, errors) and "train" in e:
        _check_train(e["train"], "jscc", shape, f"{path}.train", errors)


def _check_digital(d: dict, path: str, errors: list[str], shape) -> None:
    if _check_one_source(d, path, errors) and "train" in d:
        _check_train(d["train"], "task", shape, f"{path}.train", errors)


def _check_train(t, kind: str, shape, path: str, errors: list[str]) -> None:
    """A ``"train"`` object: known settings, and kwargs that build a codec at the split."""
    from dataclasses import fields

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig
    from flowcodec.codecs.train_task import TaskTrainConfig

    known = {f.name for f in fields(JSCCTrainConfig if kind == "jscc" else TaskTrainConfig)}
    spec = Obj({**{name: Any_() for name in sorted(known)}, "kwargs": MapOf(Any_())},
               what="an object of training settings with optional 'kwargs'")  # fmt: skip
    before = len(errors)
    spec.check(t, path, errors)
    if len(errors) > before or shape is None:
        return
    try:
        with torch.device("meta"):
            build_codec(kind, shape, **t.get("kwargs", {}))
    except ConfigError as e:
        errors.append(f"{path}.kwargs: {e}")


def load_config(path_or_name: str) -> dict:
    """A config by path, or by name (``digits``: ``snr_digits.json`` in ``$FLOWCODEC_CONFIGS``
    or ``experiments/``), checked whole."""
    return SWEEP.load(path_or_name)


# --- the measurements -----------------------------------------------------------------------
@torch.no_grad()
def _accuracy_of(tail, feats: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> torch.Tensor:
    """Per-image correctness ``(N,)`` bool of the tail on ``feats``."""
    out = [tail(feats[i:i + bs]).argmax(1) == y[i:i + bs] for i in range(0, len(y), bs)]
    return torch.cat(out)


def _jscc_jobs(cfg: dict, entry: dict) -> list[tuple]:
    """The cells of a JSCC entry, in order: ``(channel, snr, uses or None)``. A cell's
    place ``j`` in this list seeds its channel and its generator."""
    uses_spec = entry.get("uses", "schedule")
    return [(c, s, u) for c in entry.get("channels", cfg["channels"]) for s in cfg["snrs"]
            for u in ([None] if uses_spec == "schedule" else uses_spec)]  # fmt: skip


@torch.no_grad()
def _jscc_cell(codec, label, hs, y, tail, cfg, entry, ch_name, snr, u, j) -> SNRRow | None:
    """The row of one cell (``j``: its place in :func:`_jscc_jobs`); ``None`` when the
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
def _jscc_rows(codec, label, hs, y, tail, cfg, entry, channels, progress) -> list[SNRRow]:
    jobs = _jscc_jobs(cfg, {**entry, "channels": channels})
    args = [(codec, label, hs, y, tail, cfg, entry, c, s, u, j) for j, (c, s, u) in enumerate(jobs)]
    rows, _ = map_units(_jscc_cell, args, desc=f"jscc {label}", progress=progress, leave=False)
    return [r for r in rows if r is not None]


def _digital_tables(codec, hs, y, tail, rate_points) -> dict:
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
        ok = _accuracy_of(tail, feats, y)
        lost = [Bitstream(streams[0].header, [None])]
        conceal = tail(view.decompress(lost)).argmax(1).expand(len(y)) == y
        out[r] = {"payloads": payloads, "ok": ok, "conceal": conceal}
    return out


def best_digital(acc: dict) -> tuple:
    """The key with the highest accuracy of ``{(rate_point, mcs): accuracy}`` (ties: the
    lower MCS, then the lower rate point)."""
    return max(acc, key=lambda k: (acc[k], -k[1], -k[0]))


def _digital_jobs(cfg: dict) -> list[tuple]:
    """The cells of the digital chain, in order: ``(channel, snr)``; a cell's place ``j``
    seeds its channel and link."""
    return [(c, s) for c in cfg["channels"] for s in cfg["snrs"]]


def _digital_uses(tables, dcfg) -> dict:
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


def _digital_cell(tables, uses, cfg, dcfg, ch_name, snr, j) -> list[SNRRow]:
    """The separation rows of one (channel, SNR) cell, ``j`` its place in
    :func:`_digital_jobs`: one per budget on the fast link, and the exact-link rows."""
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


def _digital_base_rows(tables, dcfg, n: int) -> list[SNRRow]:
    """One row per rate point with no channel: the accuracy of the decoded packets."""
    label = dcfg.get("label", "separation")
    return [SNRRow("separation", f"{label} r{r} (no channel)", "none", "none", math.nan, None,
                   None, 0.0, float(t["ok"].float().mean()), n,
                   f"payload {sum(map(len, t['payloads'])) / n:.2f} B")
            for r, t in tables.items()]  # fmt: skip


def _digital_rows(tables, cfg, dcfg, channels, progress) -> list[SNRRow]:
    uses = _digital_uses(tables, dcfg)
    jobs = _digital_jobs({**cfg, "channels": channels})
    args = [(tables, uses, cfg, dcfg, c, s, j) for j, (c, s) in enumerate(jobs)]
    cells, _ = map_units(_digital_cell, args, desc=f"digital {dcfg.get('label', 'separation')}",
                         progress=progress, leave=False)  # fmt: skip
    return [r for cell in cells for r in cell]


def _train_jscc_entry(e, fam, cfg, train, test, progress):
    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, train_jscc

    t = dict(e["train"])
    kwargs = t.pop("kwargs", {})
    codec = build_codec("jscc", fam.feature_shape(cfg["point"]), **kwargs)
    tc = JSCCTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
    train_jscc(codec, fam, cfg["member"], cfg["point"], train, None, tc, progress=progress)
    return codec.eval()


def _train_digital(d, fam, cfg, train, progress):
    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train_task import TaskTrainConfig, train_task_codec

    t = dict(d["train"])
    kwargs = {"packets": 1, **t.pop("kwargs", {})}
    codec = build_codec("task", fam.feature_shape(cfg["point"]), **kwargs)
    tc = TaskTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
    train_task_codec(codec, fam, cfg["member"], cfg["point"], train, None, tc, progress=progress)
    codec.eval().update(force=True)
    return codec


class _Context:
    """What every unit of a run needs, loaded by name: the family (eval mode), the data,
    the split, the test images' head features ``hs`` and labels ``y``, and the reference
    accuracy. Codecs loaded by name and the digital chain's tables are kept for the next
    unit (a Ray worker keeps one context between the units it runs)."""

    def __init__(self, cfg: dict, n: int | None, progress: bool):
        from flowcodec.data import load_dataset
        from flowcodec.family import load_pretrained

        self.fam = load_pretrained(cfg["family"], progress=progress).eval()
        self.train, test = load_dataset(cfg["dataset"])
        n = n or cfg.get("samples")
        self.data = test if n is None or n >= len(test) else \
            test.subset(n, seed=int(cfg.get("seed", 0)))
        self.head, self.tail = self.fam.split(cfg["member"], cfg["point"])
        with torch.no_grad():
            xs, ys = zip(*self.data.batches(500))
            self.hs = torch.cat([self.head(x).float() for x in xs])
            self.y = torch.cat(ys)
            self.ref = float(_accuracy_of(self.tail, self.hs, self.y).float().mean())
        self._loaded: dict = {}
        self._tables: dict = {}
        self._views: dict = {1: self.hs}

    def view_features(self, views: int) -> torch.Tensor:
        """The test images' features of their first ``views`` input views, stacked on the
        channel axis (what a JSCC codec coding ``views`` views takes); kept."""
        from flowcodec.views import view_features

        if views not in self._views:
            with torch.no_grad():
                self._views[views] = torch.cat([view_features(self.head, x, views).float()
                                                for x, _ in self.data.batches(500)])
        return self._views[views]

    def reference(self, cfg: dict) -> SNRRow:
        return SNRRow("reference", f"member {cfg['member']} uncompressed", "none", "none",
                      math.nan, None, None, 0.0, self.ref, len(self.y))  # fmt: skip

    def load(self, spec: str):
        if spec not in self._loaded:
            self._loaded[spec] = codec_from_spec(spec)
        return self._loaded[spec]

    def tables(self, codec, dcfg: dict) -> tuple[dict, dict]:
        """The digital chain's tables (:func:`_digital_tables`) and channel uses
        (:func:`_digital_uses`) for ``codec``, kept by the codec's weights."""
        rps = dcfg.get("rate_points", list(range(getattr(codec, "rates", 1))))
        key = (_fingerprint(codec), json.dumps(dcfg, sort_keys=True))
        if key not in self._tables:
            self._tables.clear()
            tables = _digital_tables(codec, self.hs, self.y, self.tail, rps)
            self._tables[key] = (tables, _digital_uses(tables, dcfg))
        return self._tables[key]


def _fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state (names, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _entry_seed(cfg: dict, k: int) -> int:
    """With ``"entry_seeds": true``: the seed of the torch generator a trained entry's codec
    is initialised from (``k``: the JSCC entry, or ``len(cfg["jscc"])`` for the digital
    chain), made from the config's seed and the entry's kind and label, so adding,
    removing or moving other entries does not change it."""
    import zlib

    jscc = cfg.get("jscc", [])
    name = f"jscc:{jscc[k]['label']}" if k < len(jscc) else \
        f"digital:{cfg['digital'].get('label', 'separation')}"
    return (int(cfg.get("seed", 0)) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _train_entry(ctx: _Context, cfg: dict, k: int, progress: bool):
    """Train JSCC entry ``k`` (or the digital chain's codec, ``k == len(cfg["jscc"])``)."""
    jscc = cfg.get("jscc", [])
    if cfg.get("entry_seeds"):
        torch.manual_seed(_entry_seed(cfg, k))
    if k < len(jscc):
        return _train_jscc_entry(jscc[k], ctx.fam, cfg, ctx.train, ctx.data, progress)
    return _train_digital(cfg["digital"], ctx.fam, cfg, ctx.train, progress)


def _jscc_source(cfg: dict, k: int) -> tuple[str, object]:
    """Where JSCC entry ``k``'s codec comes from: ``("train", entry index)`` or
    ``("load", name or path)``, following ``"@label"`` references."""
    jscc = cfg["jscc"]
    e = jscc[k]
    while str(e.get("codec", "")).startswith("@"):
        k = next(i for i, o in enumerate(jscc) if o["label"] == e["codec"][1:])
        e = jscc[k]
    return ("load", e["codec"]) if "codec" in e else ("train", k)


def _check_jscc(codec, e: dict) -> None:
    if getattr(codec, "name", None) != "jscc":
        raise ConfigError(f"jscc entry {e['label']!r}: {e.get('codec')} is not a jscc codec")


def run_snr(cfg: dict, out: str | Path, n: int | None = None, progress: bool = True,
            write: bool = True, engine=None) -> list[SNRRow]:  # fmt: skip
    """Run a (validated) config; write ``snr.csv``, ``snr.json`` and the plots to ``out``.

    ``engine`` (a :class:`~flowcodec.scale.RayEngine`) runs the units of the sweep as Ray
    tasks (docs/scale.md): first the reference and the training of every ``"train"``
    entry, then every cell (a JSCC entry's (channel, SNR, uses); the digital chain's
    (channel, SNR), and its rows without a channel). Each loads the family, data and
    shipped codecs by name; a trained codec is put in Ray's object store once. The rows
    are the serial run's, in its order. A config that trains needs ``"entry_seeds":
    true`` (each trained codec is then initialised from its own seed, so it does not
    depend on the entries trained before it). A unit that raises is reported with its
    sweep point; the rest complete, their rows are written with ``failures.json``, and
    :class:`~flowcodec.scale.SweepFailed` is raised.
    """
    start = time.perf_counter()
    SWEEP.check(cfg)  # whole, before any work
    out = Path(out)
    if engine is not None:
        return _run_snr_ray(cfg, out, n, engine, start, write)
    ctx = _Context(cfg, n, progress)
    hs, y, tail = ctx.hs, ctx.y, ctx.tail
    rows = [ctx.reference(cfg)]
    made: dict = {}
    for k, e in enumerate(cfg.get("jscc", [])):
        if str(e.get("codec", "")).startswith("@"):  # a codec of an earlier entry
            codec = made[e["codec"][1:]]
        else:
            codec = codec_from_spec(e["codec"]) if "codec" in e else \
                _train_entry(ctx, cfg, k, progress)
        made[e["label"]] = codec
        _check_jscc(codec, e)
        codec = with_views(codec, e["views"]) if "views" in e else codec
        views = codec.views
        rows += _jscc_rows(codec.eval(), e["label"], ctx.view_features(views), y, tail, cfg,
                           e, e.get("channels", cfg["channels"]), progress)  # fmt: skip
        if write:
            _write(rows, cfg, out, start)
    d = cfg.get("digital")
    if d is not None:
        codec = codec_from_spec(d["codec"]) if "codec" in d else \
            _train_entry(ctx, cfg, len(cfg.get("jscc", [])), progress)
        rps = d.get("rate_points", list(range(getattr(codec, "rates", 1))))
        tables = _digital_tables(codec, hs, y, tail, rps)
        rows += _digital_base_rows(tables, d, len(y))
        rows += _digital_rows(tables, cfg, d, cfg["channels"], progress)
    if write:
        _write(rows, cfg, out, start)
        plot(rows, cfg, out)
    return rows


# --- the sweep on Ray -------------------------------------------------------------------------
def snr_unit(cfg: dict, n: int | None, kind: str, index, codec=None):
    """One unit of an ``snr`` sweep, as a Ray task runs it. The family, data and shipped
    codecs are loaded by name, once per worker process; ``codec`` is a codec trained by an
    earlier unit (Ray hands it over from its object store).

    ``kind``: ``"reference"`` (returns ``[row]``), ``"train"`` (``index``: the entry;
    returns the trained codec), ``"jscc"`` (``index = (entry, cell)``), ``"digital-base"``
    or ``"digital"`` (``index``: the cell); these return their rows.
    """
    ctx = worker_context("snr", [cfg, n], lambda: _Context(cfg, n, progress=False))
    if kind == "reference":
        return [ctx.reference(cfg)]
    if kind == "train":
        return _train_entry(ctx, cfg, int(index), progress=False)
    if kind == "jscc":
        k, j = index
        e = cfg["jscc"][k]
        if codec is None:
            how, spec = _jscc_source(cfg, k)
            if how != "load":
                raise ConfigError(f"jscc entry {e['label']!r}: its trained codec was not given")
            codec = ctx.load(spec)
        _check_jscc(codec, e)
        codec = with_views(codec, e["views"]) if "views" in e else codec
        views = codec.views
        ch_name, snr, u = _jscc_jobs(cfg, e)[j]
        row = _jscc_cell(codec.eval(), e["label"], ctx.view_features(views), ctx.y, ctx.tail,
                         cfg, e, ch_name, snr, u, j)  # fmt: skip
        return [] if row is None else [row]
    d = cfg["digital"]
    if codec is None:
        if "codec" not in d:
            raise ConfigError("digital: its trained codec was not given")
        codec = ctx.load(d["codec"])
    tables, uses = ctx.tables(codec, d)
    if kind == "digital-base":
        return _digital_base_rows(tables, d, len(ctx.y))
    if kind == "digital":
        ch_name, snr = _digital_jobs(cfg)[index]
        return _digital_cell(tables, uses, cfg, d, ch_name, snr, index)
    raise ValueError(f"unknown snr unit kind {kind!r}")


def ray_trained_entries(cfg: dict) -> list[int]:
    """The entries a config trains (JSCC entry indices; ``len(cfg["jscc"])`` for the
    digital chain), checked for a run on Ray: a config that trains needs
    ``"entry_seeds": true``."""
    jscc = cfg.get("jscc", [])
    d = cfg.get("digital")
    trains = [k for k, e in enumerate(jscc) if "train" in e]
    if d is not None and "train" in d:
        trains.append(len(jscc))
    if trains and not cfg.get("entry_seeds"):
        raise ConfigError('--engine ray: this config trains codecs, so it needs '
                          '"entry_seeds": true (each trained codec is then initialised from '
                          'its own seed, in the serial run too; docs/scale.md)')  # fmt: skip
    return trains


def _run_snr_ray(cfg: dict, out: Path, n, engine, start: float, write: bool) -> list[SNRRow]:
    """The units of a run on a Ray engine, in two rounds (the reference and the training,
    then the cells); the rows in the serial run's order."""
    from flowcodec.scale.ray_engine import UnitFailure

    jscc = cfg.get("jscc", [])
    d = cfg.get("digital")
    trains = ray_trained_entries(cfg)

    def name(k: int) -> str:
        return jscc[k]["label"] if k < len(jscc) else d.get("label", "separation")

    # round 1: the reference row, and every codec trained here
    args = [(cfg, n, "reference", 0)] + [(cfg, n, "train", k) for k in trains]
    labels = ["reference"] + [f"train {name(k)}" for k in trains]
    res, failures = map_units(snr_unit, args, labels, engine=engine,
                              order=list(range(len(args)))[::-1],
                              desc="snr: reference and training (ray)")  # fmt: skip
    ref_rows = res[0] or []
    trained = {k: engine.put(c) for k, c in zip(trains, res[1:]) if c is not None}
    # round 2: the cells, as (args, label), listed in the serial run's order
    cells, skipped = [], []
    for k, e in enumerate(jscc):
        how, src = _jscc_source(cfg, k)
        extra = ()
        if how == "train":
            if src not in trained:
                skipped.append(f"{e['label']} (its codec, entry {name(src)!r}, was not trained)")
                continue
            extra = (trained[src],)
        for j, (c, s, u) in enumerate(_jscc_jobs(cfg, e)):
            cells.append(((cfg, n, "jscc", (k, j)) + extra,
                          f"{e['label']}: {c}, {s:g} dB" + ("" if u is None else f", {u} uses")))
    if d is not None:
        extra = ()
        if "train" in d:
            if len(jscc) in trained:
                extra = (trained[len(jscc)],)
            else:
                skipped.append(f"{name(len(jscc))} (its codec was not trained)")
        if "codec" in d or extra:
            cells.append(((cfg, n, "digital-base", 0) + extra,
                          f"{name(len(jscc))}: no channel"))
            for j, (c, s) in enumerate(_digital_jobs(cfg)):
                cells.append(((cfg, n, "digital", j) + extra,
                              f"{name(len(jscc))}: {c}, {s:g} dB"))
    # the digital cells (a link per rate point and MCS) are the longest: submit them first
    order = sorted(range(len(cells)), key=lambda i: (cells[i][0][2] != "digital", i))
    res2, fail2 = map_units(snr_unit, [c[0] for c in cells], [c[1] for c in cells],
                            engine=engine, order=order, desc="snr: cells (ray)")  # fmt: skip
    n1 = len(args)
    failures += [UnitFailure(f.index + n1, f.label, f.error, f.traceback) for f in fail2]
    failures += [UnitFailure(-1, s, "not run: no codec") for s in skipped]
    rows = list(ref_rows)
    for r in res2:  # the cells were listed in the serial run's order
        rows += r or []
    raise_failures(failures, rows, out, (lambda rs: _write(rs, cfg, out, start)) if write
                   else None)  # fmt: skip
    if write:
        _write(rows, cfg, out, start)
        plot(rows, cfg, out)
    return rows


def choose(rows: list[SNRRow]) -> list[dict]:
    """Analog or digital, per channel, SNR and channel-use budget: the most accurate JSCC
    row (told the true SNR, at most ``budget`` uses on average) against the separation row
    (fast link) at that budget; ``winner`` is ``"jscc"``, ``"separation"`` or ``"tie"``
    (within 0.1 point). What a policy picks per SNR, and where separation wins."""
    out = []
    seps = [r for r in rows if r.scheme == "separation" and r.link == "fast"]
    for s in seps:
        cands = [r for r in rows if r.scheme == "jscc" and r.told_snr_db is None
                 and r.channel == s.channel and r.snr_db == s.snr_db
                 and r.uses <= s.budget + 1e-9]  # fmt: skip
        if not cands:
            continue
        j = max(cands, key=lambda r: (r.accuracy, -r.uses))
        gap = 100 * (j.accuracy - s.accuracy)
        out.append({"channel": s.channel, "snr_db": s.snr_db, "budget": s.budget,
                    "jscc": j.label, "jscc_link": j.link, "jscc_uses": j.uses,
                    "jscc_accuracy": j.accuracy, "separation_accuracy": s.accuracy,
                    "separation": s.detail, "gap_points": round(gap, 2),
                    "winner": "tie" if abs(gap) < 0.1 else ("jscc" if gap > 0 else
                                                            "separation")})  # fmt: skip
    return out


def _write(rows, cfg, out: Path, start: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "snr.csv", rows, fields=list(SNRRow.__dataclass_fields__), digits=4)
    write_json(out / "snr.json", {"config": cfg, "seconds": round(time.perf_counter() - start, 1),
                                  "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                  "rows": [asdict(r) for r in rows]})  # fmt: skip
    picks = choose(rows)
    if picks:
        write_csv(out / "choice.csv", picks)


def plot(rows: list[SNRRow], cfg: dict, out: Path) -> None:
    """``snr.png`` (accuracy vs SNR per channel) and ``uses.png`` (accuracy vs uses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in rows if r.scheme == "reference"), None)
    chans = cfg["channels"]
    fig, axes = plt.subplots(1, len(chans), figsize=(5.5 * len(chans), 4.2), squeeze=False)
    big = max(cfg["budgets"])
    # fast-link budgets drawn: those also run on the exact link, and the largest
    shown = set((cfg.get("digital") or {}).get("exact_budgets", [])) | {big}
    for ax, ch in zip(axes[0], chans):
        series: dict[str, list] = {}
        for r in rows:
            if r.channel != ch:
                continue
            if r.scheme == "jscc":
                key = f"{r.label} ({r.detail}{', ' + r.link if r.link != 'analog' else ''})"
            elif r.budget in shown or r.link == "exact":
                key = f"{r.label} {r.link} link, <= {r.budget} uses"
            else:
                continue
            series.setdefault(key, []).append((r.snr_db, 100 * r.accuracy))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    "--" if "link" in key else "-", marker="o", ms=3, label=key)  # fmt: skip
        if ref:
            ax.axhline(100 * ref.accuracy, color="k", lw=0.8, ls=":", label=ref.label)
        ax.set(title=ch, xlabel="SNR (Es/N0, dB)", ylabel="accuracy %", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(cfg.get("title", "accuracy against SNR"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "snr.png", dpi=130)
    plt.close(fig)
    snrs = cfg.get("uses_plot_snrs") or cfg["snrs"][:1]
    fig, axes = plt.subplots(1, len(snrs), figsize=(5 * len(snrs), 4), squeeze=False)
    ch = chans[0]
    for ax, s in zip(axes[0], snrs):
        series = {}
        for r in rows:
            if r.channel != ch or r.snr_db != s or (r.scheme == "jscc" and r.budget is None):
                continue
            if r.scheme == "jscc" and r.told_snr_db is None:
                series.setdefault(f"{r.label} ({r.link})", []).append((r.uses, 100 * r.accuracy))
            elif r.scheme == "separation" and r.link == "fast":
                series.setdefault(f"{r.label} (fast link)", []).append((r.budget,
                                                                       100 * r.accuracy))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        if ref:
            ax.axhline(100 * ref.accuracy, color="k", lw=0.8, ls=":", label=ref.label)
        ax.set(title=f"{ch}, {s:g} dB", xlabel="complex channel uses per image",
               ylabel="accuracy %", xscale="log", ylim=(0, 100))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "uses.png", dpi=130)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------
def replot(run: str | Path) -> None:
    """Redraw ``snr.png`` and ``uses.png`` of a finished run from its ``snr.json``."""
    rec = json.loads((Path(run) / "snr.json").read_text())
    plot([SNRRow(**r) for r in rec["rows"]], rec["config"], Path(run))


class SNRSweep(Sweep):
    """``flowcodec snr``."""

    name = "snr"
    outputs = "snr.csv"
    help = "accuracy against SNR and channel uses: JSCC codecs against separation"
    description = ("Measure JSCC codecs (features straight to channel symbols) across SNRs "
                   "and channels, against the best digital chain (learned codec + CRC + 5G "
                   "LDPC + the best MCS) at the same number of complex channel uses per "
                   "image, on the fast and the exact link. The config is checked whole before "
                   "any work starts. Writes snr.csv, snr.json, snr.png and uses.png.")
    samples_help = "test images, >= 1 (default: the config's samples, else all)"

    def validate(self, cfg, where):
        return validate_config(cfg, where)

    def check_engine(self, cfg, args) -> None:
        ray_trained_entries(cfg)  # refuse before starting Ray

    def execute(self, cfg, args, engine) -> list[SNRRow]:
        return run_snr(cfg, args.out, n=args.samples, progress=not args.no_progress,
                       engine=engine)  # fmt: skip

    def report(self, cfg: dict, rows: list[SNRRow], args) -> None:
        ref = rows[0]
        print(f"reference: {ref.label} {100 * ref.accuracy:.2f}% on {ref.n} test images")
        for r in rows[1:]:
            if r.channel == "none":
                continue
            told = f" told {r.told_snr_db:g} dB" if r.told_snr_db is not None else ""
            print(f"{r.scheme:10s} {r.label:24s} {r.channel:14s} {r.link:7s} {r.snr_db:6.1f} dB"
                  f"{told} budget {str(r.budget):>5s} uses {r.uses:7.1f}  "
                  f"{100 * r.accuracy:6.2f}%  {r.detail}")  # fmt: skip
        picks = choose(rows)
        if picks:
            print("\nanalog or digital at equal channel uses (choice.csv):")
        for p in picks:
            print(f"  {p['channel']:10s} {p['snr_db']:6.1f} dB <= {p['budget']:4d} uses: "
                  f"jscc {100 * p['jscc_accuracy']:6.2f}% ({p['jscc_uses']:.0f} uses) vs "
                  f"separation {100 * p['separation_accuracy']:6.2f}% -> {p['winner']}")
        print(f"wrote {Path(args.out) / 'snr.csv'}, snr.json, choice.csv, snr.png, uses.png")


SWEEP = SNRSweep()


def add_parser(subparsers) -> None:
    """Add the ``snr`` subcommand to the ``flowcodec`` command's subparsers."""
    SWEEP.add_parser(subparsers)
