"""Running flowcodec's commands on the engines users already have (docs/scale.md).

- :mod:`flowcodec.scale.ray_engine`: independent units of a sweep (an ``rd`` codec entry or
  sweep point, a ``latency`` grid cell) as Ray tasks, on a local Ray instance or a cluster
  (``--engine ray``, ``--address``). Ray is the optional extra ``flowcodec[ray]``.
- :mod:`flowcodec.scale.ddp`: family and codec training under ``torchrun`` with
  DistributedDataParallel (gloo on CPU, NCCL on GPU).

Nothing here is imported by the serial path; Ray is imported only when a Ray engine runs.
"""

from __future__ import annotations

from flowcodec.scale.ray_engine import (
    ENGINES,
    RayEngine,
    SweepFailed,
    UnitFailure,
    add_engine_arguments,
    ray_available,
)

__all__ = ["ENGINES", "RayEngine", "SweepFailed", "UnitFailure", "add_engine_arguments",
           "ray_available"]  # fmt: skip
