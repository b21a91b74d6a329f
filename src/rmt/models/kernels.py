"""Compiled CPU kernels, built on first use.

``short_attention``: softmax attention over many short sequences (length <= 32), the shape of
MaSA's decomposed passes at ImageNet resolutions (rows and columns of 14 and 28 tokens). The CPU
flash kernel pays a fixed cost per sequence and fills a fraction of each vector register for such
rows. This kernel (``csrc/short_attention.cpp``) keeps one sequence in L1 and vectorises across it:
about 3x faster at length 14 and 1.2x at 28 on the 2-core AVX-512 machine of BENCHMARKS.md. It
serves inference (no autograd), float32, CPU; everything else takes
``scaled_dot_product_attention``.

It is compiled with ``torch.utils.cpp_extension`` the first time it is needed. That takes about
30 s, and the result is cached in ``~/.cache/torch_extensions`` (or ``$TORCH_EXTENSIONS_DIR``) for
later runs. It needs a C++ compiler and ninja. If the build fails, MaSA logs one warning and keeps using the PyTorch
kernels. ``RMT_CPU_KERNELS=0`` (or :func:`use_cpu_kernels`) switches the kernel off.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["short_attention", "short_attention_applies", "use_cpu_kernels", "cpu_kernels_enabled",
           "MAX_SHORT_LENGTH"]

_logger = logging.getLogger(__name__)
MAX_SHORT_LENGTH = 32  # longer rows: the flash kernel is as fast (measured)
_SOURCE = Path(__file__).parent / "csrc" / "short_attention.cpp"
_enabled = os.environ.get("RMT_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_module = None
_failed = False


def use_cpu_kernels(enabled: bool) -> None:
    """Switch the compiled CPU kernels on or off (for comparisons; on by default)."""
    global _enabled
    _enabled = enabled


def cpu_kernels_enabled() -> bool:
    return _enabled and not _failed


def _load():
    global _module, _failed
    if _module is None and not _failed:
        try:
            from torch.utils.cpp_extension import load

            capability = torch.backends.cpu.get_cpu_capability().lower()  # -march=native: one build per ISA
            _logger.info("loading the CPU short-attention kernel (compiled on first use, about 30 s, then cached)")
            _module = load(name=f"rmt_short_attention_{capability}", sources=[str(_SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, ...: the PyTorch kernels still work
            _failed = True
            _logger.warning("rmt: CPU short-attention kernel unavailable (%s); using scaled_dot_product_attention",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _module


def short_attention_applies(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`short_attention` can take this pass: on, float32 CPU, no autograd, ``L <= 32``
    and ``D`` of 16, 32 or 64 (the compiled cases)."""
    if not _enabled or _failed or q.device.type != "cpu" or q.dtype != torch.float32 or bias.dtype != torch.float32:
        return False
    if q.shape[-2] > MAX_SHORT_LENGTH or q.shape[-1] not in (16, 32, 64):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad))


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                    out: torch.Tensor) -> bool:
    """``out = softmax(q k^T scale + bias) v`` for ``(S, H, L, D)`` views with unit stride in ``D``
    (``bias``: contiguous ``(1, H, L, L)``), written into the view ``out``, without autograd. Returns
    ``False``, writing nothing, if the kernel could not be built or does not cover the shape (check
    :func:`short_attention_applies` first)."""
    module: Optional[object] = _load()
    return bool(module is not None and module.forward(q, k, v, bias, scale, out))
