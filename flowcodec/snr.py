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

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowcodec.errors import ConfigError

__all__ = ["SNRRow", "run_snr", "load_config", "validate_config", "add_parser", "best_digital",
           "choose"]


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


_TOP = {"title", "dataset", "family", "member", "point", "samples", "seed", "snrs", "channels",
        "budgets", "jscc", "digital", "uses_plot_snrs", "coherence", "entry_seeds"}  # fmt: skip


def _num_list(cfg: dict, key: str, where: str, integer: bool = False) -> list:
    v = cfg.get(key)
    kind = int if integer else (int, float)
    if not isinstance(v, list) or not v or any(isinstance(a, bool) or not isinstance(a, kind)
                                               for a in v):  # fmt: skip
        raise ConfigError(f"{where}: {key!r} must be a non-empty list of "
                          f"{'ints' if integer else 'numbers'}, got {v!r}")  # fmt: skip
    return v


def validate_config(cfg: dict, where: str = "snr config") -> dict:
    """Check a whole config before any work; errors name the key and what is allowed."""
    from flowcodec.codecs.jscc_train import CHANNELS

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    unknown = set(cfg) - _TOP
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(_TOP)}")
    for k in ("dataset", "family"):
        if cfg.get(k) not in ("digits", "cifar10"):
            raise ConfigError(f"{where}: {k!r} must be 'digits' or 'cifar10', got {cfg.get(k)!r}")
    for k, lo, hi in (("member", 1, 3), ("point", 1, 3)):
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"{where}: {k!r} must be an int in {lo}..{hi}, got {v!r}")
    s = cfg.get("samples")
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
        raise ConfigError(f"{where}: 'samples' must be an int >= 1 or null, got {s!r}")
    snrs = _num_list(cfg, "snrs", where)
    if any(not -30 <= v <= 60 for v in snrs):
        raise ConfigError(f"{where}: 'snrs' must lie in -30..60 dB, got {snrs}")
    chans = cfg.get("channels")
    if not isinstance(chans, list) or not chans or any(c not in CHANNELS for c in chans):
        raise ConfigError(f"{where}: 'channels' must list names from {list(CHANNELS)}, "
                          f"got {chans!r}")  # fmt: skip
    budgets = _num_list(cfg, "budgets", where, integer=True)
    if any(b < 1 for b in budgets):
        raise ConfigError(f"{where}: 'budgets' must be channel uses >= 1, got {budgets}")
    labels: list[str] = []
    jscc = cfg.get("jscc", [])
    if not isinstance(jscc, list):
        raise ConfigError(f"{where}: 'jscc' must be a list of entries")
    for i, e in enumerate(jscc):
        w = f"{where}: jscc[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("label"), str):
            raise ConfigError(f"{w}: must be an object with a 'label'")
        extra = set(e) - {"label", "codec", "train", "uses", "told_snr", "uncoded", "channels",
                          "views"}  # fmt: skip
        if extra:
            raise ConfigError(f"{w}: unknown keys {sorted(extra)}")
        if ("codec" in e) == ("train" in e):
            raise ConfigError(f"{w}: give exactly one of 'codec' (name or path) and 'train'")
        ref = str(e.get("codec", ""))
        if ref.startswith("@") and ref[1:] not in labels:
            raise ConfigError(f"{w}: 'codec' {ref!r} names no earlier jscc entry "
                              f"(earlier: {labels})")  # fmt: skip
        labels.append(e["label"])
        u = e.get("uses", "schedule")
        if u != "schedule" and (not isinstance(u, list) or not u or any(
                isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in u)):
            raise ConfigError(f"{w}: 'uses' must be 'schedule' or a list of ints >= 1, "
                              f"got {u!r}")  # fmt: skip
        v = e.get("views", 1)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4:
            raise ConfigError(f"{w}: 'views' must be an int in 1..4, got {v!r}")
        t = e.get("told_snr")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise ConfigError(f"{w}: 'told_snr' must be a number, got {t!r}")
        if "train" in e:
            _check_train(e["train"], "jscc", cfg, w)
        ch = e.get("channels")
        if ch is not None and (not isinstance(ch, list) or any(c not in chans for c in ch)):
            raise ConfigError(f"{w}: 'channels' must list channels of the config, got {ch!r}")
    d = cfg.get("digital")
    if d is not None:
        w = f"{where}: digital"
        if not isinstance(d, dict) or ("codec" in d) == ("train" in d):
            raise ConfigError(f"{w}: give exactly one of 'codec' and 'train'")
        extra = set(d) - {"codec", "train", "label", "mcs", "exact_budgets", "exact_samples",
                          "rate_points"}
        if extra:
            raise ConfigError(f"{w}: unknown keys {sorted(extra)}")
        if "train" in d:
            _check_train(d["train"], "task", cfg, w)
        mcs = d.get("mcs", list(range(29)))
        if not isinstance(mcs, list) or not mcs or any(
                isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 28 for m in mcs):
            raise ConfigError(f"{w}: 'mcs' must list MCS indices in 0..28, got {mcs!r}")
        eb = d.get("exact_budgets", [])
        if not isinstance(eb, list) or any(b not in budgets for b in eb):
            raise ConfigError(f"{w}: 'exact_budgets' must list budgets of 'budgets', got {eb!r}")
        es = d.get("exact_samples", 500)
        if isinstance(es, bool) or not isinstance(es, int) or es < 1:
            raise ConfigError(f"{w}: 'exact_samples' must be an int >= 1, got {es!r}")
    ups = cfg.get("uses_plot_snrs", [])
    if not isinstance(ups, list) or any(v not in snrs for v in ups):
        raise ConfigError(f"{where}: 'uses_plot_snrs' must list SNRs of 'snrs', got {ups!r}")
    if not isinstance(cfg.get("entry_seeds", False), bool):
        raise ConfigError(f"{where}: 'entry_seeds' must be true or false, "
                          f"got {cfg['entry_seeds']!r}")  # fmt: skip
    return cfg


def _check_train(t, kind: str, cfg: dict, where: str) -> None:
    """A ``"train"`` object: known settings, and kwargs that build a codec at the split."""
    from dataclasses import fields

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig
    from flowcodec.codecs.train_task import TaskTrainConfig
    from flowcodec.family import build_family

    if not isinstance(t, dict) or not isinstance(t.get("kwargs", {}), dict):
        raise ConfigError(f"{where}: 'train' must be an object with optional 'kwargs' (object)")
    known = {f.name for f in fields(JSCCTrainConfig if kind == "jscc" else TaskTrainConfig)}
    extra = set(t) - known - {"kwargs"}
    if extra:
        raise ConfigError(f"{where}: unknown 'train' keys {sorted(extra)}; "
                          f"allowed {sorted(known | {'kwargs'})}")  # fmt: skip
    shape = build_family(cfg["family"]).feature_shape(cfg["point"])
    try:
        with torch.device("meta"):
            build_codec(kind, shape, **t.get("kwargs", {}))
    except ConfigError as e:
        raise ConfigError(f"{where}: 'train.kwargs': {e}") from None


def load_config(path_or_name: str) -> dict:
    """A config by path, or by name (``digits`` -> ``experiments/snr_digits.json``)."""
    p = Path(path_or_name)
    if not p.suffix and not p.exists():
        p = Path(__file__).resolve().parent.parent / "experiments" / f"snr_{path_or_name}.json"
    if not p.is_file():
        raise ConfigError(f"snr config {path_or_name} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
    return validate_config(cfg, f"snr config {p}")


def _load_codec(spec: str):
    from flowcodec.codecs.zoo import load_codec, load_pretrained_codec

    if "/" in spec or spec.endswith(".json"):
        return load_codec(spec)
    return load_pretrained_codec(spec)


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
    from flowcodec.codecs.jscc_train import make_channel

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
    from flowcodec.progress import tqdm

    rows = []
    jobs = _jscc_jobs(cfg, {**entry, "channels": channels})
    for j, (ch_name, snr, u) in enumerate(tqdm(jobs, desc=f"jscc {label}", leave=False,
                                               disable=not progress)):  # fmt: skip
        row = _jscc_cell(codec, label, hs, y, tail, cfg, entry, ch_name, snr, u, j)
        if row is not None:
            rows.append(row)
    return rows


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
    from channels import ExactLink, FastLink, get_mcs
    from flowcodec.codecs.jscc_train import make_channel

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
    from flowcodec.progress import tqdm

    label = dcfg.get("label", "separation")
    uses = _digital_uses(tables, dcfg)
    jobs = _digital_jobs({**cfg, "channels": channels})
    rows = []
    for j, (ch_name, snr) in enumerate(tqdm(jobs, desc=f"digital {label}", leave=False,
                                            disable=not progress)):  # fmt: skip
        rows += _digital_cell(tables, uses, cfg, dcfg, ch_name, snr, j)
    return rows


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
        from flowcodec.codecs.task import view_features

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
            self._loaded[spec] = _load_codec(spec)
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


def _with_views(codec, e: dict):
    """``(codec, views)`` for entry ``e``: with a ``"views"`` key, a shallow copy of the
    codec (the same weights) set to code that many input views; otherwise the codec as it
    is."""
    import copy

    if "views" not in e or e["views"] == codec.views:
        return codec, codec.views
    return copy.copy(codec).set_views(int(e["views"])), int(e["views"])


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
    cfg = validate_config(cfg)
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
            codec = _load_codec(e["codec"]) if "codec" in e else \
                _train_entry(ctx, cfg, k, progress)
        made[e["label"]] = codec
        _check_jscc(codec, e)
        codec, views = _with_views(codec, e)
        rows += _jscc_rows(codec.eval(), e["label"], ctx.view_features(views), y, tail, cfg,
                           e, e.get("channels", cfg["channels"]), progress)  # fmt: skip
        if write:
            _write(rows, cfg, out, start)
    d = cfg.get("digital")
    if d is not None:
        codec = _load_codec(d["codec"]) if "codec" in d else \
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
#: The context a Ray worker keeps between the units it runs (one run's at a time).
_WORKER_CONTEXTS: dict = {}


def snr_unit(cfg: dict, n: int | None, kind: str, index, codec=None):
    """One unit of an ``snr`` sweep, as a Ray task runs it. The family, data and shipped
    codecs are loaded by name, once per worker process; ``codec`` is a codec trained by an
    earlier unit (Ray hands it over from its object store).

    ``kind``: ``"reference"`` (returns ``[row]``), ``"train"`` (``index``: the entry;
    returns the trained codec), ``"jscc"`` (``index = (entry, cell)``), ``"digital-base"``
    or ``"digital"`` (``index``: the cell); these return their rows.
    """
    key = json.dumps([cfg, n], sort_keys=True)
    if key not in _WORKER_CONTEXTS:
        _WORKER_CONTEXTS.clear()
        _WORKER_CONTEXTS[key] = _Context(cfg, n, progress=False)
    ctx = _WORKER_CONTEXTS[key]
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
        codec, views = _with_views(codec, e)
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
    from flowcodec.scale.ray_engine import SweepFailed, UnitFailure, write_failures

    jscc = cfg.get("jscc", [])
    d = cfg.get("digital")
    trains = ray_trained_entries(cfg)

    def name(k: int) -> str:
        return jscc[k]["label"] if k < len(jscc) else d.get("label", "separation")

    # round 1: the reference row, and every codec trained here
    args = [(cfg, n, "reference", 0)] + [(cfg, n, "train", k) for k in trains]
    labels = ["reference"] + [f"train {name(k)}" for k in trains]
    res, failures = engine.map(snr_unit, args, labels, order=list(range(len(args)))[::-1],
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
    res2, fail2 = engine.map(snr_unit, [c[0] for c in cells], [c[1] for c in cells],
                             order=order, desc="snr: cells (ray)")  # fmt: skip
    n1 = len(args)
    failures += [UnitFailure(f.index + n1, f.label, f.error, f.traceback) for f in fail2]
    failures += [UnitFailure(-1, s, "not run: no codec") for s in skipped]
    rows = list(ref_rows)
    for r in res2:  # the cells were listed in the serial run's order
        rows += r or []
    if failures:
        if write and rows:
            _write(rows, cfg, out, start)
        out.mkdir(parents=True, exist_ok=True)
        write_failures(failures, out / "failures.json")
        raise SweepFailed(failures, rows, out)
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
    fields = list(SNRRow.__dataclass_fields__)
    with open(out / "snr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in asdict(r).items()})  # fmt: skip
    rec = {"config": cfg, "seconds": round(time.perf_counter() - start, 1),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "rows": [asdict(r) for r in rows]}  # fmt: skip
    (out / "snr.json").write_text(json.dumps(rec, indent=1, default=str))
    picks = choose(rows)
    if picks:
        with open(out / "choice.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(picks[0]))
            w.writeheader()
            w.writerows(picks)


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


def cmd_snr(args) -> int:
    import sys

    from flowcodec.scale.ray_engine import SweepFailed, engine_from_args

    torch.set_num_threads(max(1, args.threads))
    cfg = load_config(args.config)
    engine = engine_from_args(args)
    if engine is not None:
        ray_trained_entries(cfg)  # refuse before starting Ray
    try:
        if engine is not None:
            engine.start()
        rows = run_snr(cfg, args.out, n=args.n, progress=not args.no_progress, engine=engine)
    except SweepFailed as e:
        for f in e.failures:
            print(f"failed: {f}", file=sys.stderr)
        print(f"{len(e.rows)} rows written to {Path(args.out) / 'snr.csv'}; the failed units "
              f"are in {Path(args.out) / 'failures.json'}", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        if engine is not None:
            print(f"ray: {engine.stats.summary()}", file=sys.stderr)
            engine.close()
    ref = rows[0]
    print(f"reference: {ref.label} {100 * ref.accuracy:.2f}% on {ref.n} test images")
    for r in rows[1:]:
        if r.channel == "none":
            continue
        told = f" told {r.told_snr_db:g} dB" if r.told_snr_db is not None else ""
        print(f"{r.scheme:10s} {r.label:24s} {r.channel:14s} {r.link:7s} {r.snr_db:6.1f} dB"
              f"{told} budget {str(r.budget):>5s} uses {r.uses:7.1f}  {100 * r.accuracy:6.2f}%"
              f"  {r.detail}")  # fmt: skip
    picks = choose(rows)
    if picks:
        print("\nanalog or digital at equal channel uses (choice.csv):")
        for p in picks:
            print(f"  {p['channel']:10s} {p['snr_db']:6.1f} dB <= {p['budget']:4d} uses: "
                  f"jscc {100 * p['jscc_accuracy']:6.2f}% ({p['jscc_uses']:.0f} uses) vs "
                  f"separation {100 * p['separation_accuracy']:6.2f}% -> {p['winner']}")
    print(f"wrote {Path(args.out) / 'snr.csv'}, snr.json, choice.csv, snr.png, uses.png")
    return 0


def add_parser(subparsers) -> None:
    """Add the ``snr`` subcommand to the ``flowcodec`` command's subparsers."""
    p = subparsers.add_parser(
        "snr", help="accuracy against SNR and channel uses: JSCC codecs against separation",
        description="Measure JSCC codecs (features straight to channel symbols) across SNRs "
        "and channels, against the best digital chain (learned codec + CRC + 5G LDPC + the "
        "best MCS) at the same number of complex channel uses per image, on the fast and "
        "the exact link. The config is checked whole before any work starts. Writes "
        "snr.csv, snr.json, snr.png and uses.png.")  # fmt: skip
    p.add_argument("--config", required=True,
                   help="JSON config: a path, or digits / cifar10 for experiments/snr_NAME.json")
    p.add_argument("--out", default="runs/snr", help="output folder (default runs/snr)")
    p.add_argument("--n", type=int, default=None, help="test images (default: the config's)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from flowcodec.scale.ray_engine import add_engine_arguments

    add_engine_arguments(p)
    p.set_defaults(func=cmd_snr)
