"""What the units of an ``snr`` run share: the loaded family, data and features
(:class:`SNRContext`), and where each entry's codec comes from (shipped, or trained here
from its own seed)."""

from __future__ import annotations

import json
import math

import torch

from flowcodec.errors import ConfigError
from flowcodec.snr.cells import accuracy_of, digital_tables, digital_uses
from flowcodec.snr.rows import SNRRow
from flowcodec.sweeps.codec_spec import codec_from_spec

__all__ = ["SNRContext", "fingerprint", "entry_seed", "train_entry", "jscc_source",
           "check_jscc"]


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


class SNRContext:
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
            self.ref = float(accuracy_of(self.tail, self.hs, self.y).float().mean())
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
        """The digital chain's tables (:func:`digital_tables`) and channel uses
        (:func:`digital_uses`) for ``codec``, kept by the codec's weights."""
        rps = dcfg.get("rate_points", list(range(getattr(codec, "rates", 1))))
        key = (fingerprint(codec), json.dumps(dcfg, sort_keys=True))
        if key not in self._tables:
            self._tables.clear()
            tables = digital_tables(codec, self.hs, self.y, self.tail, rps)
            self._tables[key] = (tables, digital_uses(tables, dcfg))
        return self._tables[key]


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state (names, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def entry_seed(cfg: dict, k: int) -> int:
    """With ``"entry_seeds": true``: the seed of the torch generator a trained entry's codec
    is initialised from (``k``: the JSCC entry, or ``len(cfg["jscc"])`` for the digital
    chain), made from the config's seed and the entry's kind and label, so adding,
    removing or moving other entries does not change it."""
    import zlib

    jscc = cfg.get("jscc", [])
    name = f"jscc:{jscc[k]['label']}" if k < len(jscc) else \
        f"digital:{cfg['digital'].get('label', 'separation')}"
    return (int(cfg.get("seed", 0)) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def train_entry(ctx: SNRContext, cfg: dict, k: int, progress: bool):
    """Train JSCC entry ``k`` (or the digital chain's codec, ``k == len(cfg["jscc"])``)."""
    jscc = cfg.get("jscc", [])
    if cfg.get("entry_seeds"):
        torch.manual_seed(entry_seed(cfg, k))
    if k < len(jscc):
        return _train_jscc_entry(jscc[k], ctx.fam, cfg, ctx.train, ctx.data, progress)
    return _train_digital(cfg["digital"], ctx.fam, cfg, ctx.train, progress)


def jscc_source(cfg: dict, k: int) -> tuple[str, object]:
    """Where JSCC entry ``k``'s codec comes from: ``("train", entry index)`` or
    ``("load", name or path)``, following ``"@label"`` references."""
    jscc = cfg["jscc"]
    e = jscc[k]
    while str(e.get("codec", "")).startswith("@"):
        k = next(i for i, o in enumerate(jscc) if o["label"] == e["codec"][1:])
        e = jscc[k]
    return ("load", e["codec"]) if "codec" in e else ("train", k)


def check_jscc(codec, e: dict) -> None:
    if getattr(codec, "name", None) != "jscc":
        raise ConfigError(f"jscc entry {e['label']!r}: {e.get('codec')} is not a jscc codec")
