"""The process group under ``torchrun`` (one node or many): joining it, the synchronisation training
needs, and leaving it.

Under ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it
everything runs as one process and these functions do nothing. The backend is NCCL when the
processes compute on CUDA, gloo on the CPU. Each process's device and the collectives that
evaluation shares with inference are in :mod:`rmt.runtime.processes`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.processes import DistInfo

__all__ = ["init_distributed", "broadcast_object", "barrier", "cleanup"]


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (NCCL, bound to the local GPU, for CUDA;
    gloo for the CPU); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if _wants_cuda(device) else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, dist.get_backend())


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not info.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
