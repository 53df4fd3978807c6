"""torch.distributed helpers: process-group setup from torchrun's environment, sharding and reductions.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) the process group is initialised with NCCL
on GPUs and gloo on CPUs; otherwise everything here degrades to the single-process case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from protokern.utils import checked_device, distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when a GPU is visible, else ``cpu``; other names as given."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    return checked_device(name)


def _env_int(name: str, default: str | None = None) -> int:
    value = os.environ.get(name, default)
    if value is None:
        raise ValueError(f"environment: WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set "
                         "(launch with torchrun, or set RANK, MASTER_ADDR and MASTER_PORT for each process)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment: {name} must be an integer, got {value!r}") from None


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun (or with the env:// variables set: WORLD_SIZE,
    RANK, MASTER_ADDR, MASTER_PORT); a one-line ``ValueError`` for a missing or non-integer WORLD_SIZE, RANK or
    LOCAL_RANK."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise ValueError(f"environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def cleanup() -> None:
    """Destroy the process group if this module's caller created one."""
    if distributed():
        dist.destroy_process_group()


def shard(dataset: Dataset, info: DistInfo) -> Dataset:
    """This rank's strided share of ``dataset`` (no padding: every sample is counted exactly once)."""
    if not info.enabled:
        return dataset
    return Subset(dataset, range(info.rank, len(dataset), info.world_size))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (in place; a no-op without a process group)."""
    if distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def from_main(value):
    """Rank 0's ``value`` on every rank (``value`` itself without a process group): one picklable object."""
    if distributed():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def barrier() -> None:
    """Wait until every rank of the process group reaches this point (a no-op without a process group)."""
    if distributed():
        dist.barrier()


class PeerStopped(RuntimeError):
    """Another process of the torchrun job stopped (a signal or an error there), so a collective this one waited
    in failed: a one-line stop (exit 1) instead of the backend's traceback."""


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process left: its connection closed (gloo),
    or the backend says a remote process exited (NCCL). Not a timeout (the others may still be running) nor
    another backend error."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                            "remote process exited"))
