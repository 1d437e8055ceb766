"""Training under ``torchrun`` with DistributedDataParallel, and training state on disk.

``torchrun --nproc-per-node N`` starts N copies of a command and tells each its rank in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`from_env` joins the process group those name (gloo on CPU, NCCL on GPU: one GPU per
local rank) and returns a :class:`Dist`; outside torchrun it returns the single-process
``Dist`` that changes nothing.

Sharding (the distributed sampler of flowcodec's array datasets): every rank draws the same
*global* batches from the same seeded generator, shuffle and augmentation included, and keeps
its share of each (rank ``r`` of ``N`` keeps the samples ``r, r + N, ...``). DDP averages the
gradients over ranks, so a step sees the whole global batch as the plain run does; with N = 1
the run *is* the plain run, and the seed fixes the result for a given N. (Batch-norm
statistics are per rank, as with any DDP run without SyncBatchNorm: N = 2 trains to the same
accuracy band, not to the same bits.)

Training state (:func:`save_state`, :func:`load_state`) is written by rank 0 after every
epoch as safetensors (weights, optimizer tensors, generator states) plus JSON (epoch,
history, scalar optimizer and scheduler state): never pickle. A run restarted with
``resume`` (``flowcodec train-family --resume``; torchrun's ``--max-restarts`` restarts the
ranks after one dies) continues after the last completed epoch, and ends where the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flowcodec.errors import CheckpointError

__all__ = ["Dist", "from_env", "under_torchrun", "save_state", "load_state", "state_paths",
           "PeerLost"]  # fmt: skip


class PeerLost(RuntimeError):
    """Another rank of a torchrun job stopped (killed, crashed): this rank stops too."""


def under_torchrun() -> bool:
    """True in a process started by torchrun (it sets ``TORCHELASTIC_RUN_ID`` and
    ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Dist:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (a plain run)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and draws progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def device(self, requested: str) -> str:
        """The device of this rank: ``cuda:LOCAL_RANK`` when a CUDA device was asked for
        under torchrun, else ``requested``."""
        if self.active and requested.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """This rank's share of a global batch (samples ``rank, rank + world, ...``);
        ``None`` stays ``None``."""
        if self.world == 1:
            return tensors
        return tuple(None if t is None else t[self.rank :: self.world] for t in tensors)

    def wrap(self, module: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (itself in a plain run). The initial
        weights are broadcast from rank 0. ``find_unused``: some parameters may get no
        gradient in a step (e.g. entropy-model parameters trained by an auxiliary loss)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (the values themselves in a plain run)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        dev = "cuda" if self.backend == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        try:
            dist.all_reduce(t)
        except Exception as e:  # gloo: "Connection closed by peer", NCCL: watchdog errors
            raise PeerLost(lost_message(self, e)) from e
        return t.cpu().tolist()

    def all_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (the values themselves in a plain run)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64,
                         device="cuda" if self.backend == "nccl" else "cpu")  # fmt: skip
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        except Exception as e:
            raise PeerLost(lost_message(self, e)) from e
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            try:
                dist.barrier()
            except Exception as e:
                raise PeerLost(lost_message(self, e)) from e

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = None


def lost_message(d: Dist, e: BaseException) -> str:
    return (f"rank {d.rank} of {d.world}: another rank of this torchrun job stopped "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the job "
            f"stops. Run the same command again with --resume to continue from the last "
            f"checkpoint (or give torchrun --max-restarts to do it automatically)")  # fmt: skip


def from_env(device: str = "cpu") -> Dist:
    """Join the torchrun job this process belongs to (gloo for a CPU ``device``, NCCL for
    CUDA); a plain :class:`Dist` outside torchrun. Call :meth:`Dist.close` at the end."""
    if not under_torchrun():
        return Dist()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local, backend)


# --- training state ------------------------------------------------------------------------
def state_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights and tensors .safetensors, scalars .json)`` of a training state."""
    p = Path(path)
    return p.parent / f"{p.name}.state.safetensors", p.parent / f"{p.name}.state.json"


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def save_state(path, module: torch.nn.Module, optimizer, scheduler, generator: torch.Generator,
               epoch: int, history: list[dict], extra: dict | None = None) -> Path:  # fmt: skip
    """Write the state to resume training after ``epoch`` (epochs done) atomically: the
    tensors to ``PATH.state.safetensors``, the rest to ``PATH.state.json``."""
    from safetensors.torch import save_file

    from flowcodec.family.checkpoint import weights_sha256

    tens, meta = state_paths(path)
    tens.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in module.state_dict().items()}  # fmt: skip
    opt = optimizer.state_dict()
    opt_scalars = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars[f"{pid}.{k}"] = v
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if _jsonable(v)} if scheduler else {}
    tmp = tens.with_name(tens.name + ".tmp")
    save_file(tensors, str(tmp))
    record = {"epoch": epoch, "history": history, "optim_groups": opt["param_groups"],
              "optim_scalars": opt_scalars, "scheduler": sched, "extra": extra or {},
              "sha256": weights_sha256(tmp)}  # fmt: skip
    mtmp = meta.with_name(meta.name + ".tmp")
    mtmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, tens)
    os.replace(mtmp, meta)
    return tens


def load_state(path, module: torch.nn.Module, optimizer, scheduler,
               generator: torch.Generator) -> dict | None:  # fmt: skip
    """Restore what :func:`save_state` wrote into the given objects; returns the JSON record
    (``epoch``, ``history``, ``extra``), or ``None`` when there is no saved state. A state
    whose weights do not match their recorded SHA-256 or the module is refused."""
    from safetensors.torch import load_file

    from flowcodec.family.checkpoint import weights_sha256

    tens, meta = state_paths(path)
    if not (tens.is_file() and meta.is_file()):
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta}: not a training state ({e})") from e
    if record.get("sha256") != weights_sha256(tens):
        raise CheckpointError(f"{tens}: its SHA-256 does not match {meta.name}: the state is "
                              "damaged or from another run")  # fmt: skip
    saved = load_file(str(tens))
    model = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    try:
        module.load_state_dict(model)
    except RuntimeError as e:
        raise CheckpointError(f"{tens}: made for another model: {e}") from e
    state: dict = {}
    for k, v in saved.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in record.get("optim_scalars", {}).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": record["optim_groups"]})
    if scheduler is not None and record.get("scheduler"):
        scheduler.load_state_dict({**scheduler.state_dict(), **record["scheduler"]})
    generator.set_state(saved["rng.generator"])
    torch.set_rng_state(saved["rng.torch"])
    return record
