"""MaSA's fast paths, in one place: fused linear epilogues, GELU + depthwise conv with a lean
backward, and the compiled short-row attention kernel (``csrc/``).

Every fast path has the plain PyTorch math beside it and takes it unless :func:`fast_path_allowed`
holds: eager execution on plain tensors. Compiling, exporting, scripting and FX tracing get the plain
ops (their graphs must hold portable ATen ops), and so does FLOP counting (the counter must see
the attention and the linears as ATen ops). Each path adds its own conditions (device, dtype,
shape) in its ``*_applies`` function.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["fast_path_allowed", "tracing", "counting_flops", "compute_dtype", "ONNX_OPERATORS_AVAILABLE",
           "onnx_operators", "onnx_operators_enabled"]

# FlopCounterMode pushes an internal dispatch mode (_FlopCounterMode in recent torch, itself before)
_FLOP_MODES = tuple(c for c in (getattr(flop_counter, "FlopCounterMode", None),
                                getattr(flop_counter, "_FlopCounterMode", None)) if isinstance(c, type))


def tracing() -> bool:
    """Compiling, exporting, scripting or tracing: graphs must then hold portable ops."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


try:  # torch >= 2.8: ONNX operators that torch.export records as such and the ONNX exporter writes as they are
    from torch.onnx import ops as _onnx_ops

    ONNX_OPERATORS_AVAILABLE = hasattr(_onnx_ops, "attention") and hasattr(_onnx_ops, "rotary_embedding")
except ImportError:
    ONNX_OPERATORS_AVAILABLE = False

_onnx_operators = False


@contextlib.contextmanager
def onnx_operators(enabled: bool = True) -> Iterator[None]:
    """While active, graphs traced for ONNX record MaSA as ONNX's own ``RotaryEmbedding`` and
    ``Attention`` operators (opset 23) instead of their arithmetic in plain ops; ONNX Runtime runs
    those as single kernels (see :meth:`rmt.models.masa.MaSA.forward`). Eager execution is unaffected."""
    global _onnx_operators
    before = _onnx_operators
    _onnx_operators = enabled and ONNX_OPERATORS_AVAILABLE
    try:
        yield
    finally:
        _onnx_operators = before


def onnx_operators_enabled() -> bool:
    """Inside :func:`onnx_operators`, while tracing."""
    return _onnx_operators and tracing()


def counting_flops() -> bool:
    """FLOPs are being counted: fast paths must then run the ATen ops that the counter knows."""
    return isinstance(_get_current_dispatch_mode(), _FLOP_MODES)


def fast_path_allowed(x: torch.Tensor) -> bool:
    """Whether a fast path may take ``x``: a plain eager tensor, not traced, compiled or FLOP-counted."""
    return type(x) is torch.Tensor and not tracing() and not counting_flops()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's on ``x``'s device while it is enabled there,
    else ``x``'s own. Devices without autocast (``meta``, ...) always give ``x.dtype``."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
