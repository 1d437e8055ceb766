"""Saving and loading modules as safetensors plus a small JSON config (never pickle).

``save_checkpoint(module, "path/name")`` writes ``name.safetensors`` (the weights) and
``name.json`` (``{"kind": ..., "config": ..., "extra": ...}``). ``load_family`` rebuilds a
family from its JSON config through the registry and loads the weights, refusing with a
:class:`CheckpointError` that names the mismatch when they were made for another
architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from flowcodec.errors import CheckpointError

__all__ = ["save_checkpoint", "load_state", "load_into", "load_family", "read_config"]


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    # Append rather than replace a suffix: "codec-l0.3" must not become "codec-l0.json".
    return p.parent / f"{p.name}.safetensors", p.parent / f"{p.name}.json"


def save_checkpoint(
    module: nn.Module, path: str | os.PathLike, kind: str, config: dict, extra: dict | None = None
) -> Path:
    """Write the module's state dict and its JSON config; returns the weights' path."""
    from safetensors.torch import save_file

    weights, meta = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(weights), metadata={"kind": kind})
    meta.write_text(json.dumps({"kind": kind, "config": config, "extra": extra or {}}, indent=2))
    return weights


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
    """The tensors of a safetensors file (CheckpointError if missing or unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e


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
    try:
        fam = build_family(name, **fcfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild family from config {cfg['config']}: {e}") from e
    load_into(fam, load_state(path), what=f"family {name!r}")
    fam.eval()
    return fam
