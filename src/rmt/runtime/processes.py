"""Processes and devices at inference: the device a process computes on, and how the processes of a
group share an evaluation (each takes a shard; sums and results are combined on every process).

Without a process group (one process) the collectives return their input. NCCL reduces CUDA tensors
only, so every collective here moves its tensor to :func:`comm_device` first and hands back a CPU
result: callers pass whatever they have. Joining and leaving the group under ``torchrun`` is the
training layer's (:mod:`rmt.training.distributed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import RMTError

__all__ = ["DistInfo", "resolve_device", "comm_device", "all_reduce_sum", "all_gather_objects", "ShardSampler"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes, its rank on its node, and
    the process group's backend (``None`` for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; CUDA processes of a group take the GPU of their
    local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RMTError(f"--device {name} was asked for, but PyTorch sees no CUDA device")
        if info.distributed:
            torch.cuda.set_device(info.local_rank)
            return torch.device("cuda", info.local_rank)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RMTError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise RMTError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RMTError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def comm_device(info: DistInfo) -> torch.device:
    """The device collectives take their tensors on: this process's GPU for NCCL, else the CPU."""
    return torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``values`` over all processes, as a new CPU tensor (``values`` may be on any device)."""
    if not info.distributed:
        return values.detach().clone().cpu()
    values = values.detach().to(comm_device(info), copy=True)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (picklable objects)."""
    if not info.distributed:
        return [obj]
    gathered: List[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each sample is evaluated exactly once overall
    (``DistributedSampler`` pads with repeats, which would count some samples twice)."""

    def __init__(self, length: int, info: DistInfo = DistInfo()):
        self.indices = list(range(info.rank, length, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
