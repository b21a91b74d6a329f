"""A training run: what every task's loop calls, so that each loop reads top to bottom.

A task's ``train(cfg)`` looks like this (classification, detection and segmentation all do)::

    data = ...                                           # datasets, checked: before the run directory exists
    with TrainingRun(cfg, task="...", spec=RoundSpec(...), default_output=...) as run:
        model = ...                                      # may fail: nothing is written yet
        model, ddp = run.prepare_model(model)            # device, SyncBN, DDP
        optimizer, scheduler = ...
        step = run.begin(model, optimizer, scheduler, meta=...)  # resume or start; config.yaml
        loader = run.train_loader(data.train, ...)
        for epoch in run.epochs(cfg.epochs):
            for batch in run.batches(loader):
                with step.accumulate(ddp):
                    with run.autocast():
                        loss = ...
                    if not step.backward(loss):          # a non-finite loss, skipped
                        continue
                run.record_loss(loss, count=...)
                if step.due:                             # the optimizer step, in the loop
                    step.clip_gradients()
                    step.optimizer_step()
                    step.update_ema()
                    step.schedule()
                    run.log_update(loss)
            run.end_round(evaluate(...), describe)     # metrics row, best/last checkpoints, curves
        return run.finish()

What it does for the loop:

* **processes and precision**: the process group under torchrun, the device, the autocast dtype
  (rmt.runtime.precision), per-process seeds;
* **the run directory** (rmt.training.rundir): claimed and locked before anything is built, written
  only once the start has passed its checks;
* **resume**: ``--resume auto|PATH`` restores weights, EMA, optimizer, schedule, scaler, progress,
  history, and each process's random state and loss sums, so that a resumed run ends bit for bit
  where an uninterrupted one would (same seed, device, thread and process count). A resume is the
  same run: every setting that changes the result must be the saved one (the config's
  :meth:`rmt.training.config.RunConfig.resume_changes`, the classes, the process count, the
  precision), or the resume is refused with one line naming them; the settings that may change are
  logged and recorded in ``resumes.log``. The learning-rate schedule follows the config (a longer
  run stretches it, as timm's train.py does) from the restored update count;
* **the optimizer step's pieces** (rmt.training.step.OptimizerStep, built by ``begin`` with the EMA
  and the fp16 gradient scaler): the loop calls them in order; the run says which batch completes
  an update;
* **signals**: SIGTERM/SIGINT stop the run at the next optimizer-step boundary; ``last.pth`` is
  written and :class:`rmt.errors.RunInterrupted` raised (exit status 128 + signal). A signal that
  arrives after the last round (while the task writes its final files) lets those writes finish,
  then raises it too: a run that received a signal never ends with status 0. A new run that replaces
  another (``--overwrite``) and has no checkpoint yet stops at once instead, and the run it
  replaces is put back (rmt.training.rundir);
* **checkpoints**: ``last.pth`` at every evaluation (and every ``checkpoint_interval`` updates),
  ``best.pth`` + ``model.safetensors`` when the evaluation improved, retention of the last N;
* **logging** (rmt.training.tracking): TensorBoard / W&B / MLflow (``--log-to``) through ``run.trackers``,
  continued without a repeated step on resume.

Policies (the same for every task):

* **non-finite loss**: rmt.training.step's policy; the run checks it at log intervals and before
  every save. Weights that are not finite at an evaluation stop the run the same way.
* **BatchNorm with one value per channel** (a per-process batch of 1 on a small feature map) is
  refused as bad input (exit status 2) naming the input, instead of PyTorch's ValueError.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.sampling import ResumableSampler, SeededDataset
from ..errors import NonFiniteLossError, RMTError, RunInterrupted
from ..files import atomic_save, atomic_write_text
from ..models.weights import save_weights
from ..runtime.precision import amp_dtype, autocast, configure_float32, describe_precision
from ..runtime.processes import DistInfo, all_gather_objects, all_reduce_sum, resolve_device
from ..runtime.progress import progress_bar
from .checkpoint import Progress, RunCheckpoint, read_run_checkpoint
from .config import RunConfig, config_to_yaml, describe_changes, save_config
from .distributed import barrier, broadcast_object, cleanup, init_distributed
from .rng import rng_state, seed_everything, set_rng_state
from .rundir import RunDirectory, plot_curves
from .step import OptimizerStep
from .tracking import RunTrackers, resolve_trackers

__all__ = ["TrainingRun", "RoundSpec", "RunResult", "default_output"]

_logger = logging.getLogger("rmt.train")


def _classes(names: Optional[Sequence[str]]) -> str:
    if names is None:
        return "none"
    shown = ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} ({shown})"


def constant_buffers(model: nn.Module) -> List[str]:
    """The names of the buffers that ``model``'s modules declare constant (``constant_buffers``)."""
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "constant_buffers", ())]


def default_output(*parts: str, data: Optional[str], demo: str) -> str:
    """``runs/<parts>-<data>-<time>``: where a run goes without ``--output`` (``data`` is the dataset
    root, or ``None`` for the task's bundled ``demo`` data)."""
    name = demo if data is None else Path(data).name
    return str(Path("runs") / "-".join([*parts, name, time.strftime("%Y%m%d-%H%M%S")]))


@dataclass(frozen=True)
class RoundSpec:
    """What a task's evaluations ("rounds") look like.

    ``metric``: the row entry that picks ``best.pth`` (higher is better). ``columns``: the columns of
    ``metrics.csv``. ``unit``: ``"epoch"`` or ``"iteration"``, what the retained checkpoints are
    numbered by and the curves' x axis. ``plotted``: the metrics drawn in ``curves.png`` next to the
    losses ``losses``."""

    metric: str
    columns: Sequence[str]
    plotted: Sequence[str]
    unit: str = "epoch"
    losses: Sequence[str] = ("train_loss",)
    time_column: str = "seconds"


@dataclass
class RunResult:
    """How a run ended (the main process's view). ``best_value`` is ``None`` when no evaluation ran."""

    output: Path
    metric: str
    best_value: Optional[float]
    best_at: Optional[int]
    final: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)


class TrainingRun:
    """One training run of any task (see the module doc). Use it as a context manager."""

    def __init__(self, cfg: RunConfig, *, task: str, spec: RoundSpec, default_output: str, command: str):
        self.cfg, self.task, self.spec = cfg, task, spec
        self.command = command  # how the user starts this task's training, for the messages
        self.info: DistInfo = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.info)
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        configure_float32(self.device, self.amp_dtype)
        seed_everything(cfg.seed + self.info.rank)
        self.output = Path(cfg.output or default_output)
        cfg.output = str(self.output)  # the saved config.yaml then resumes into the same directory
        self.directory = RunDirectory(self.output)
        self._tracker_names = resolve_trackers(cfg.log_to, announce=self.info.is_main)  # before anything is written
        self.trackers = RunTrackers()  # opened by begin(), on the main process
        self.progress = Progress()
        self.history: List[Dict[str, Any]] = []
        self.model: Optional[nn.Module] = None
        self.ema: Optional[ModelEmaV3] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Any = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.step: Optional[OptimizerStep] = None  # built by begin()
        self.meta: Dict[str, Any] = {}
        self._stop_signal: Optional[int] = None
        self._previous_handlers: Dict[int, Any] = {}
        self._started = False
        self._changed: List[Tuple[str, Any, Any]] = []  # settings a resume changed (module doc)
        self._new_round()

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TrainingRun":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        self._claim_directory()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        interrupted = self._stop_signal is not None or (
            kind is not None and issubclass(kind, (RunInterrupted, KeyboardInterrupt)))
        self.trackers.close("KILLED" if interrupted else "FAILED" if kind is not None else "FINISHED")
        try:
            if self.info.is_main:
                self.directory.release(failed=kind is not None)
        finally:
            cleanup(self.info)
        if kind is None and self._stop_signal is not None:  # a signal during the final writes: they are done
            name = signal.Signals(self._stop_signal).name
            raise RunInterrupted(self._stop_signal, f"interrupted by {name} after the last round; {self.output} "
                                                    f"holds the finished run (its final files were completed)")

    def _on_signal(self, signum, frame) -> None:
        if self.info.is_main and self.directory.replacing:  # stop now: the run it replaces is put back on exit
            raise RunInterrupted(signum, f"interrupted by {signal.Signals(signum).name} before the new run's first "
                                         f"checkpoint: the run it was replacing is back in {self.output}")
        if not self._started or self._stop_signal is not None:  # nothing to save yet, or asked twice: stop now
            raise KeyboardInterrupt if signum == signal.SIGINT else RunInterrupted(signum)
        self._stop_signal = signum  # the loop stops at the next optimizer-step boundary, after saving

    def _claim_directory(self) -> None:
        error = None
        if self.info.is_main:
            try:
                self.directory.claim(self.cfg.resume, self.cfg.overwrite, self.restart_command)
            except RMTError as e:
                error = str(e)
        error = broadcast_object(error, self.info)
        if error is not None:
            raise RMTError(error)

    @property
    def restart_command(self) -> str:
        return f"{self.command} --config {self.output / 'config.yaml'} --resume auto"

    def log(self, message: str) -> None:
        """A line for the user, from the main process (above the progress bar on a terminal)."""
        if self.info.is_main:
            tqdm.write(message, file=sys.stderr) if sys.stderr.isatty() else _logger.info(message)

    def log_start(self, model: str, data: str, schedule: str) -> None:
        """The run's first line, the same for every task: what trains, on what data, where, in which
        precision, how long, and where its files go."""
        self.log(f"{model}; {data}; {self.info.world_size} process(es) on {self.device} in {self.precision}, "
                 f"{schedule}; output {self.output}")

    # ------------------------------------------------------------------------------ building
    def prepare_model(self, model: nn.Module, find_unused_parameters: bool = False) -> Tuple[nn.Module, nn.Module]:
        """Move ``model`` to the device (SyncBatchNorm on CUDA with ``sync_bn``) and wrap it in DDP when
        there are several processes. Returns ``(model, ddp)``: train through ``ddp``, save ``model``."""
        model.to(self.device)
        if self.cfg.sync_bn and self.info.distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.info.is_main:
                _logger.warning("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); each process keeps its "
                                "own batch statistics")
        ddp = model
        if self.info.distributed:
            # buffers a module declares constant (MaSA's decay and angles: the same on every process) are not
            # re-broadcast each step: rewriting them in place would make MaSA rebuild its tables every step
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, constant_buffers(model))
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                      find_unused_parameters=find_unused_parameters)
        return model, ddp

    def train_loader(self, dataset: Dataset, collate_fn: Callable, workers: int, repeats: int = 1,
                     drop_last: bool = True) -> DataLoader:
        """The training loader: this process's share of each epoch, reproducible and resumable (each
        sample's augmentation is seeded by ``(seed, epoch, position)``: rmt.data.sampling)."""
        cfg, info = self.cfg, self.info
        sampler = ResumableSampler(len(dataset), rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                   shuffle=True, repeats=repeats)
        # a private generator: creating an epoch's iterator must not draw from the global generator, or a
        # run resumed mid-epoch would be one draw ahead
        loader = DataLoader(SeededDataset(dataset), batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=collate_fn, drop_last=drop_last and len(sampler) >= cfg.batch_size,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
        if len(loader) == 0:
            raise RMTError(f"the training set ({len(dataset)} images over {info.world_size} process(es)) is smaller "
                           f"than one batch of {cfg.batch_size}")
        return loader

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
              meta: Dict[str, Any], ema_decay: Optional[float] = None) -> OptimizerStep:
        """Start the run: EMA and fp16 scaler as configured, the checkpoint of ``--resume`` checked and
        loaded, the old run's files removed for ``--overwrite``, ``config.yaml`` written. Returns the
        optimizer step's pieces, for the loop to call (rmt.training.step).

        ``meta``: what the weights are (rmt.models.weights.METADATA_KEYS), saved with every
        checkpoint and ``model.safetensors``; ``task`` and ``config`` are added here."""
        cfg = self.cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.meta = dict(meta, task=self.task, config=cfg.to_dict())
        if cfg.model_ema:
            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay if ema_decay is None else ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        resume = self._resume_path()
        checkpoint = read_run_checkpoint(resume, task=self.task) if resume is not None else None
        if checkpoint is not None:
            self._check_resumable(checkpoint, resume)
        if self.info.is_main:
            if checkpoint is None:  # a new run: one it replaces is set aside until our first checkpoint
                self.directory.start()
            save_config(cfg, self.output / "config.yaml")
        barrier(self.info)
        self._started = True
        if checkpoint is not None:
            self._load(checkpoint, resume)
            if self._changed and self.info.is_main:
                self._record_changes(resume)
        # after the resume: it counts into the restored progress
        self.step = OptimizerStep(model, optimizer, scheduler, self.scaler, self.ema, self.progress,
                                  accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                                  max_bad_steps=cfg.max_bad_steps, device=self.device, log=self.log)
        if self.info.is_main:  # the derived files follow the checkpoint (a kill may have cut them short)
            self._write_derived()
            about = dict(task=self.task, device=self.device, precision=self.precision,
                         world_size=self.info.world_size, command=self.command, output=self.output)
            if checkpoint is not None:
                about["resumed"] = f"from {resume} at iteration {self.progress.iteration}"
            self.trackers = RunTrackers.open(self._tracker_names, self.output, step=self.progress.iteration,
                                             resumed=checkpoint is not None, config=cfg.to_dict(), about=about,
                                             config_text=config_to_yaml(cfg))
        return self.step

    def _resume_path(self) -> Optional[Path]:
        resume = self.cfg.resume
        if not resume:
            return None
        path = self.output / "last.pth" if resume == "auto" else Path(resume)
        if path.is_file():
            return path
        if resume != "auto":
            raise RMTError(f"--resume: no checkpoint at {path}")
        self.log(f"--resume auto: no {path} yet, starting from scratch")
        return None

    def _check_resumable(self, ckpt: RunCheckpoint, path: Path) -> None:
        """Refuse to resume with a setting that changes the result (before anything is written); keep
        the settings that may change in ``self._changed`` (module doc)."""
        refused, self._changed = self.cfg.resume_changes(ckpt.config)
        saved_names, names = ckpt.meta.get("class_names"), self.meta.get("class_names")
        if saved_names != names:
            refused.append(("classes", _classes(saved_names), _classes(names)))
        if ckpt.world_size != self.info.world_size:
            refused.append(("processes", ckpt.world_size, self.info.world_size))
        if ckpt.precision is not None and ckpt.precision != self.precision:
            refused.append(("precision", ckpt.precision, self.precision))
        if refused:
            raise RMTError(f"--resume {path}: not the same run, the settings that change the result must be the "
                           f"saved ones: {describe_changes(refused)}. Resume it with its saved settings "
                           f"({self.restart_command}), or start a new run with another --output (or --overwrite)")

    def _record_changes(self, path: Path) -> None:
        """Log the settings a resume changed and add a line to ``resumes.log`` (module doc)."""
        line = (f"resumed from {path} at epoch {self.progress.epoch + 1}, iteration {self.progress.iteration}, "
                f"with changed settings: {describe_changes(self._changed)}")
        self.log(line)
        log = self.output / "resumes.log"
        before = log.read_text() if log.is_file() else ""
        atomic_write_text(log, before + f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _load(self, ckpt: RunCheckpoint, path: Path) -> None:
        self.model.load_state_dict(ckpt.model)
        if self.ema is not None and ckpt.model_ema is not None:
            self.ema.module.load_state_dict(ckpt.model_ema)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.progress, self.history = ckpt.progress, list(ckpt.history)
        if self.scheduler is not None:
            if hasattr(self.scheduler, "step_update"):
                # timm's schedules are a function of the update count and the config (their state dict holds
                # only the config's values): the config's schedule, at the restored update count
                self.scheduler.step_update(num_updates=self.progress.iteration)
            elif ckpt.scheduler is not None:  # torch's hold their step; their lambdas read the config
                self.scheduler.load_state_dict(ckpt.scheduler)
        mine = ckpt.ranks[self.info.rank]
        set_rng_state(mine["rng"])
        self._loss_sum = torch.tensor(mine["loss_sum"], dtype=torch.float64, device=self.device)
        self._loss_count = mine["loss_count"]
        where = f"epoch {self.progress.epoch + 1}" + (f", step {self.progress.step}" if self.progress.step else "")
        self.log(f"resumed from {path} at {where}, iteration {self.progress.iteration}")

    # ------------------------------------------------------------------------------ the loop
    def epochs(self, total: int) -> Iterator[int]:
        """Epoch indices from where the run is to ``total`` (the data of each is run by :meth:`batches`)."""
        while self.progress.epoch < total:
            yield self.progress.epoch

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        """The rest of the current epoch's batches; before each, the optimizer step learns whether the
        batch completes an update. After each batch that does, it stops the run for a pending signal
        and writes the interval checkpoint (optimizer-step boundaries)."""
        progress = self.progress
        loader.sampler.set_epoch(progress.epoch)
        loader.sampler.set_start(progress.step * loader.batch_size)
        total = len(loader) + progress.step
        bar = progress_bar(loader, self.info.is_main, desc=f"epoch {progress.epoch + 1}", initial=progress.step,
                           total=total)
        for batch in bar:
            progress.step += 1  # counted before the body: a checkpoint taken inside it resumes after this batch
            self.step.start_batch(progress.step, total)
            updates, rounds = progress.iteration, len(self.history)
            yield batch
            if self.step.due:
                self._stop_if_signalled()
                # the body updated the weights (a skipped bad step does not) and no round has saved them since
                unsaved = progress.iteration != updates and len(self.history) == rounds
                interval = self.cfg.checkpoint_interval
                if interval and unsaved and progress.iteration % interval == 0 and progress.step < total:
                    self.save_last()
        bar.close()
        progress.epoch, progress.step = progress.epoch + 1, 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the run's dtype (nothing for float32), around a training forward: a BatchNorm layer
        that gets one value per channel is reported as bad input (module doc)."""
        try:
            with autocast(self.device, self.amp_dtype):
                yield
        except ValueError as e:
            if "Expected more than 1 value per channel when training" not in str(e):
                raise
            shape = str(e).rpartition("input size ")[2].replace("torch.Size", "")
            raise RMTError(f"a BatchNorm layer gets one value per channel in training (its input is {shape}): "
                           f"{self.cfg.batch_size} image(s) per process per step is too few at this input size; "
                           f"use --batch-size 2 or more (or larger inputs)") from None

    def record_loss(self, loss: torch.Tensor, count: int = 1) -> None:
        """Add a trained batch's ``loss`` (over ``count`` images) to the round's mean train loss and
        images per second (on the device: no host sync)."""
        self._loss_sum += loss.detach().float().double() * count
        self._loss_count += count
        self._round_images += count

    def log_update(self, loss: torch.Tensor) -> None:
        """After an update, every ``log_interval`` updates: the non-finite-loss check (a host sync), then
        ``loss`` (the update's last batch), the learning rate and the images per second, to the trackers
        and (without a terminal) the log."""
        if self.progress.iteration % self.cfg.log_interval:
            return
        self.step.check_finite()
        loss = loss.detach()
        if self.trackers.active:  # the throughput since the previous logged step
            (since, images), now = self._logged_at, time.perf_counter()
            self._logged_at = (now, self._round_images)
            self.trackers.scalars({"train/loss": float(loss), "train/lr": self.lr, "train/images_per_second":
                                   (self._round_images - images) * self.info.world_size / max(now - since, 1e-9)},
                                  self.progress.iteration)
        if self.info.is_main and not sys.stderr.isatty():
            _logger.info("epoch %d step %d, iteration %d: loss %.4f, lr %.3g", self.progress.epoch + 1,
                         self.progress.step, self.progress.iteration, float(loss), self.lr)

    @property
    def precision(self) -> str:
        """What the run computes in: ``float32``, ``bf16 autocast``, ..."""
        return describe_precision(self.device, self.amp_dtype)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    def _stop_if_signalled(self, saved: bool = False) -> None:
        stop = self._stop_signal or 0
        if self.info.distributed:  # every process stops at the same step, so that they save together
            stop = int(all_reduce_sum(torch.tensor([stop], dtype=torch.int64), self.info).max())
        if stop:
            path = self.output / "last.pth" if saved else self.save_last()
            raise RunInterrupted(stop, f"interrupted by {signal.Signals(stop).name} at epoch "
                                       f"{self.progress.epoch + 1}, step {self.progress.step}: saved {path}. "
                                       f"Resume with: {self.restart_command}")

    # ------------------------------------------------------------------------------ rounds
    def _new_round(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_count = 0
        self._round_images = 0
        self._round_start = time.perf_counter()
        self._logged_at = (self._round_start, 0)  # (time, images of the round) at the last step logged

    def end_round(self, metrics: Dict[str, Any], describe: Callable[[Dict[str, Any]], str]) -> Dict[str, Any]:
        """Close an evaluation round: a row of ``metrics.csv`` (epoch, iteration, train loss, lr, ``metrics``,
        seconds, images per second), ``best.pth``/``model.safetensors`` if the run's metric improved,
        ``last.pth``, retention, curves; logs ``describe(row)``. Returns the row."""
        self.step.check_finite()
        self._check_weights()
        count = torch.tensor(float(self._loss_count), dtype=torch.float64, device=self.device)
        totals = all_reduce_sum(torch.stack([self._loss_sum, count]), self.info)
        seconds = time.perf_counter() - self._round_start
        images_per_second = self._round_images * self.info.world_size / max(seconds, 1e-9)
        row = dict(epoch=self.progress.epoch, iteration=self.progress.iteration,
                   train_loss=float(totals[0] / max(float(totals[1]), 1.0)), lr=self.lr, **metrics,
                   **{self.spec.time_column: seconds}, images_per_second=images_per_second)
        value = row.get(self.spec.metric)
        improved = value is not None and math.isfinite(value) and (self.progress.best_value is None
                                                                   or value > self.progress.best_value)
        if improved:
            self.progress.best_value, self.progress.best_at = value, row[self.spec.unit]
        self.history.append(row)
        self.trackers.scalars({f"metrics/{key}": value for key, value in row.items()}, self.progress.iteration)
        self._new_round()
        self.log(describe(row))
        self._save_round(row, improved)
        self._stop_if_signalled(saved=True)
        return row

    def _check_weights(self) -> None:
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLossError(f"the weights are not finite after epoch {self.progress.epoch}, iteration "
                                     f"{self.progress.iteration} ({len(bad)} tensors, first {bad[0]}); stopped, the "
                                     f"last good checkpoint is kept. Lower --lr or set --clip-grad")

    # ------------------------------------------------------------------------------ saving
    def checkpoint(self) -> RunCheckpoint:
        """The run's state now (every process takes part: each adds its random state and loss sums)."""
        self.step.check_finite()
        mine = dict(rng=rng_state(), loss_sum=float(self._loss_sum), loss_count=self._loss_count)
        ranks = all_gather_objects(mine, self.info)
        return RunCheckpoint(
            meta=self.meta, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            progress=Progress.from_dict(self.progress.to_dict()), history=list(self.history), ranks=ranks,
            world_size=self.info.world_size, precision=self.precision,
            model_ema=self.ema.module.state_dict() if self.ema is not None else None,
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None)

    def save_last(self) -> Path:
        """Write ``last.pth`` (all processes call it; the main one writes)."""
        path = self.output / "last.pth"
        checkpoint = self.checkpoint()
        if self.info.is_main:
            self.trackers.flush()  # what was logged up to the checkpoint is on disk before it
            atomic_save(checkpoint.to_dict(), path)
            self.directory.commit()
        barrier(self.info)
        return path

    def _save_round(self, row: Dict[str, Any], improved: bool) -> None:
        # best before last: a kill between the two resumes from the older last.pth and redoes the round
        checkpoint = self.checkpoint()
        if self.info.is_main:
            self.trackers.flush()
            state = checkpoint.to_dict()
            if improved:
                atomic_save(state, self.output / "best.pth")
                metrics = {k: row[k] for k in (self.spec.unit, self.spec.metric) if k in row}
                meta = dict(self.meta, metrics=metrics)
                save_weights(self.model, self.output / "model.safetensors", meta)
            last = atomic_save(state, self.output / "last.pth")
            self.directory.commit()
            if self.cfg.keep_checkpoints > 0:
                label = "epoch" if self.spec.unit == "epoch" else "iter"
                number = row[self.spec.unit]
                self.directory.retain(last, f"{label}_{number:0{4 if label == 'epoch' else 8}d}.pth",
                                      self.cfg.keep_checkpoints)
            self._write_derived()
            self.trackers.image_file("curves", self.output / "curves.png", self.progress.iteration)
        barrier(self.info)

    def _write_derived(self) -> None:
        """``metrics.csv`` and ``curves.png`` from the history (they follow the checkpoints)."""
        if not self.history:
            return
        self.directory.write_metrics(self.history, self.spec.columns)
        try:
            plot_curves(self.history, self.output / "curves.png", self.spec.unit, self.spec.losses, self.spec.plotted)
        except Exception as e:  # a plot must never stop a run
            _logger.warning("could not draw curves.png: %s", e)

    def finish(self) -> RunResult:
        """The run's summary."""
        if self.info.is_main and not self.history:
            self.log("no evaluation ran")
        final = dict(self.history[-1]) if self.history else {}
        return RunResult(self.output, self.spec.metric, self.progress.best_value, self.progress.best_at, final,
                         list(self.history))
