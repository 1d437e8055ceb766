"""Saving and loading codecs (safetensors + JSON), and the trained codecs shipped with flowcodec.

A codec checkpoint is ``NAME.safetensors`` (its state dict, frozen CDF tables included)
and ``NAME.json`` (``{"kind": "codec", "config": {"name": ..., "kwargs": ...}, "extra":
...}``). To keep shipped checkpoints small, the weights of the transforms (convolutions)
are stored as float16 (``half=True``); entropy-model parameters and tables stay exact.
The codec is evaluated *after* such rounding, so the numbers reported for a shipped
codec are the numbers of the shipped weights.

A *variant* shares tensors with another checkpoint beside it (:func:`save_codec_variant`):
its JSON names it (``"weights_of"``, pinned by that checkpoint's SHA-256) and maps its
tensor names to that checkpoint's (``"shared"``); a safetensors file of its own holds the
rest, if any. The one-packet form of a codec is a JSON file alone.

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

__all__ = ["CODEC_ZOO", "save_codec", "save_codec_variant", "load_codec", "list_pretrained",
           "load_pretrained_codec", "round_half"]  # fmt: skip

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


def _stored_state(codec: FeatureCodec, half: bool) -> dict[str, torch.Tensor]:
    """``codec``'s state as a checkpoint stores it: on the CPU, contiguous, the transforms'
    float weights as float16 when ``half`` (entropy models and concealment stay exact)."""
    state = {}
    for k, v in codec.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = v.half() if half and v.is_floating_point() and not _is_exact(k) else v
    return state


def save_codec(codec: FeatureCodec, path: str | os.PathLike, kwargs: dict,
               extra: dict | None = None, half: bool = True) -> Path:  # fmt: skip
    """Write ``codec`` (call ``update()`` first) with the kwargs that rebuild it."""
    import json

    from safetensors.torch import save_file

    from flowcodec.family.checkpoint import _paths, weights_sha256

    weights, meta = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(_stored_state(codec, half), str(weights), metadata={"kind": "codec"})
    cfg = {"name": codec.name, "feature_shape": list(codec.feature_shape), "kwargs": kwargs}
    record = {"kind": "codec", "config": cfg, "extra": extra or {},
              "sha256": weights_sha256(weights)}  # checked by load_codec  # fmt: skip
    meta.write_text(json.dumps(record, indent=1))
    return weights


def save_codec_variant(codec: FeatureCodec, path: str | os.PathLike, weights_of: str,
                       kwargs: dict, extra: dict | None = None) -> Path:  # fmt: skip
    """Write ``codec`` as a variant of the checkpoint ``weights_of`` beside ``path``: every
    tensor of its state (as :func:`save_codec` would store it) that equals one of
    ``weights_of``'s is loaded from there (the JSON maps the names); the rest, if any, go
    to its own safetensors file. Returns the JSON's path."""
    import json

    from safetensors.torch import save_file

    from flowcodec.family.checkpoint import _paths, load_state, read_config, weights_sha256

    weights, meta = _paths(path)
    src = meta.parent / _variant_name(weights_of)
    index: dict = {}
    for k, v in load_state(src).items():
        index.setdefault((v.dtype, tuple(v.shape), v.numpy().tobytes()), k)
    shared, own = {}, {}
    for k, v in _stored_state(codec, half=True).items():
        hit = index.get((v.dtype, tuple(v.shape), v.numpy().tobytes()))
        if hit is None:
            own[k] = v
        else:
            shared[k] = hit
    cfg = {"name": codec.name, "feature_shape": list(codec.feature_shape), "kwargs": kwargs}
    record = {"kind": "codec", "config": cfg, "extra": extra or {}, "weights_of": weights_of,
              "weights_of_sha256": read_config(src)["sha256"], "shared": shared}  # fmt: skip
    if own:
        save_file(own, str(weights), metadata={"kind": "codec"})
        record["sha256"] = weights_sha256(weights)
    elif weights.is_file():
        weights.unlink()
    meta.write_text(json.dumps(record, indent=1))
    return meta


def _variant_state(path, cfg: dict) -> dict[str, torch.Tensor]:
    """The state of a variant checkpoint: the tensors it shares with ``weights_of`` (that
    checkpoint's SHA-256 checked against the one recorded), plus its own file's."""
    from flowcodec.family.checkpoint import _paths, load_state, read_config

    weights, meta = _paths(path)
    src = meta.parent / _variant_name(cfg["weights_of"])
    if read_config(src).get("sha256") != cfg.get("weights_of_sha256"):
        raise CheckpointError(f"{meta}: variant of {cfg['weights_of']}, whose weights have "
                              f"changed since (SHA-256 differs)")  # fmt: skip
    shared = cfg.get("shared")
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in shared.items()):  # fmt: skip
        raise CheckpointError(f"{meta}: 'shared' must map tensor names to tensor names")
    theirs = load_state(src)
    missing = sorted(set(shared.values()) - theirs.keys())
    if missing:
        raise CheckpointError(f"{meta}: shares tensors {missing[:3]} that "
                              f"{cfg['weights_of']} does not hold")  # fmt: skip
    state = {k: theirs[v] for k, v in shared.items()}
    if "sha256" in cfg:
        own = load_state(path)
        both = sorted(own.keys() & state.keys())
        if both:
            raise CheckpointError(f"{meta}: tensors {both[:3]} both shared and its own")
        state.update(own)
    return state


def _variant_name(name) -> str:
    """A ``weights_of`` entry: a checkpoint name in the same folder, nothing else."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        raise CheckpointError(f"weights_of must name a checkpoint in the same folder, got {name!r}")
    return name


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
    if "weights_of" in cfg:  # a variant: tensors of another checkpoint, pinned by SHA-256
        state = _variant_state(path, cfg)
    else:
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
    return sorted(p.stem for p in CODEC_ZOO.glob("*.json"))


def load_pretrained_codec(name: str, backend: str = "auto") -> FeatureCodec:
    """Load a shipped codec by name (see :func:`list_pretrained`)."""
    path = CODEC_ZOO / name
    if not path.with_suffix(".json").is_file():
        raise CheckpointError(f"no shipped codec {name!r}; available: {list_pretrained()}")
    return load_codec(path, backend=backend)
