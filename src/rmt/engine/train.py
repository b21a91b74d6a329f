"""Classification training: the paper's recipe on timm's components, on one process or many.

``train(cfg)`` is the whole job (``rmt train`` calls it): data, model, optimizer, schedule, EMA,
mixed precision, DDP, the loop, evaluation after every epoch, and the run directory:

    OUTPUT/config.yaml          the resolved config
    OUTPUT/metrics.csv          epoch,train_loss,val_loss,val_top1,val_top5,lr,epoch_seconds
    OUTPUT/last.pth             everything needed to resume (``--resume auto``)
    OUTPUT/best.pth             the checkpoint with the best val_top1
    OUTPUT/model.safetensors    the best weights, with model name, class names and data config
    OUTPUT/curves.png           loss and accuracy per epoch

Checkpoints are written at the end of every epoch, every ``checkpoint_interval`` steps, and when
SIGTERM/SIGINT stops the run. Resuming restarts at the exact step a checkpoint was taken, with every
random state restored and each sample's augmentation seeded by ``(seed, epoch, position)``, so that
a run killed and resumed ends with bit-identical weights to one that was not (same seed, device
and thread count).
"""
from __future__ import annotations

import csv
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import build_datasets, collate_skip_bad
from ..data.sampling import ResumableSampler, SeededDataset
from ..errors import RMTError
from ..models.weights import load_matching_weights
from .checkpoint import atomic_copy, atomic_save, atomic_write, load_run_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, resolve_device
from .evaluate import autocast_context, eval_loader, evaluate, report_bad_files
from .lifecycle import Interrupted, run_until_signal, start_run

__all__ = ["train", "TrainResult", "METRIC_COLUMNS", "plot_curves"]

_logger = logging.getLogger("rmt.train")

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds"]


@dataclass
class TrainResult:
    output: Path
    best_top1: float
    best_epoch: int
    final: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


class NonFiniteLossError(RMTError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------- helpers
def _amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _default_output(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.model}-{'digits' if cfg.data is None else Path(cfg.data).name}-" \
                          f"{time.strftime('%Y%m%d-%H%M%S')}"


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["val_top1"] for r in rows], "o-", label="top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in rows], "o-", label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _read_metrics(path: Path, upto_epoch: int) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in METRIC_COLUMNS})


# ----------------------------------------------------------------------------------- the job
class _Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        from ..models.factory import create_model

        self.cfg, self.info = cfg, info
        self.device = resolve_device(cfg.device, info)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        if self.amp_dtype is not None and self.device.type == "cpu" and cfg.amp == "fp16":
            raise RMTError("fp16 autocast needs CUDA; use --amp bf16 or none on the CPU")
        _seed_all(cfg.seed + info.rank)
        self.output = Path(cfg.output) if cfg.output else _default_output(cfg)
        cfg.output = str(self.output)  # the saved config.yaml then resumes into the same directory
        self.token_label = bool(cfg.token_label_data)

        self.data = build_datasets(cfg)
        self.classes = self.data.classes
        model_kwargs = dict(num_classes=len(self.classes), token_label=self.token_label)
        if cfg.drop_path is not None:
            model_kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **model_kwargs)
        self.finetune_report = None
        if cfg.finetune:
            self.finetune_report = load_matching_weights(model, cfg.finetune)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if cfg.sync_bn and info.distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif info.is_main:
                _logger.warning("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); each process keeps its "
                                "own batch statistics")
        self.model = model
        self.norm_stats = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        self.ema = None
        if cfg.model_ema:
            # the reference scales the decay to the global batch (0.99996 is its value at 512)
            decay = cfg.model_ema_decay ** (self.global_batch / 512.0)
            self.ema = ModelEmaV3(model, decay=decay)
        self.ddp = model
        if info.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

        self.lr = cfg.lr if cfg.lr is not None else cfg.lr_base * self.global_batch / cfg.lr_base_size
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum, eps=cfg.opt_eps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

        self.train_loader, self.sampler = self._train_loader()
        eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
        self.val_loader = eval_loader(self.data.val, eval_batch, cfg.workers if self.data.name != "digits" else 0,
                                      info, pin_memory=self.device.type == "cuda")
        self.updates_per_epoch = max(1, math.ceil(len(self.train_loader) / cfg.accum_steps))
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)

        self.mixup = None
        mixup_on = not self.token_label and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0
        if mixup_on:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=len(self.classes))
        if self.token_label:
            from .losses import TokenLabelLoss

            self.criterion = TokenLabelLoss(cfg.token_label_dense_weight, cfg.token_label_cls_weight, cfg.smoothing)
        elif mixup_on:
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        # where the run is: next epoch and step to run, loss sums of the epoch so far
        self.epoch, self.step, self.partial = 0, 0, torch.zeros(2, dtype=torch.float64)
        self.num_updates, self.bad_steps, self.best_top1, self.best_epoch = 0, 0, -1.0, -1
        self.history: List[Dict[str, Any]] = []
        self.interrupted = False

    def _train_loader(self):
        cfg, info = self.cfg, self.info
        dataset = SeededDataset(self.data.train)
        sampler = ResumableSampler(len(dataset), rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                   shuffle=True, repeats=3 if cfg.repeated_aug else 1)
        workers = 0 if self.data.name == "digits" else cfg.workers
        # a private generator: creating the epoch's iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would be one draw ahead (samples are seeded by the sampler anyway)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=collate_skip_bad, drop_last=len(sampler) >= cfg.batch_size,
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed))
        if len(loader) == 0:
            raise RMTError(f"the training set ({len(dataset)} images) is smaller than one batch")
        return loader, sampler

    # -------------------------------------------------------------------------- state
    def state(self) -> Dict[str, Any]:
        """Everything needed to continue exactly from here (an optimizer-step boundary)."""
        return dict(
            model=self.model.state_dict(), model_ema=self.ema.module.state_dict() if self.ema else None,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None, epoch=self.epoch, step=self.step,
            partial=self.partial.clone(), num_updates=self.num_updates, bad_steps=self.bad_steps,
            best_top1=self.best_top1, best_epoch=self.best_epoch, model_name=self.cfg.model,
            class_names=list(self.classes), data_config=self.data.data_config, token_label=self.token_label,
            config=self.cfg.to_dict(), rng=rng_state(), world_size=self.info.world_size,
        )

    def resume(self, path: Path) -> None:
        ckpt = load_run_checkpoint(path)
        if ckpt.get("model_name") != self.cfg.model:
            raise RMTError(f"--resume {path}: checkpoint is for {ckpt.get('model_name')}, not {self.cfg.model}")
        if ckpt.get("class_names") != list(self.classes):
            raise RMTError(f"--resume {path}: the checkpoint's classes differ from the dataset's")
        if ckpt.get("world_size", 1) != self.info.world_size and ckpt["step"] > 0:
            raise RMTError(f"--resume {path}: saved mid-epoch by {ckpt.get('world_size')} process(es); "
                           f"resume it with the same number of processes")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("model_ema") is not None:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.partial = ckpt["epoch"], ckpt["step"], ckpt["partial"]
        self.num_updates, self.bad_steps = ckpt["num_updates"], ckpt["bad_steps"]
        self.best_top1, self.best_epoch = ckpt["best_top1"], ckpt["best_epoch"]
        if ckpt.get("world_size", 1) == self.info.world_size:
            set_rng_state(ckpt["rng"])
        else:  # another process count: the run goes on, but not bit for bit
            _seed_all(self.cfg.seed + self.info.rank + 1000 * self.epoch)
        self.history = _read_metrics(self.output / "metrics.csv", self.epoch)
        where = f"epoch {self.epoch + 1}" + (f", step {self.step}" if self.step else "")
        self.log(f"resumed from {path} at {where} (best top-1 so far {max(self.best_top1, 0):.2f}%)")

    def log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message, file=sys.stderr) if sys.stderr.isatty() else _logger.info(message)

    # -------------------------------------------------------------------------- loop
    def train_one_epoch(self) -> Dict[str, float]:
        """Train from ``self.step`` to the end of epoch ``self.epoch``."""
        cfg, epoch = self.cfg, self.epoch
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(self.step * cfg.batch_size)
        steps = len(self.train_loader) + self.step
        bad: List = []
        show = self.info.is_main and sys.stderr.isatty()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show,
                   dynamic_ncols=True, initial=self.step, total=steps)
        start, images_seen = time.perf_counter(), 0
        accum = cfg.accum_steps
        for batch, skipped in bar:
            bad.extend(skipped)
            if batch is not None:
                last_micro = (self.step + 1) % accum == 0 or self.step + 1 == steps
                loss_value, n = self._train_step(batch, last_micro=last_micro)
                if loss_value is not None:
                    self.partial += torch.tensor([loss_value * n, n], dtype=torch.float64)
                    images_seen += n
                    if show:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                        refresh=False)
                    elif self.info.is_main and (self.step + 1) % cfg.log_interval == 0:
                        _logger.info("epoch %d step %d/%d loss %.4f lr %.3g", epoch + 1, self.step + 1, steps,
                                     loss_value, self.optimizer.param_groups[0]["lr"])
            self.step += 1
            at_boundary = self.step % accum == 0
            if at_boundary and self.interrupted:
                raise Interrupted()
            if at_boundary and cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 \
                    and self.step < steps:
                self.save_last()
        seconds = time.perf_counter() - start
        bar.close()
        report_bad_files(bad, f"epoch {epoch + 1}")
        totals = all_reduce_sum(self.partial, self.info)
        return dict(train_loss=(totals[0] / max(totals[1], 1)).item(), epoch_seconds=seconds,
                    images_per_second=images_seen * self.info.world_size / max(seconds, 1e-9))

    def _train_step(self, batch, last_micro: bool):
        """Forward and backward of one batch (and the optimizer step when ``last_micro``)."""
        images, targets = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        dense = batch[2].to(self.device, non_blocking=True) if self.token_label else None
        if self.mixup is not None:
            if len(images) % 2:  # mixup pairs the batch with its reverse: drop one odd image
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = nullcontext() if last_micro or not self.info.distributed else self.ddp.no_sync()
        # a skipped step must not leave its batch statistics behind (a NaN image poisons them)
        stats = [b.clone() for b in self.norm_stats] if self.cfg.max_bad_steps > 0 else None
        with sync:
            with autocast_context(self.device, self.amp_dtype):
                outputs = self.ddp(images)
                loss = self.criterion(outputs, dense) if self.token_label else self.criterion(outputs, targets)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                self._non_finite()
                self.optimizer.zero_grad(set_to_none=True)
                if stats is not None:
                    for buf, saved in zip(self.norm_stats, stats):
                        buf.copy_(saved)
                return None, 0
            scaled = loss / self.cfg.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if last_micro:
            self._optimizer_step()
        return loss_value, len(images)

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if self.scaler is not None:
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)

    def _non_finite(self) -> None:
        self.bad_steps += 1
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        if self.bad_steps > self.cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"the loss is not finite at {where}; stopped, the last good checkpoint is kept. "
                f"Lower --lr, set --clip-grad, or allow a few bad steps with --max-bad-steps N")
        self.log(f"warning: non-finite loss at {where}, step skipped ({self.bad_steps}/{self.cfg.max_bad_steps})")

    # -------------------------------------------------------------------------- saving
    def save_last(self) -> Path:
        """Write ``last.pth`` (every process takes part in nothing; rank 0 writes)."""
        path = self.output / "last.pth"
        if self.info.is_main:
            atomic_save(self.state(), path)
        return path

    def end_epoch(self, row: Dict[str, Any], improved: bool) -> None:
        if not self.info.is_main:
            return
        from ..models.weights import save_weights

        last = self.save_last()
        if improved:
            atomic_copy(last, self.output / "best.pth")
            meta = dict(model=self.cfg.model, class_names=list(self.classes), num_classes=len(self.classes),
                        token_label=self.token_label, data_config=self.data.data_config, epoch=row["epoch"],
                        val_top1=row["val_top1"])
            atomic_write(self.output / "model.safetensors", lambda tmp: save_weights(self.model, tmp, meta))
        if self.cfg.keep_checkpoints > 0:
            atomic_copy(last, self.output / f"epoch_{row['epoch']:04d}.pth")
            for old in sorted(self.output.glob("epoch_*.pth"))[: -self.cfg.keep_checkpoints]:
                old.unlink(missing_ok=True)
        atomic_write(self.output / "metrics.csv", lambda tmp: _write_metrics(tmp, self.history))
        try:
            atomic_write(self.output / "curves.png", lambda tmp: plot_curves(self.history, tmp))
        except Exception as e:  # a plot must never stop a run
            _logger.warning("could not draw curves.png: %s", e)

    def run(self) -> TrainResult:
        cfg = self.cfg
        start_run(self.output, cfg.resume, self.info, lambda path: save_config(cfg, path), self.resume, self.log)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"{cfg.model}: {n_params / 1e6:.2f}M params, {len(self.classes)} classes; "
                 f"{len(self.data.train)} train / {len(self.data.val)} val images ({self.data.name}); "
                 f"{self.info.world_size} process(es) on {self.device}, global batch {self.global_batch}, "
                 f"lr {self.lr:.3g}; output {self.output}")
        if self.finetune_report:
            r = self.finetune_report
            self.log(f"finetune: loaded {len(r['loaded'])} tensors from {cfg.finetune}; re-initialised "
                     f"{len(r['reinitialised'])}: {', '.join(r['reinitialised'][:6])}"
                     f"{' ...' if len(r['reinitialised']) > 6 else ''}")
        final: Dict[str, Any] = dict(self.history[-1]) if self.history else {}
        while self.epoch < cfg.epochs:
            stats = self.train_one_epoch()
            val = evaluate(self.model, self.val_loader, self.device, self.info, self.amp_dtype, desc="eval",
                           channels_last=cfg.channels_last)
            row = dict(epoch=self.epoch + 1, train_loss=stats["train_loss"], val_loss=val["loss"],
                       val_top1=val["top1"], val_top5=val["top5"], lr=self.optimizer.param_groups[0]["lr"],
                       epoch_seconds=stats["epoch_seconds"])
            message = (f"epoch {self.epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
                       f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%, "
                       f"{stats['epoch_seconds']:.1f}s ({stats['images_per_second']:.0f} img/s)")
            if self.ema is not None:
                ema_val = evaluate(self.ema.module, self.val_loader, self.device, self.info, self.amp_dtype,
                                   desc="eval ema", channels_last=cfg.channels_last)
                message += f", EMA top-1 {ema_val['top1']:.2f}%"
            improved = row["val_top1"] > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = row["val_top1"], row["epoch"]
            self.history.append(row)
            self.epoch, self.step = self.epoch + 1, 0
            self.partial = torch.zeros(2, dtype=torch.float64)
            self.log(message)
            self.end_epoch(row, improved)
            final = dict(row, images_per_second=stats["images_per_second"])
        return TrainResult(self.output, self.best_top1, self.best_epoch, final, self.history)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a classifier as ``cfg`` says; returns the run's summary (rank 0's view).

    SIGTERM/SIGINT save a resumable checkpoint at the end of the current step and return with
    ``stopped_early=True``.
    """
    info = init_distributed(cfg.device)
    return run_until_signal(info, lambda: _Trainer(cfg, info), _stop_for_signal)

def _stop_for_signal(trainer: _Trainer) -> TrainResult:
    """Save a resumable checkpoint where the run stopped and say how to go on."""
    path = trainer.save_last()
    barrier(trainer.info)
    trainer.log(f"interrupted at epoch {trainer.epoch + 1}, step {trainer.step}: saved {path}. Resume with: "
                f"rmt train --config {trainer.output / 'config.yaml'} --resume auto")
    return TrainResult(trainer.output, trainer.best_top1, trainer.best_epoch, {}, trainer.history, stopped_early=True)
