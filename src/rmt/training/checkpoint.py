"""The run checkpoint: one schema for every task, one reader.

``last.pth`` (and ``best.pth``, and the retained ``epoch_*.pth`` / ``iter_*.pth``) are ``torch.save``
dicts of plain types and tensors, readable with ``weights_only=True``::

    format      "rmt-run"
    version     1
    meta        what the weights are (the same dict as model.safetensors's metadata, see
                rmt.models.weights): task, model, class_names, num_classes, config, metrics, ...
    model       the model's state dict
    model_ema   the EMA weights' state dict, or None
    optimizer   the optimizer's state dict
    scheduler   the learning-rate schedule's state dict, or None
    scaler      the fp16 gradient scaler's state dict, or None
    progress    Progress as a dict: where the run is (epoch, step, iteration, best, ...)
    history     the rows of metrics.csv up to this point: metrics.csv is rewritten from them, so the
                checkpoint and the metrics are always one state
    ranks       one entry per process: its random-number state and its share of the loss sums of
                the current round
    world_size  how many processes wrote it
    precision   what the run computed in (``float32``, ``bf16 autocast``, ...)

:func:`read_run_checkpoint` is the only reader; it checks the format and the task.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import RMTError
from ..models.weights import META_KEY, read_checkpoint

__all__ = ["RUN_FORMAT", "RUN_VERSION", "Progress", "RunCheckpoint", "read_run_checkpoint", "is_run_checkpoint"]

RUN_FORMAT = "rmt-run"
RUN_VERSION = 1


@dataclass
class Progress:
    """Where a run is. ``epoch``: epochs whose data are done; ``step``: batches of the current epoch
    done by each process; ``iteration``: optimizer updates so far; ``best_value``/``best_at``: the best
    evaluation so far (its metric value, and the epoch or iteration it was taken at)."""

    epoch: int = 0
    step: int = 0
    iteration: int = 0
    bad_steps: int = 0
    best_value: Optional[float] = None
    best_at: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunCheckpoint:
    """A run checkpoint in memory (see the module doc for what each field holds)."""

    meta: Dict[str, Any]
    model: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    progress: Progress
    history: List[Dict[str, Any]]
    ranks: List[Dict[str, Any]]
    world_size: int = 1
    precision: Optional[str] = None
    model_ema: Optional[Dict[str, torch.Tensor]] = None
    scheduler: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def config(self) -> Dict[str, Any]:
        return self.meta["config"]

    def to_dict(self) -> Dict[str, Any]:
        """What ``torch.save`` writes."""
        return {"format": RUN_FORMAT, "version": RUN_VERSION, META_KEY: self.meta, **dict( model=self.model,
                    model_ema=self.model_ema, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                    progress=self.progress.to_dict(), history=self.history, ranks=self.ranks,
                    world_size=self.world_size, precision=self.precision)}


def is_run_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is one of our run checkpoints."""
    return isinstance(obj, dict) and obj.get("format") == RUN_FORMAT


def read_run_checkpoint(path: str | os.PathLike, task: Optional[str] = None) -> RunCheckpoint:
    """Read a run checkpoint (``weights_only``), checking its format, version and, if given, ``task``."""
    path = Path(path)
    raw = read_checkpoint(path)
    if not is_run_checkpoint(raw):
        raise RMTError(f"{path} is not a training checkpoint of this tool (a run's last.pth or best.pth)")
    if raw.get("version") != RUN_VERSION:
        raise RMTError(f"{path}: run checkpoint version {raw.get('version')} is not supported (this rmt reads "
                       f"version {RUN_VERSION})")
    ckpt = RunCheckpoint(meta=raw[META_KEY], model=raw["model"], optimizer=raw["optimizer"],
                         progress=Progress.from_dict(raw["progress"]), history=list(raw["history"]),
                         ranks=list(raw["ranks"]), world_size=int(raw["world_size"]), precision=raw.get("precision"),
                         model_ema=raw.get("model_ema"),
                         scheduler=raw.get("scheduler"), scaler=raw.get("scaler"))
    if task is not None and ckpt.task != task:
        raise RMTError(f"{path} is a {ckpt.task} checkpoint, not a {task} one")
    return ckpt
