"""Saving and loading modules as safetensors plus a small JSON config (never pickle).

``save_checkpoint(module, "path/name")`` writes ``name.safetensors`` (the weights) and
``name.json`` (``{"kind": ..., "config": ..., "extra": ..., "sha256": ...}``). ``load_family``
rebuilds a family from its JSON config through the registry and loads the weights, refusing
with a :class:`CheckpointError` that names the mismatch when they were made for another
architecture.

A checkpoint is checked before anything is built from it: the SHA-256 of the weights file
must match the one in the JSON (safetensors has no checksum of its own, so a flipped
weight bit would otherwise load silently), and the module its config describes is first
built on the ``meta`` device (no memory) and its tensor shapes compared with the file's, so
a config asking for a huge model is refused instead of allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flowcodec.errors import CheckpointError

__all__ = ["save_checkpoint", "load_state", "load_into", "load_family", "read_config",
           "weights_sha256", "record_sha256", "check_fits", "MAX_CHECKPOINT_BYTES"]  # fmt: skip

#: Largest weights file a checkpoint may have (it is read into memory to be hashed).
MAX_CHECKPOINT_BYTES = 1 << 31


def weights_sha256(path_or_bytes: str | os.PathLike | bytes) -> str:
    """Hex SHA-256 of a weights file (or of its bytes), as stored in the checkpoint JSON."""
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return hashlib.sha256(path_or_bytes).hexdigest()
    return hashlib.sha256(Path(path_or_bytes).read_bytes()).hexdigest()


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    # Append rather than replace a suffix: "codec-l0.3" must not become "codec-l0.json".
    return p.parent / f"{p.name}.safetensors", p.parent / f"{p.name}.json"


def save_checkpoint(
    module: nn.Module, path: str | os.PathLike, kind: str, config: dict, extra: dict | None = None,
    half: bool = False,
) -> Path:
    """Write the module's state dict and its JSON config; returns the weights' path.

    ``half`` stores floating-point tensors as float16 (half the bytes; loading copies them
    back into the module's float32 parameters, so the loaded module computes with the
    rounded weights: measure it after a round trip)."""
    from safetensors.torch import save_file

    weights, meta = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"kind": kind})
    record = {"kind": kind, "config": config, "extra": extra or {},
              "sha256": weights_sha256(weights)}  # fmt: skip
    meta.write_text(json.dumps(record, indent=2))
    return weights


def record_sha256(path: str | os.PathLike) -> str:
    """Write the SHA-256 of a checkpoint's weights into its JSON (for a checkpoint saved
    before hashes were recorded, or whose weights were rewritten on purpose); returns it.
    The JSON text is kept as it is apart from the ``sha256`` entry."""
    weights, meta = _paths(path)
    cfg = read_config(path)
    digest = weights_sha256(weights)
    text = meta.read_text()
    if "sha256" in cfg:
        cfg["sha256"] = digest
        indent = 1 if text.startswith('{\n "') else 2
        meta.write_text(json.dumps(cfg, indent=indent))
    else:
        head, rest = text.split("{", 1)
        pad = rest[: len(rest) - len(rest.lstrip())]
        meta.write_text(f'{head}{{{pad}"sha256": "{digest}",{pad}{rest.lstrip()}')
    return digest


def read_config(path: str | os.PathLike) -> dict:
    """The JSON config saved beside a checkpoint."""
    _, meta = _paths(path)
    if not meta.is_file():
        raise CheckpointError(f"checkpoint config {meta} not found")
    try:
        cfg = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or "kind" not in cfg or "config" not in cfg:
        raise CheckpointError(f"{meta} lacks the 'kind' and 'config' fields")
    return cfg


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, after checking the file against the
    SHA-256 its JSON records (CheckpointError if missing, unreadable or altered)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    weights, meta = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    want = read_config(path).get("sha256")
    if not isinstance(want, str) or len(want) != 64:
        raise CheckpointError(f"{meta} records no SHA-256 of the weights ('sha256'): re-save "
                              "the checkpoint with save_checkpoint or save_codec")  # fmt: skip
    size = weights.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{weights} has {size} bytes, over {MAX_CHECKPOINT_BYTES}")
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{weights} is not readable: {e}") from e
    if weights_sha256(data) != want.lower():
        raise CheckpointError(f"{weights} does not match the SHA-256 in {meta.name}: the "
                              "weights are damaged or were replaced")  # fmt: skip
    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e


def check_fits(build: Callable[[], nn.Module], state: dict[str, torch.Tensor],
               what: str = "module") -> None:  # fmt: skip
    """Build the module ``build()`` makes on the ``meta`` device (no memory) and raise
    CheckpointError unless every tensor of its state dict has the shape ``state`` holds
    (empty buffers, sized later by ``update()``, may take any shape). This bounds what the
    real build allocates by the size of the weights file."""
    try:
        with torch.device("meta"):
            module = build()
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, MemoryError,
            NotImplementedError) as e:  # fmt: skip
        raise CheckpointError(f"cannot build {what} from its config: {e}") from e
    own = module.state_dict()
    bad = [f"{k}: config {tuple(v.shape)} vs file {tuple(state[k].shape)}"
           for k, v in own.items() if k in state and v.numel() > 0
           and tuple(v.shape) != tuple(state[k].shape)]  # fmt: skip
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if bad:
            parts.append(f"shape mismatches {bad[:3]}")
        raise CheckpointError(f"checkpoint does not fit this {what} (another architecture?): "
                              + "; ".join(parts))  # fmt: skip


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str = "module") -> None:
    """Load ``state`` into ``module`` strictly, naming missing, unexpected or misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{'...' if len(shapes) > 3 else ''}")
        raise CheckpointError(
            f"checkpoint does not fit this {what} (another architecture?): " + "; ".join(parts)
        )
    module.load_state_dict(state, strict=True)


def load_family(path: str | os.PathLike, expect: dict | None = None):
    """Rebuild a family from ``path`` (config through the registry, then the weights).

    ``expect`` (e.g. ``{"name": "cifar10"}``) is compared with the saved config first.
    """
    from flowcodec.family.zoo import build_family

    cfg = read_config(path)
    if cfg["kind"] != "family":
        raise CheckpointError(f"{path} holds a {cfg['kind']!r}, not a family")
    fcfg = dict(cfg["config"])
    if expect:
        for k, v in expect.items():
            if fcfg.get(k) != v:
                raise CheckpointError(
                    f"checkpoint config has {k}={fcfg.get(k)!r}, expected {v!r}"
                )
    name = fcfg.pop("name", None)
    state = load_state(path)
    check_fits(lambda: build_family(name, **fcfg), state, what=f"family {name!r}")
    try:
        fam = build_family(name, **fcfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild family from config {cfg['config']}: {e}") from e
    load_into(fam, state, what=f"family {name!r}")
    fam.eval()
    return fam
