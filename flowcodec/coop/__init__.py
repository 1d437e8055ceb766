"""Cooperative inference: several devices observe one scene, each sends a few bytes of task
features, and the edge fuses whatever arrives (issue 28; docs/cooperative.md).

- :mod:`flowcodec.coop.views`: the seeded multi-view benchmark (partial observation);
- :mod:`flowcodec.coop.fusion`: per-device task encoders and the edge fusion module;
- :mod:`flowcodec.coop.train`: joint training (``python -m flowcodec.coop.train``);
- :mod:`flowcodec.coop.selective`: selective transmission (the edge asks in turn);
- :mod:`flowcodec.coop.bench`: baselines and the benchmark (``python -m flowcodec.coop.bench``).

The fusion names are imported on first use (they pull in the codecs and compressai), so
that importing the view generator stays cheap.
"""

from flowcodec.coop.views import ViewConfig, ViewGenerator

__all__ = ["CoopConfig", "CoopModel", "FusionOutput", "ViewConfig", "ViewGenerator",
           "load_coop", "save_coop"]

_LAZY = ("CoopConfig", "CoopModel", "FusionOutput", "load_coop", "save_coop")


def __getattr__(name: str):
    if name in _LAZY:
        from flowcodec.coop import fusion

        return getattr(fusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
