"""Cooperative inference: several devices observe one scene, each sends a few bytes of task
features, and the edge fuses whatever arrives (issue 28; docs/cooperative.md).

- :mod:`flowcodec.coop.views`: the seeded multi-view benchmark (partial observation);
- :mod:`flowcodec.coop.fusion`: per-device task encoders and the edge fusion module;
- :mod:`flowcodec.coop.cells`: the spatial edge fusion (``CoopConfig(cells=2)``: each device
  sends a 2x2 grid of cells, placed at the edge by the device's anchor);
- :mod:`flowcodec.coop.train`: joint training (``python -m flowcodec.coop.train``);
- :mod:`flowcodec.coop.selective`: selective transmission (the edge asks in turn);
- :mod:`flowcodec.coop.flow`: :class:`CooperativeFlow`, several device hops over their own
  links to one edge, with per-device traces;
- :mod:`flowcodec.coop.finetune`: the largest member fine-tuned on single views (the
  single-view baseline; ``python -m flowcodec.coop.finetune``);
- :mod:`flowcodec.coop.bench`: baselines and the benchmark (``python -m flowcodec.coop.bench``);
- :mod:`flowcodec.coop.picture`: the views picture (``python -m flowcodec.coop.picture``).

The fusion and flow names are imported on first use (they pull in the codecs and
compressai), so that importing the view generator stays cheap.
"""

from flowcodec.coop.views import ViewConfig, ViewGenerator

__all__ = ["CoopConfig", "CoopModel", "CooperativeFlow", "DeviceHop", "FusionOutput", "Selective",
           "ViewConfig", "ViewGenerator", "load_coop", "save_coop"]

_LAZY = {"CoopConfig": "fusion", "CoopModel": "fusion", "FusionOutput": "fusion",
         "load_coop": "fusion", "save_coop": "fusion", "CooperativeFlow": "flow",
         "DeviceHop": "flow", "Selective": "flow"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"flowcodec.coop.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
