"""The training loop shared by detection and segmentation, and their run directory.

:class:`DenseTrainer` is an iteration loop: AdamW (no weight decay on norms and biases), a
learning-rate factor per iteration (linear warm-up, then the task's step or poly decay), gradient
clipping, autocast on CUDA, DDP under torchrun, and every ``eval_interval`` an evaluation, a row
of ``metrics.csv`` and a checkpoint. Detection counts in epochs (an epoch is one pass over the
training images), segmentation in iterations; both resume from ``last.pth`` at the exact
iteration (each sample's augmentation is seeded by ``(seed, epoch, position)``). The task
subclasses say how to build the data and the model, move a batch to the device, and evaluate.

Run directory::

    OUTPUT/config.yaml         the resolved config
    OUTPUT/metrics.csv         one row per evaluation
    OUTPUT/last.pth            everything needed to resume (``--resume auto``)
    OUTPUT/best.pth            the checkpoint with the best metric (bbox/segm AP, or mIoU)
    OUTPUT/model.safetensors   the best weights, with the config and class names in the metadata

SIGTERM/SIGINT save ``last.pth`` at the end of the current iteration and stop.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.sampling import ResumableSampler, SeededDataset
from ..engine.checkpoint import atomic_copy, atomic_save, load_run_checkpoint, rng_state, set_rng_state
from ..engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, resolve_device
from ..engine.evaluate import autocast_context
from ..engine.lifecycle import Interrupted, run_until_signal, start_run
from ..errors import RMTError
from .config import DenseConfig, save_config

__all__ = ["DenseTrainer", "DenseTrainResult", "DenseData", "read_dense_checkpoint", "run_training",
           "amp_dtype", "progress_bar"]

_logger = logging.getLogger("rmt.dense")


@dataclass
class DenseTrainResult:
    """What a run ended with (rank 0's view). ``best_value`` is -1 when no evaluation ran."""

    output: Path
    metric: str
    best_value: float
    best_iteration: int
    final: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class DenseData:
    """The datasets of a run and how to batch them."""

    name: str
    train: Dataset
    val: Dataset
    class_names: List[str]
    collate_train: Any
    collate_eval: Any


def amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, none on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise RMTError("fp16 autocast needs CUDA; use --amp bf16 or none on the CPU")
    return dtype


def progress_bar(iterable, enabled: bool = True, **kwargs):
    """A tqdm bar when ``enabled`` (pass ``info.is_main``) and stderr is a terminal; else a plain iterator."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True, **kwargs)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})
    os.replace(tmp, path)


def _read_csv(path: Path, upto_iteration: int) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k in ("epoch", "iteration") else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]
    return [r for r in rows if r["iteration"] <= upto_iteration]


def read_dense_checkpoint(path: str | os.PathLike, task: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[str]]:
    """``(state_dict, config dict, class names)`` of a dense run's ``last.pth``/``best.pth`` or its
    ``model.safetensors``; raises :class:`RMTError` when the file is not one of ``task``'s."""
    from ..models.weights import read_checkpoint, read_metadata

    path = Path(path)
    if not path.is_file():
        raise RMTError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        state, config, names, found = read_checkpoint(path), meta.get("config"), meta.get("class_names"), meta.get("task")
    else:
        ckpt = load_run_checkpoint(path)
        state, config, names, found = ckpt["model"], ckpt.get("config"), ckpt.get("class_names"), ckpt.get("task")
    if found != task or config is None or names is None:
        what = f"a {found} checkpoint" if found else "not a detection or segmentation checkpoint of this tool"
        raise RMTError(f"{path}: {what}; expected a {task} run's last.pth, best.pth or model.safetensors")
    return state, config, list(names)


class DenseTrainer:
    """The loop shared by the tasks (see the module docstring). Subclasses set ``task``, ``metric``
    (higher is better), ``columns`` and implement :meth:`build_data`, :meth:`build_model`,
    :meth:`to_device`, :meth:`evaluate_model`, :meth:`total_iters` and :meth:`decay`."""

    task = ""
    metric = ""
    columns: List[str] = []
    find_unused_parameters = False

    def __init__(self, cfg: DenseConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = resolve_device(cfg.device, info)
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        _seed_all(cfg.seed + info.rank)
        self.output = Path(cfg.output) if cfg.output else self._default_output()
        cfg.output = str(self.output)  # the saved config.yaml resumes into the same directory
        self.data = self.build_data()
        self.class_names = list(self.data.class_names)
        model = self.build_model(len(self.class_names))  # logs the backbone weights' load report, if any
        model.to(self.device)
        if info.distributed and cfg.sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = model
        if info.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                           find_unused_parameters=self.find_unused_parameters)
        from timm.optim import create_optimizer_v2

        self.optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.sampler = ResumableSampler(len(self.data.train), rank=info.rank, world_size=info.world_size,
                                        seed=cfg.seed, shuffle=True)
        self.loader = DataLoader(SeededDataset(self.data.train), batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=self._workers(), collate_fn=self.data.collate_train, drop_last=True,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.seed))
        if len(self.loader) == 0:
            raise RMTError(f"the training set ({len(self.data.train)} images over {info.world_size} process(es)) "
                           f"is smaller than one batch of {cfg.batch_size}")
        self.iters_per_epoch = len(self.loader)
        self.max_iters = self.total_iters()
        self.iteration, self.best_value, self.best_iteration = 0, -1.0, -1
        self.partial = torch.zeros(2, dtype=torch.float64)  # loss sum, steps of the current round
        self.history: List[Dict[str, Any]] = []
        self.interrupted = False

    # ------------------------------------------------------------------------------ task hooks
    def build_data(self) -> DenseData:
        raise NotImplementedError

    def build_model(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def to_device(self, batch) -> Tuple[Any, Any]:
        raise NotImplementedError

    def evaluate_model(self) -> Dict[str, float]:
        raise NotImplementedError

    def total_iters(self) -> int:
        raise NotImplementedError

    def eval_iters(self) -> int:
        """Iterations between evaluations."""
        raise NotImplementedError

    def decay(self, iteration: int) -> float:
        """The schedule's learning-rate factor after warm-up."""
        raise NotImplementedError

    def describe_row(self, row: Dict[str, Any]) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ helpers
    def _default_output(self) -> Path:
        data = "shapes" if self.cfg.data is None else Path(self.cfg.data).name
        return Path("runs") / f"{self.task}-{self.cfg.arch}-{self.cfg.backbone}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"

    def _workers(self) -> int:
        return 0 if self.cfg.data is None else self.cfg.workers

    def log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message, file=sys.stderr) if sys.stderr.isatty() else _logger.info(message)

    def lr_factor(self, iteration: int) -> float:
        """Linear warm-up (from ``warmup_ratio``) on top of the task's decay."""
        factor = self.decay(iteration)
        if iteration < self.cfg.warmup_iters:
            factor *= 1 - (1 - iteration / self.cfg.warmup_iters) * (1 - self.cfg.warmup_ratio)
        return factor

    def _set_lr(self) -> float:
        lr = self.cfg.lr * self.lr_factor(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _batches(self) -> Iterator:
        """Batches from the current iteration on, epoch after epoch."""
        epoch, position = divmod(self.iteration, self.iters_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(position * self.cfg.batch_size)
            yield from self.loader
            epoch, position = epoch + 1, 0

    # ------------------------------------------------------------------------------ the loop
    def train_steps(self, batches: Iterator, stop: int) -> Dict[str, float]:
        """Train until iteration ``stop``; returns the round's mean loss and time."""
        self.ddp.train()
        bar = progress_bar(range(self.iteration, stop), self.info.is_main, desc=f"{self.task} train")
        start = time.perf_counter()
        for _ in bar:
            lr = self._set_lr()
            loss_value, parts = self._train_step(next(batches))
            self.partial += torch.tensor([loss_value, 1.0], dtype=torch.float64)
            self.iteration += 1
            if self.info.is_main and sys.stderr.isatty():
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            elif self.info.is_main and self.iteration % self.cfg.log_interval == 0:
                detail = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                _logger.info("iteration %d/%d: loss %.4f (%s), lr %.3g", self.iteration, self.max_iters,
                             loss_value, detail, lr)
            if self.interrupted:
                raise Interrupted()
        bar.close()
        totals = all_reduce_sum(self.partial, self.info)
        return dict(train_loss=(totals[0] / max(totals[1], 1)).item(), seconds=time.perf_counter() - start)

    def _train_step(self, batch) -> Tuple[float, Dict[str, float]]:
        images, targets = self.to_device(batch)
        with autocast_context(self.device, self.amp_dtype):
            losses = self.ddp(images, targets)
        loss = sum(losses.values())
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RMTError(f"the loss is not finite at iteration {self.iteration + 1} "
                           f"({', '.join(f'{k}={float(v):.3g}' for k, v in losses.items())}); the last checkpoint "
                           f"is kept. Lower --lr or set --clip-grad")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
        return loss_value, {k: float(v.detach()) for k, v in losses.items()}

    # ------------------------------------------------------------------------------ state
    def state(self) -> Dict[str, Any]:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None, iteration=self.iteration,
                    epoch=self.iteration // self.iters_per_epoch, partial=self.partial.clone(),
                    best_value=self.best_value, best_iteration=self.best_iteration, task=self.task,
                    config=self.cfg.to_dict(), class_names=self.class_names, rng=rng_state(),
                    world_size=self.info.world_size)

    def save_last(self) -> Path:
        path = self.output / "last.pth"
        if self.info.is_main:
            atomic_save(self.state(), path)
        return path

    def resume(self, path: Path) -> None:
        ckpt = load_run_checkpoint(path)
        if ckpt.get("task") != self.task:
            raise RMTError(f"--resume {path}: not a {self.task} run checkpoint")
        saved = ckpt.get("config", {})
        for key in ("arch", "backbone"):
            if saved.get(key) != getattr(self.cfg, key):
                raise RMTError(f"--resume {path}: checkpoint has {key} {saved.get(key)}, the config "
                               f"{getattr(self.cfg, key)}")
        if ckpt.get("class_names") != self.class_names:
            raise RMTError(f"--resume {path}: the checkpoint's classes differ from the dataset's")
        if ckpt.get("world_size", 1) != self.info.world_size:
            raise RMTError(f"--resume {path}: saved by {ckpt.get('world_size')} process(es); resume it with the "
                           f"same number")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration, self.partial = ckpt["iteration"], ckpt["partial"]
        self.best_value, self.best_iteration = ckpt["best_value"], ckpt["best_iteration"]
        set_rng_state(ckpt["rng"])
        self.history = _read_csv(self.output / "metrics.csv", self.iteration)
        self.log(f"resumed from {path} at iteration {self.iteration}/{self.max_iters}")

    def end_round(self, row: Dict[str, Any], improved: bool) -> None:
        if not self.info.is_main:
            return
        from ..models.weights import save_weights

        last = self.save_last()
        if improved:
            atomic_copy(last, self.output / "best.pth")
            meta = dict(task=self.task, config=self.cfg.to_dict(), class_names=self.class_names,
                        iteration=self.iteration, metric={self.metric: row.get(self.metric)})
            tmp = self.output / ".model.safetensors.tmp"
            save_weights(self.model, tmp, meta)
            os.replace(tmp, self.output / "model.safetensors")
        _write_csv(self.output / "metrics.csv", self.history, self.columns)

    def run(self) -> DenseTrainResult:
        cfg = self.cfg
        start_run(self.output, cfg.resume, self.info, lambda path: save_config(cfg, path), self.resume, self.log)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"{cfg.arch} with {cfg.backbone}: {n_params / 1e6:.2f}M trainable params, {len(self.class_names)} "
                 f"classes; {len(self.data.train)} train / {len(self.data.val)} val images ({self.data.name}); "
                 f"{self.info.world_size} process(es) on {self.device}, {cfg.batch_size} images per process, "
                 f"{self.max_iters} iterations; output {self.output}")
        batches = self._batches()
        every = self.eval_iters()
        while self.iteration < self.max_iters:
            stop = min((self.iteration // every + 1) * every, self.max_iters)
            stats = self.train_steps(batches, stop)
            metrics = self.evaluate_model()
            row = dict(iteration=self.iteration, epoch=self.iteration // self.iters_per_epoch,
                       train_loss=stats["train_loss"], lr=self.optimizer.param_groups[0]["lr"],
                       seconds=stats["seconds"], **metrics)
            improved = row[self.metric] > self.best_value
            if improved:
                self.best_value, self.best_iteration = row[self.metric], self.iteration
            self.history.append(row)
            self.partial = torch.zeros(2, dtype=torch.float64)
            self.log(self.describe_row(row))
            self.end_round(row, improved)
        final = dict(self.history[-1]) if self.history else {}
        return DenseTrainResult(self.output, self.metric, self.best_value, self.best_iteration, final, self.history)


def run_training(trainer_cls, cfg: DenseConfig) -> DenseTrainResult:
    """Set up the process group, run ``trainer_cls(cfg)``, and save-and-stop on SIGTERM/SIGINT."""
    info = init_distributed(cfg.device)
    return run_until_signal(info, lambda: trainer_cls(cfg, info), _stop_for_signal)


def _stop_for_signal(trainer) -> DenseTrainResult:
    """Save a resumable checkpoint where the run stopped and say how to go on."""
    path = trainer.save_last()
    barrier(trainer.info)
    trainer.log(f"interrupted at iteration {trainer.iteration}: saved {path}. Resume with: rmt {trainer.task} "
                f"train --config {trainer.output / 'config.yaml'} --resume auto")
    return DenseTrainResult(trainer.output, trainer.metric, trainer.best_value, trainer.best_iteration, {},
                            trainer.history, stopped_early=True)


def to_jsonable(obj: Any) -> Any:
    """Tensors and numpy values as plain Python (for ``--json`` output)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
