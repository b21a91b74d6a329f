"""The numeric precision a command runs in, chosen in one place.

``--amp`` takes ``none`` (float32), ``bf16``, ``fp16`` or ``auto``. ``auto`` is bf16 autocast on CUDA
(how GPUs train) and float32 on the CPU; fp16 autocast needs CUDA (its gradient scaler and kernels
are CUDA's). Float32 on CUDA lets matrix products use TF32, as PyTorch's own training recipes do.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from ..errors import RMTError

__all__ = ["AMP_CHOICES", "amp_dtype", "autocast", "configure_float32", "describe_precision", "fast_bf16"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``--amp name`` on ``device``; ``None`` means float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in _DTYPES:
        raise RMTError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {name!r}")
    dtype = _DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise RMTError("fp16 autocast needs CUDA; use --amp bf16 or none on the CPU")
    return dtype


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_float32(device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """Float32 runs on CUDA: let matrix products and convolutions use TF32 tensor cores."""
    if device.type == "cuda" and dtype is None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe_precision(device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """``"bf16 autocast"``, ``"float32"`` or ``"float32 (TF32 matmuls)"``: what a command prints."""
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'fp16')} autocast"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "float32 (TF32 matmuls)"
    return "float32"


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (CUDA with bf16 support, or a CPU
    with AVX512-BF16 / AMX): where bf16 inference is worth choosing by default."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu  # private probes, present in torch >= 2.3; absent means "not known to be fast"
        probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return torch.backends.mkldnn.is_available() and any(p is not None and p() for p in probes)
    return False
