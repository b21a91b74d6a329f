"""Fused operations of the RMT blocks: linear epilogues for CPU inference, GELU + depthwise conv
for training.

**Linear epilogues.**
``fused_linear(x, layer, gelu=..., scale=..., residual=...)`` computes
``residual + scale * act(layer(x))``. Where nothing needs gradients (inference), on CPU in float32,
it runs as one oneDNN matmul whose post-op applies the GELU or adds the residual while the output
is still in cache: no bias broadcast copy, and no extra memory pass for the activation or the
add. These passes are a large share of a CPU forward (the machine is memory-bound on them), so
this is where inference time goes down. Everywhere else -- training, other devices and dtypes,
tracing and export (whose graphs must hold portable ops) -- it is the same arithmetic in plain
ops. The two agree to float32 rounding (different GEMM blocking), which the tests bound.

**GELU + depthwise conv** (the FFN's middle, ``conv(gelu(h))`` on the widest tensor of the block).
Autograd would keep both ``h`` (for GELU's backward) and ``gelu(h)`` (for the conv's weight
gradient); :func:`gelu_dwconv` keeps only ``h`` and recomputes ``gelu(h)`` in the backward pass.
That is one elementwise pass more per block and a third less FFN activation memory in training.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_path_allowed

__all__ = ["fused_linear", "gelu_dwconv", "use_onednn"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = True


def use_onednn(enabled: bool) -> None:
    """Switch the oneDNN inference path on or off (for comparisons; it is on by default)."""
    global _enabled
    _enabled = enabled


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    if not (_ONEDNN and _enabled) or not fast_path_allowed(x):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if weight.dtype != torch.float32 or not x.is_contiguous() or x.is_sparse:
        return False
    if residual is not None and (residual.shape[:-1] != x.shape[:-1] or not residual.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return False
    return True


def fused_linear(x: torch.Tensor, layer: nn.Linear, *, gelu: bool = False, scale: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + scale * act(layer(x))``; ``act`` is exact (erf) GELU or the identity.

    ``scale`` broadcasts over the output channels (layer scale); ``residual`` has the output's shape.
    """
    weight, bias = layer.weight, layer.bias
    if _onednn_applies(x, weight, residual) and not (gelu and residual is not None):
        if scale is not None:  # scale * (W x + b) == (scale W) x + scale b
            s = scale.reshape(-1)
            weight, bias = weight * s[:, None], None if bias is None else bias * s
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    if gelu:
        y = F.gelu(y)
    if scale is not None:
        y = scale * y
    return y if residual is None else residual + y


class _GeluDWConv(torch.autograd.Function):
    """``conv2d(gelu(h), weight, bias)`` (depthwise, stride 1) saving ``h`` only."""

    @staticmethod
    def forward(ctx, h, weight, bias, padding):
        ctx.save_for_backward(h, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        w = weight.to(h.dtype)
        return F.conv2d(F.gelu(h), w, None if bias is None else bias.to(h.dtype), padding=padding,
                        groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        activation = F.gelu(h)  # recomputed instead of stored
        groups = weight.shape[0]
        grad_act, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, activation, weight.to(h.dtype), [groups] if ctx.has_bias else None, [1, 1],
            list(ctx.padding), [1, 1], False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        grad_h = torch.ops.aten.gelu_backward(grad_act, h) if ctx.needs_input_grad[0] else None
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None


def gelu_dwconv(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding) -> torch.Tensor:
    """Depthwise ``conv2d(gelu(h), weight, bias, padding)`` of an NCHW (or channels-last) ``h``.

    Under autograd it stores ``h`` alone (see the module doc); otherwise it is the plain ops.
    """
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if needs_grad and fast_path_allowed(h):
        with torch.autocast(h.device.type, enabled=False):  # computes in h's dtype, as autocast would
            return _GeluDWConv.apply(h, weight, bias, tuple(padding))
    return F.conv2d(F.gelu(h), weight.to(h.dtype), None if bias is None else bias.to(h.dtype), padding=padding,
                    groups=weight.shape[0])
