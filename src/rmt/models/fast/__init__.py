"""MaSA's fast paths, in one place: fused linear epilogues, GELU + depthwise conv with a lean
backward, and the compiled short-row attention kernel (``csrc/``).

Which form a call computes in is decided once, by :func:`route`: the modules of
:mod:`rmt.models.masa` and :mod:`rmt.models.rmt` branch on it between their plain-ops forms and their
fast forms, and every fast path here takes its fused op or kernel only on :attr:`Route.FAST`, adding
the device, dtype and shape it needs in its ``*_applies`` function. The matmuls' dtype is
:func:`compute_dtype`.
"""
from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch
import torch.fx
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["Route", "route", "compute_dtype", "ONNX_OPERATORS_AVAILABLE", "onnx_operators"]

# FlopCounterMode pushes an internal dispatch mode (_FlopCounterMode in recent torch, itself before)
_FLOP_MODES = tuple(c for c in (getattr(flop_counter, "FlopCounterMode", None),
                                getattr(flop_counter, "_FlopCounterMode", None)) if isinstance(c, type))

try:  # torch >= 2.8: ONNX operators that torch.export records as such and the ONNX exporter writes as they are
    from torch.onnx import ops as _onnx_ops

    ONNX_OPERATORS_AVAILABLE = hasattr(_onnx_ops, "attention") and hasattr(_onnx_ops, "rotary_embedding")
except ImportError:
    ONNX_OPERATORS_AVAILABLE = False

_onnx_operators = False


@contextlib.contextmanager
def onnx_operators(enabled: bool = True) -> Iterator[None]:
    """While active, graphs that ``torch.export`` captures record MaSA as ONNX's own ``RotaryEmbedding``
    and ``Attention`` operators (opset 23) instead of their arithmetic in plain ops (:attr:`Route.ONNX`);
    ONNX Runtime runs those as single kernels. Eager execution is unaffected."""
    global _onnx_operators
    before = _onnx_operators
    _onnx_operators = enabled and ONNX_OPERATORS_AVAILABLE
    try:
        yield
    finally:
        _onnx_operators = before


class Route(enum.Enum):
    """The form a call computes in (see :func:`route`)."""

    PLAIN = "plain"
    """Each module's plain-ops form, MaSA tables built in the graph in the input's dtype: TorchScript, FX
    symbolic tracing, ``torch.jit.trace`` (``openvino.convert_model`` traces so too) and meta tensors
    (shapes only). A trace must depend on nothing but the input's shape -- not on grad mode (the fast
    paths pick their fusions by it) nor on the table cache -- or the tracer's check, which traces again
    under ``no_grad``, finds two different graphs."""
    GRAPH = "graph"
    """``torch.compile`` and ``torch.export``: the fast forms, every op a portable ATen op (no fused op
    or compiled kernel), the tables built in the graph (so exports take any size)."""
    ONNX = "onnx"
    """:attr:`GRAPH` inside :func:`onnx_operators`: MaSA as ONNX's ``RotaryEmbedding`` and ``Attention``."""
    ATEN = "aten"
    """Eager, ATen ops only, tables cached: FLOP counting (the counter must see the attention and the
    linears as the ATen ops it knows) and tensor subclasses (their ops are theirs to run)."""
    FAST = "fast"
    """Eager plain tensors: every fast path, each where its device, dtype and shape allow."""


def route(x: torch.Tensor) -> Route:
    """The form a call on ``x`` computes in, from the mode it runs in.

    TorchScript always gets :attr:`Route.PLAIN`; callers test ``torch.jit.is_scripting()`` first, in
    the same condition, which TorchScript resolves before compiling the branches, so it compiles only
    the plain forms.
    """
    if torch.jit.is_scripting():
        return Route.PLAIN
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or x.is_meta:
        return Route.PLAIN
    if torch.compiler.is_compiling():
        return Route.ONNX if _onnx_operators else Route.GRAPH
    if type(x) is not torch.Tensor or isinstance(_get_current_dispatch_mode(), _FLOP_MODES):
        return Route.ATEN
    return Route.FAST


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: autocast's on ``x``'s device while it is enabled there,
    else ``x``'s own. Devices without autocast (``meta``, ...) always give ``x.dtype``."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
