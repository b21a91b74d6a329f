"""The optimizer every task trains with: timm's factory, with PyTorch's fused kernels where they exist.

``torch.optim.Adam``/``AdamW`` update every parameter tensor in a Python-level loop on the CPU unless
asked otherwise (``foreach`` defaults to on only for CUDA tensors); their ``fused=True`` form updates all
of them in one kernel call, on the CPU and on CUDA. RMT has many small tensors (556 in RMT-S), so the
loop is a visible part of a CPU step (BENCHMARKS.md, "Smaller choices"). The arithmetic is the same
update (results agree to float rounding).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

__all__ = ["create_optimizer", "FUSED_OPTIMIZERS"]

# timm names whose optimizer class is torch.optim's Adam or AdamW, which have a fused form on CPU and CUDA
FUSED_OPTIMIZERS = ("adam", "adamw")


def create_optimizer(model: nn.Module, opt: str, device: torch.device, **kwargs: Any) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2(model, opt=opt, **kwargs)``, fused for Adam/AdamW on CPU or CUDA
    parameters."""
    if opt.lower() in FUSED_OPTIMIZERS and device.type in ("cpu", "cuda") and "foreach" not in kwargs:
        kwargs.setdefault("fused", True)
    return create_optimizer_v2(model, opt=opt, **kwargs)
