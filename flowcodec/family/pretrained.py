"""Trained families: the recipes that make them and where their checkpoints live.

- ``digits`` trains in seconds on a CPU, so it is trained on first use and cached in
  ``$FLOWCODEC_CACHE/models`` (``~/.cache/flowcodec/models``).
- ``cifar10`` ships with the package (``flowcodec/zoo/cifar10-family.*``); the command
  that made it is in docs/family.md (``flowcodec train-family``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from flowcodec.data import cache_dir, load_dataset
from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.family.checkpoint import load_family, save_checkpoint
from flowcodec.family.train import TrainConfig, TrainResult, train_family
from flowcodec.family.zoo import build_family

__all__ = ["RECIPES", "ZOO_DIR", "pretrained_path", "save_family", "load_pretrained",
           "family_dataset", "image_families",
           "train_recipe", "grow_recipe"]  # fmt: skip

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

#: Training recipe per family (the defaults of ``flowcodec train-family``).
RECIPES: dict[str, dict] = {
    "digits": {
        "family": {},
        "train": dict(epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-4, optimizer="adamw"),
    },
    "cifar10": {
        "family": {"width": 32},
        "train": dict(epochs=40, batch_size=512, lr=0.2, weight_decay=5e-4, optimizer="sgd",
                      label_smoothing=0.1),  # fmt: skip
        # ``train-family --grow xl``: members 1 and 2 kept, a wide member 3 trained on their
        # frozen trunk (flowcodec.family.grow; docs/family.md), sized for 2 CPU cores.
        "grow": dict(epochs=10, batch_size=256, lr=0.15, weight_decay=5e-4, views=6, pad=2,
                     label_smoothing=0.2),  # fmt: skip
        # ``--grow air``: a member 4 branching after stage 1 (airbench's last two groups on
        # the frozen 64x16x16 features of split point 1); these settings replace ``grow``'s.
        "grow_kinds": {"air": dict(epochs=14, views=6)},
    },
    # ``cifar10`` plus a cloud member 4 branching after stage 1, grown on its frozen trunk
    # (``train-family --family cifar10-cloud`` = ``--family cifar10 --grow air`` saved under
    # this name; docs/family.md).
    "cifar10-cloud": {
        "family": {"width": 32, "cloud": "air"},
        "data": "cifar10",
        "grow_from": ["cifar10", "air"],
    },
    # The cloud-tier family (flowcodec.family.air; docs/family.md): devices pay at most the
    # cifar10 members' FLOPs, the largest member runs at the edge or in the cloud. Its own
    # trainer (the airbench-style recipe), sized for 2 CPU cores in about an hour.
    "cifar10-air": {
        "family": {"widths": [64, 128, 512], "exit_widths": [128, 256], "extra": 1},
        "data": "cifar10",
        "trainer": "air",
        "train": dict(epochs=10.0, batch_size=1024, lr=10.0, momentum=0.85,
                      weight_decay=0.0153, label_smoothing=0.2,
                      exit_weights=[0.5, 0.5, 1.0]),  # fmt: skip
    },
    # airbench's own network (flowcodec.family.air.airbench_net), one member, on images: what
    # its recipe reaches on this data with one view (docs/family.md; 52 minutes on 2 cores).
    "airbench": {
        "family": {"widths": [64, 256, 256]},
        "data": "cifar10",
        "trainer": "air",
        "train": dict(epochs=10.0, batch_size=1024, lr=11.5, momentum=0.85,
                      weight_decay=0.0153, label_smoothing=0.2, exit_weights=[1.0]),  # fmt: skip
    },
    # Sized for 2 CPU cores in under 90 minutes (docs/family.md): the stem starts as the
    # trained cifar10 family's first stage, and its member 3 is the distillation teacher.
    "cifar10-vit": {
        "family": {"dim": 128, "heads": 4, "mlp_ratio": 2, "depths": [2, 2, 2]},
        "data": "cifar10",
        "teacher": "cifar10",
        "stem_from": "cifar10",
        "train": dict(epochs=12, batch_size=128, lr=1e-3, weight_decay=0.05, optimizer="adamw",
                      amp=True, distill=0.5, temperature=4.0),  # fmt: skip
    },
}


def family_dataset(name: str) -> str:
    """The dataset family ``name`` is trained and evaluated on (its recipe's ``data``, else
    its own name)."""
    return RECIPES.get(name, {}).get("data", name)


def image_families() -> tuple[str, ...]:
    """The families with a recipe on an image dataset: what the image commands offer."""
    from flowcodec.data import DATASETS

    return tuple(sorted(n for n in RECIPES if family_dataset(n) in DATASETS))


def pretrained_path(name: str) -> Path:
    """Where the checkpoint of family ``name`` is looked for (without suffix)."""
    shipped = ZOO_DIR / f"{name}-family"
    if shipped.with_suffix(".safetensors").is_file():
        return shipped
    return cache_dir() / "models" / f"{name}-family"


def save_family(family: EarlyExitFamily, path: str | os.PathLike, result: TrainResult | None = None,
                half: bool = False, **extra) -> Path:  # fmt: skip
    """Save a family's weights (safetensors) and config (JSON) with its measured figures.
    ``half``: store the weights as float16 (see :func:`save_checkpoint`)."""
    info = {"members": [vars(m) for m in family.info()]}
    if result is not None:
        info.update(test_accuracy=result.accuracies, train_seconds=round(result.seconds, 1))
    if half:
        info["stored_as"] = "float16"
    info.update(extra)
    return save_checkpoint(family, path, "family", family.config, info, half=half)


def train_recipe(name: str, device: str = "cpu", progress: bool = True, data_root=None,
                 dist=None, checkpoint=None, resume: bool = False, init=None,
                 **overrides) -> tuple[EarlyExitFamily, TrainResult]:  # fmt: skip
    """Train family ``name`` with its recipe (``overrides`` change TrainConfig fields).

    ``dist``, ``checkpoint`` and ``resume`` are passed to :func:`train_family` (training
    under torchrun, and resuming from the last saved epoch). ``init`` (a saved family of
    the same name and configuration; air trainer only) starts from its weights: a warm
    restart with a fresh schedule."""
    if name not in RECIPES:
        raise ConfigError(f"no recipe for family {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if "grow_from" in recipe:  # trained by growing the family it names
        if init is not None or dist is not None and dist.active:
            raise ConfigError(f"{name} is grown from {recipe['grow_from'][0]}: no init, "
                              "no torchrun")  # fmt: skip
        return grow_recipe(name, None, device=device, progress=progress, data_root=data_root,
                           checkpoint=checkpoint, resume=resume, **overrides)  # fmt: skip
    data = recipe.get("data", name)
    kwargs = {"root": data_root} if data == "cifar10" else {}
    train, test = load_dataset(data, **kwargs)
    if recipe.get("trainer") == "air":
        from flowcodec.family.air import AirConfig, train_air

        if dist is not None and dist.active:
            raise ConfigError(f"{name}'s trainer runs in one process (no torchrun)")
        cfg = AirConfig(**{**recipe["train"], **overrides, "device": device,
                           "progress": progress})  # fmt: skip
        torch.manual_seed(cfg.seed)
        fam = build_family(name, **recipe["family"])
        if init is not None:
            _load_init(fam, init, name)
        return fam, train_air(fam, train, test, cfg, checkpoint=checkpoint, resume=resume,
                              warm=init is not None)  # fmt: skip
    if init is not None:
        raise ConfigError(f"init (a warm restart) is for families trained by the air "
                          f"recipe; {name!r} is not")  # fmt: skip
    overrides.pop("time_budget_s", None)
    cfg = TrainConfig(**{**recipe["train"], **overrides, "device": device,
                         "progress": progress})  # fmt: skip
    torch.manual_seed(cfg.seed)  # the initial weights too: same seed, same family
    fam = build_family(name, **recipe["family"])
    teacher = None
    if recipe.get("teacher"):
        tfam = load_pretrained(recipe["teacher"], progress=progress)
        teacher = tfam.member(tfam.num_members)
    if recipe.get("stem_from"):
        from flowcodec.family.vit import copy_stem

        copy_stem(fam, load_pretrained(recipe["stem_from"], progress=progress))
    return fam, train_family(fam, train, test, cfg, dist=dist, checkpoint=checkpoint,
                             resume=resume, teacher=teacher)  # fmt: skip


def _load_init(fam: EarlyExitFamily, path, name: str) -> None:
    """Copy the weights of the saved family at ``path`` into ``fam`` (float16 weights are
    widened); its name and configuration must be ``fam``'s."""
    from flowcodec.family.checkpoint import load_family

    src = load_family(path, expect={"name": name})
    if json.loads(json.dumps(src.config)) != json.loads(json.dumps(fam.config)):  # tuples
        raise ConfigError(f"init {path}: its configuration {src.config} is not the "
                          f"recipe's {fam.config}")  # fmt: skip
    fam.load_state_dict({k: v.float() for k, v in src.state_dict().items()})


def grow_settings(name: str, kind: str) -> dict:
    """The :class:`~flowcodec.family.grow.GrowConfig` fields of family ``name``'s recipe for
    growing a member of kind ``kind``."""
    recipe = RECIPES.get(name, {})
    if "grow_from" in recipe:
        name, kind = recipe["grow_from"]
        recipe = RECIPES[name]
    return {**recipe.get("grow", {}), **recipe.get("grow_kinds", {}).get(kind, {})}


def grow_recipe(name: str, kind: str, device: str = "cpu", progress: bool = True,
                data_root=None, checkpoint=None, resume: bool = False, source=None,
                teacher=None, **overrides):  # fmt: skip
    """Grow the trained family ``name``: keep its members but the last (or all of them, for a
    kind that adds a branching member), and train a new last member of kind ``kind``
    (``cifar10(cloud=kind)``) on their frozen trunk with the recipe's
    ``grow`` settings (``overrides`` change :class:`GrowConfig` fields). ``source``: the
    family to grow (default: the trained ``name``). ``teacher``: a family whose largest
    member teaches the new one (needed when the settings distil, ``distill`` > 0). Returns
    ``(family, GrowResult)``."""
    from flowcodec.family.grow import GrowConfig, grow_member

    recipe = RECIPES.get(name, {})
    base = name
    if "grow_from" in recipe:  # a family of its own name, grown from another
        base, base_kind = recipe["grow_from"]
        if kind not in (None, base_kind):
            raise ConfigError(f"{name} is {base} grown with {base_kind!r}, not {kind!r}")
        kind = base_kind
    elif "grow" not in recipe:
        raise ConfigError(f"no grow recipe for family {name!r}; families that can grow: "
                          f"{sorted(k for k, v in RECIPES.items() if 'grow' in v)}")  # fmt: skip
    train, test = load_dataset(family_dataset(base), root=data_root)
    src = source if source is not None else load_pretrained(base, progress=progress)
    cfg = GrowConfig(**{**grow_settings(base, kind), **overrides, "device": device,
                        "progress": progress})  # fmt: skip
    net = teacher.member(teacher.num_members).eval() if teacher is not None else None
    torch.manual_seed(cfg.seed)
    if "grow_from" in recipe:
        fam = build_family(name, **recipe["family"])
    else:
        kw = {k: v for k, v in src.config.items() if k != "name"}
        fam = build_family(name, **{**kw, "cloud": kind})
    return fam, grow_member(src, fam, train, test, cfg, checkpoint=checkpoint, resume=resume,
                            teacher=net)  # fmt: skip


def load_pretrained(name: str, train_if_missing: bool | None = None, progress: bool = True,
                    device: str = "cpu") -> EarlyExitFamily:  # fmt: skip
    """Load the trained family ``name``; the digits family is trained and cached if absent."""
    path = pretrained_path(name)
    if path.with_suffix(".safetensors").is_file():
        try:
            return load_family(path, expect={"name": name}).to(device)
        except CheckpointError:
            if path.parent == ZOO_DIR:
                raise  # a shipped checkpoint that does not load is a bug, not a cache miss
            # a cached checkpoint from an older architecture: train a fresh one below
    if name not in RECIPES:
        raise ConfigError(
            f"no trained family {name!r}: the trained families are {sorted(RECIPES)} "
            f"(`flowcodec train-family --family` accepts {' or '.join(sorted(RECIPES))}); "
            f"for another dataset, build and train a family in Python (docs/family.md)"
        )
    if train_if_missing is None:
        train_if_missing = name == "digits"
    if not train_if_missing:
        raise CheckpointError(
            f"no trained {name!r} family at {path}.safetensors; make one with "
            f"`flowcodec train-family --family {name}`"
        )
    fam, result = train_recipe(name, device=device, progress=progress)
    save_family(fam, path, result)
    return fam.eval()
