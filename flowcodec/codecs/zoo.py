"""Saving and loading codecs (safetensors + JSON), and the trained codecs shipped with flowcodec.

A codec checkpoint is ``NAME.safetensors`` (its state dict, frozen CDF tables included)
and ``NAME.json`` (``{"kind": "codec", "config": {"name": ..., "kwargs": ...}, "extra":
...}``). To keep shipped checkpoints small, the weights of the transforms (convolutions)
are stored as float16 (``half=True``); entropy-model parameters and tables stay exact.
The codec is evaluated *after* such rounding, so the numbers reported for a shipped
codec are the numbers of the shipped weights.

Example
-------
>>> from flowcodec.codecs.zoo import list_pretrained
>>> isinstance(list_pretrained(), list)
True
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flowcodec.codecs.base import FeatureCodec, build_codec
from flowcodec.errors import CheckpointError

__all__ = ["CODEC_ZOO", "save_codec", "load_codec", "list_pretrained", "load_pretrained_codec",
           "round_half"]  # fmt: skip

CODEC_ZOO = Path(__file__).resolve().parent.parent / "zoo" / "codecs"

_EXACT = ("entropy_bottleneck", "gaussian_conditional", "conceal")


def _is_exact(key: str) -> bool:
    return any(part in key for part in _EXACT)


@torch.no_grad()
def round_half(codec: FeatureCodec) -> FeatureCodec:
    """Round the transforms' float weights to float16 precision in place (what is shipped)."""
    for k, v in codec.state_dict().items():
        if v.is_floating_point() and not _is_exact(k):
            v.copy_(v.half().float())
    return codec


def save_codec(codec: FeatureCodec, path: str | os.PathLike, kwargs: dict,
               extra: dict | None = None, half: bool = True) -> Path:  # fmt: skip
    """Write ``codec`` (call ``update()`` first) with the kwargs that rebuild it."""
    import json

    from safetensors.torch import save_file

    from flowcodec.family.checkpoint import _paths, weights_sha256

    weights, meta = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in codec.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point() and not _is_exact(k):
            v = v.half()
        state[k] = v
    save_file(state, str(weights), metadata={"kind": "codec"})
    cfg = {"name": codec.name, "feature_shape": list(codec.feature_shape), "kwargs": kwargs}
    record = {"kind": "codec", "config": cfg, "extra": extra or {},
              "sha256": weights_sha256(weights)}  # checked by load_codec  # fmt: skip
    meta.write_text(json.dumps(record, indent=1))
    return weights


def load_codec(path: str | os.PathLike, backend: str = "auto") -> FeatureCodec:
    """Rebuild a codec from its JSON config and load its weights (float32, eval mode)."""
    from flowcodec.codecs.entropy import check_model_tables
    from flowcodec.family.checkpoint import check_fits, load_into, load_state, read_config

    cfg = read_config(path)
    if cfg["kind"] != "codec":
        raise CheckpointError(f"{path} holds a {cfg['kind']!r}, not a codec")
    c = cfg["config"]
    # The weights first (SHA-256 checked), then the config built on the meta device and
    # compared with them: nothing is allocated that the weights file does not hold.
    state = load_state(path)
    try:
        kwargs = dict(c.get("kwargs", {}))
        if "backend" not in kwargs and c["name"] in LEARNED_CODECS:
            kwargs["backend"] = backend
        shape = tuple(c["feature_shape"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot rebuild codec from {c}: {e}") from e
    check_fits(lambda: build_codec(c["name"], shape, **kwargs), state, f"codec {c['name']!r}")
    try:
        codec = build_codec(c["name"], shape, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild codec from {c}: {e}") from e
    own = codec.state_dict()
    # CDF tables are sized by update(): resize the empty buffers to the saved ones.
    for k, v in state.items():
        if k in own and own[k].numel() == 0 and v.numel() > 0:
            _set_buffer(codec, k, torch.empty_like(v))
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in state.items()}
    load_into(codec, state, what=f"codec {c['name']!r}")
    try:
        check_model_tables(codec)  # before any C++ coder sees them
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return codec.eval()


# registry names of the learned codecs
LEARNED_CODECS = ("factorized", "hyperprior", "binary", "task", "token-prune", "token-merge")


def _set_buffer(module: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    *path, leaf = key.split(".")
    m = module
    for p in path:
        m = getattr(m, p)
    setattr(m, leaf, value)


def list_pretrained() -> list[str]:
    """Names of the codec checkpoints shipped in ``flowcodec/zoo/codecs``."""
    if not CODEC_ZOO.is_dir():
        return []
    return sorted(p.stem for p in CODEC_ZOO.glob("*.safetensors"))


def load_pretrained_codec(name: str, backend: str = "auto") -> FeatureCodec:
    """Load a shipped codec by name (see :func:`list_pretrained`)."""
    path = CODEC_ZOO / name
    if not path.with_suffix(".safetensors").is_file():
        raise CheckpointError(f"no shipped codec {name!r}; available: {list_pretrained()}")
    return load_codec(path, backend=backend)
