"""The optimizer step, in pieces that each task's loop calls in order, as torchvision's
``train_one_epoch`` writes it (the run, rmt.training.run, builds it in ``begin`` and says which batch
completes an update)::

    step = run.begin(model, optimizer, scheduler, meta=...)
    ...
        for batch in run.batches(loader):
            with step.accumulate(ddp):
                with run.autocast():
                    loss = ...
                if not step.backward(loss):          # a non-finite loss, skipped (--max-bad-steps)
                    continue
            run.record_loss(loss, count=...)
            if step.due:                             # the batch completes an update (--accum-steps)
                step.clip_gradients()
                step.optimizer_step()
                step.update_ema()
                step.schedule()
                run.log_update(loss)

The pieces: **accumulation** (an update every ``accum_steps`` batches and at the end of each epoch;
DDP ``no_sync`` on the batches between), the **fp16 gradient scaler**, **gradient clipping**, the
**EMA** update, the schedule's **per-update step**.

**Non-finite loss** (the same for every task): with ``max_bad_steps`` 0 (the default) the run stops
with :class:`rmt.errors.NonFiniteLossError` (exit status 3) naming the step; nothing computed after
the bad step is saved, the last good checkpoint stays. The loss is checked on the host only at log
intervals and before every save (:meth:`OptimizerStep.check_finite`, no per-step device sync): the
first bad step is tracked on the device. With ``max_bad_steps`` N > 0 every loss is checked (a sync
per step), up to N bad steps are skipped (their gradients dropped and their BatchNorm statistics
restored), and the N+1-th stops the run.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, List, Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..errors import NonFiniteLossError
from .checkpoint import Progress

__all__ = ["OptimizerStep"]

_NO_BAD_STEP = torch.iinfo(torch.int64).max


class OptimizerStep:
    """The pieces of one optimizer update (module doc), over the run's ``model``, ``optimizer``,
    ``scheduler``, fp16 ``scaler`` and ``ema`` (each but the first two may be ``None``). It counts the
    updates and the skipped bad steps in the run's ``progress``; ``log`` is the run's line for the user."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEmaV3], progress: Progress, *,
                 accum_steps: int, clip_grad: Optional[float], max_bad_steps: int, device: torch.device,
                 log: Callable[[str], None]):
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.progress = progress
        self.accum_steps, self.clip_grad, self.max_bad_steps = accum_steps, clip_grad, max_bad_steps
        self.log = log
        self.due = True  # whether the current batch completes an update (start_batch)
        self._first_bad = torch.tensor(_NO_BAD_STEP, device=device)  # epoch * 2**32 + step of the first bad loss
        self._norm_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                              for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._saved_norms: Optional[List[torch.Tensor]] = None

    def start_batch(self, position: int, total: int) -> None:
        """Before the ``position``-th batch (from 1) of an epoch of ``total``: an update every
        ``accum_steps`` batches, and one at the epoch's end for the batches left over."""
        self.due = position % self.accum_steps == 0 or position == total

    def accumulate(self, ddp: nn.Module) -> ContextManager:
        """Around a batch's forward and backward: DDP does not synchronise gradients for batches that do
        not complete an update. With ``max_bad_steps`` it also snapshots the BatchNorm statistics,
        which a skipped batch must not change."""
        if self.max_bad_steps > 0:
            self._saved_norms = [b.clone() for b in self._norm_buffers]
        if isinstance(ddp, nn.parallel.DistributedDataParallel) and not self.due:
            return ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> bool:
        """``loss.backward()`` of one batch, divided over the accumulated batches and scaled for fp16,
        after the non-finite-loss policy (module doc). Returns ``False`` when the batch was skipped."""
        loss_detached = loss.detach().float()
        if self.max_bad_steps > 0:
            if not math.isfinite(float(loss_detached)):
                self._skip_bad_step()
                return False
        else:
            self._track_first_bad(loss_detached)
        scaled = loss / self.accum_steps
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return True

    def clip_gradients(self) -> None:
        """Clip the gradient norm to ``clip_grad`` (the fp16 gradients unscaled first); nothing without it."""
        if self.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)

    def optimizer_step(self) -> None:
        """``optimizer.step()`` (through the fp16 scaler, which skips a step with inf gradients), the
        gradients cleared, the update counted (``progress.iteration``)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.iteration += 1

    def update_ema(self) -> None:
        """The EMA weights follow the update (when the run keeps them)."""
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.iteration - 1)  # the update's index, from 0

    def schedule(self) -> None:
        """The learning-rate schedule's per-update step."""
        if self.scheduler is not None:
            if hasattr(self.scheduler, "step_update"):  # timm's schedulers count updates themselves
                self.scheduler.step_update(num_updates=self.progress.iteration)
            else:
                self.scheduler.step()

    def check_finite(self) -> None:
        """Raise for a non-finite loss seen so far (a host sync: the run calls it at log intervals and
        before every save)."""
        first = int(self._first_bad)
        if first != _NO_BAD_STEP:
            epoch, step = divmod(first, 2**32)
            raise NonFiniteLossError(
                f"the loss is not finite at epoch {epoch + 1}, step {step}; stopped, the last good checkpoint is "
                f"kept. Lower --lr, set --clip-grad, or allow a few bad steps with --max-bad-steps N")

    def _track_first_bad(self, loss: torch.Tensor) -> None:
        position = self.progress.epoch * 2**32 + self.progress.step  # decoded in check_finite
        first_here = ~torch.isfinite(loss) & (self._first_bad == _NO_BAD_STEP)
        self._first_bad = torch.where(first_here, position, self._first_bad)

    def _skip_bad_step(self) -> None:
        progress = self.progress
        progress.bad_steps += 1
        where = f"epoch {progress.epoch + 1}, step {progress.step}"
        if progress.bad_steps > self.max_bad_steps:
            raise NonFiniteLossError(f"the loss is not finite at {where} ({progress.bad_steps} bad steps, more "
                                     f"than --max-bad-steps {self.max_bad_steps}); stopped, the last good "
                                     f"checkpoint is kept. Lower --lr or set --clip-grad")
        self.optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(self._norm_buffers, self._saved_norms or []):
            buffer.copy_(saved)
        self.log(f"warning: non-finite loss at {where}, step skipped ({progress.bad_steps}/{self.max_bad_steps})")
