"""Learning-rate schedules counted in optimizer updates, for the tasks that do not use timm's.

:func:`warmup_schedule` is the dense-prediction recipe (mmcv's): a linear warm-up from
``warmup_ratio`` x lr over ``warmup_iters`` updates, multiplied into the task's decay factor.
It is a ``LambdaLR``, stepped once per update by the run and saved with its checkpoints.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_schedule"]


def warmup_schedule(optimizer: torch.optim.Optimizer, decay: Callable[[int], float], warmup_iters: int,
                    warmup_ratio: float) -> LambdaLR:
    """lr(update) = lr x decay(update) x warm-up factor(update)."""

    def factor(update: int) -> float:
        value = decay(update)
        if update < warmup_iters:
            value *= 1 - (1 - update / warmup_iters) * (1 - warmup_ratio)
        return value

    return LambdaLR(optimizer, factor)
