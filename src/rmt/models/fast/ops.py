"""Fused operations of the RMT blocks: linear epilogues for CPU inference, GELU + depthwise conv
for training, and the attention call for passes the compiled kernel does not take.

**Linear epilogues.**
``fused_linear(x, layer, gelu=..., scale=..., residual=...)`` computes
``residual + scale * act(layer(x))``. Where nothing needs gradients (inference), on CPU in float32
or bfloat16 (autocast's or the model's), it runs as one oneDNN matmul whose post-op applies the
GELU or adds the residual while the output is still in cache: no bias broadcast copy, and no extra
memory pass for the activation or the add. These passes are a large share of a CPU forward (the
machine is memory-bound on them), so this is where inference time goes down. Everywhere else --
training, other devices and dtypes, tracing and export (whose graphs must hold portable ops) -- it
is the same arithmetic in plain ops. The two agree to rounding (different GEMM blocking), which the
tests bound. Both return the compute dtype (under autocast: autocast's, layer scale included).

**Depthwise convolutions** (:func:`depthwise_conv`, and :func:`gelu_dwconv` for the FFN's middle,
``conv(gelu(h))`` on the widest tensor of the block). In CPU training their backward pass is one
sweep of a compiled kernel (:mod:`rmt.models.fast.kernel`) that gives the input, weight and bias
gradients together (oneDNN's weight gradient alone is far slower than its forward pass on these
shapes), and the forward pass of ``conv(gelu(h))`` is compiled too: GELU is applied as ``h`` is read,
so neither ``gelu(h)`` nor its gradient is ever written to memory. Autograd would keep both ``h``
(for GELU's backward) and ``gelu(h)`` (for the conv's weight gradient); :func:`gelu_dwconv` keeps only
``h``, a third less FFN activation memory in training (the time saved: BENCHMARKS.md).

**Attention** (:func:`attention`): ``scaled_dot_product_attention``, except for CPU training passes
in bfloat16 or float16, which run in float32: the CPU flash kernel's reduced-precision backward is
several times slower than its float32 backward on the shapes of MaSA (BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import Route, compute_dtype, kernel, route

__all__ = ["fused_linear", "scale_add", "linear_chunks", "gelu_dwconv", "depthwise_conv", "strided_conv", "layer_norm",
           "attention", "use_onednn"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# dtypes the oneDNN path runs in: bfloat16 where oneDNN has bf16 kernels for this CPU (AVX512-BF16/AMX,
# or AVX512 emulation)
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                     else ())
_REDUCED = (torch.bfloat16, torch.float16)
_enabled = True


def use_onednn(enabled: bool) -> None:
    """Switch the oneDNN inference path on or off (for comparisons; it is on by default)."""
    global _enabled
    _enabled = enabled


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                    dtype: torch.dtype) -> bool:
    if not (_ONEDNN and _enabled) or route(x) is not Route.FAST:
        return False
    if x.device.type != "cpu" or dtype not in _ONEDNN_DTYPES or x.dtype not in _ONEDNN_DTYPES:
        return False
    if weight.dtype not in _ONEDNN_DTYPES or not x.is_contiguous() or x.is_sparse:
        return False
    if residual is not None and (residual.shape[:-1] != x.shape[:-1] or not residual.is_contiguous()
                                 or residual.dtype != dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return False
    return True


def fused_linear(x: torch.Tensor, layer: nn.Linear, *, gelu: bool = False, scale: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + scale * act(layer(x))``; ``act`` is exact (erf) GELU or the identity.

    ``scale`` broadcasts over the output channels (layer scale); ``residual`` has the output's shape.
    The result is in the compute dtype (autocast's, or ``x``'s without autocast), or in the
    residual's where that is wider. A quantized ``layer`` (``torch.ao.quantization.quantize_dynamic``'s
    int8 Linear, whose ``weight`` is a method) runs its own forward, with the rest in plain ops.
    """
    if not isinstance(layer.weight, torch.Tensor):  # a quantized module (torch.ao's dynamic int8 Linear)
        return _epilogue(layer(x), gelu, scale, residual)
    weight, bias = layer.weight, layer.bias
    dtype = compute_dtype(x)
    if _onednn_applies(x, weight, residual, dtype) and not (gelu and residual is not None):
        if scale is not None:  # scale * (W x + b) == (scale W) x + scale b
            s = scale.reshape(-1)
            weight, bias = weight * s[:, None], None if bias is None else bias * s
        # what autocast does for F.linear: inputs, weight and bias in the compute dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    return _epilogue(F.linear(x, weight, bias), gelu, scale, residual)


def _epilogue(y: torch.Tensor, gelu: bool, scale: Optional[torch.Tensor], residual: Optional[torch.Tensor]
              ) -> torch.Tensor:
    """``residual + scale * act(y)`` in plain ops, the layer scale in ``y``'s dtype (a float32 scale
    would widen it)."""
    if gelu:
        y = F.gelu(y)
    return scale_add(y, None if scale is None else scale.to(y.dtype), residual)


def scale_add(y: torch.Tensor, scale: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``residual + scale * y``, either left out when ``None``: the epilogue of :func:`fused_linear` in
    plain ops, as the plain forms of the blocks write it (TorchScript compiles it)."""
    if scale is not None:
        y = scale * y
    if residual is not None:
        y = residual + y
    return y


def linear_chunks(x: torch.Tensor, layer: nn.Linear, chunks: int) -> list[torch.Tensor]:
    """``layer(x).chunk(chunks, dim=-1)``, each chunk its own contiguous tensor where oneDNN computes
    it (inference: one product per chunk of the weight's rows).

    For MaSA's ``qkv``: contiguous q and k can be read in place by the column pass, whose
    ``(B, w*heads, h, d)`` view of a chunk of the ``(.., 3C)`` output would otherwise need a copy.
    Training keeps the single product (three gave nothing there).
    """
    weight, bias = layer.weight, layer.bias
    dtype = compute_dtype(x)
    if isinstance(weight, torch.Tensor) and _onednn_applies(x, weight, None, dtype):
        x, weights = x.to(dtype), weight.to(dtype).chunk(chunks, 0)
        biases = [None] * chunks if bias is None else bias.to(dtype).chunk(chunks, 0)
        return [torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "none") for w, b in zip(weights, biases)]
    return list(fused_linear(x, layer).chunk(chunks, dim=-1))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding, gelu: bool = False
          ) -> torch.Tensor:
    """``conv2d(act(x), weight, bias, padding, groups=C)`` in ``x``'s dtype (``act`` GELU with ``gelu``)."""
    return F.conv2d(F.gelu(x) if gelu else x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                    padding=padding, groups=weight.shape[0])


def _depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding,
                       gelu: bool = False) -> torch.Tensor:
    """``conv2d(act(x), weight, bias, padding, groups=C)`` (depthwise, stride 1; ``act`` GELU with
    ``gelu``) in ``x``'s dtype. Of GELU, the compiled kernel where it applies: it applies GELU as it
    reads ``x`` and never stores the activation. Else :func:`_conv` (for a plain convolution oneDNN's
    forward pass is faster than the kernel's)."""
    if gelu and kernel.depthwise_applies(x, weight, padding):
        return kernel.depthwise_forward(x, weight, bias, gelu)
    return _conv(x, weight, bias, padding, gelu)


def _depthwise_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, padding, has_bias: bool,
                        needs, gelu: bool = False) -> tuple:
    """Gradients of :func:`_depthwise_forward` for ``x`` (GELU's derivative included), ``weight`` and
    the bias, each where ``needs`` asks for it, in the dtypes of ``x`` and ``weight`` (the bias's in
    float32).

    The compiled kernel computes all three in one sweep over ``x`` and ``grad`` (oneDNN's weight
    gradient alone is far slower than its forward pass on these shapes); else they come from
    ``convolution_backward`` and ``gelu_backward``."""
    groups = weight.shape[0]
    if kernel.depthwise_applies(x, weight, padding):
        grad_x, grad_w, grad_b = kernel.depthwise_backward(x, grad, weight, gelu)
    else:
        activation = F.gelu(x) if gelu else x
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, activation, weight.to(x.dtype), [groups] if has_bias else None, [1, 1], list(padding), [1, 1],
            False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        if gelu and grad_x is not None:
            grad_x = torch.ops.aten.gelu_backward(grad_x, x)
    grad_x = grad_x if needs[0] else None
    grad_w = None if grad_w is None or not needs[1] else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None or not (has_bias and needs[2]) else grad_b
    return grad_x, grad_w, grad_b


class _DepthwiseConv(torch.autograd.Function):
    """``conv2d(x, weight, bias)`` (depthwise, stride 1) with the compiled backward sweep."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _depthwise_forward(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = _depthwise_backward(x, weight, grad, ctx.padding, ctx.has_bias, ctx.needs_input_grad)
        return grad_x, grad_w, None if grad_b is None else grad_b.to(ctx.bias_dtype), None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding) -> torch.Tensor:
    """Depthwise stride-1 ``conv2d(x, weight, bias, padding)`` of an NCHW (channels-last) ``x``.

    Under autograd, where the compiled kernel applies, its backward pass is the kernel's sweep; otherwise
    it is the plain op. Either way it computes in the compute dtype (autocast's, else ``x``'s).
    """
    dtype = compute_dtype(x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if needs_grad and kernel.depthwise_applies(x, weight, padding, dtype):
        return _DepthwiseConv.apply(x.to(dtype), weight, bias, tuple(padding))
    return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])


class _GeluDWConv(torch.autograd.Function):
    """``conv2d(gelu(h), weight, bias)`` (depthwise, stride 1) saving ``h`` only."""

    @staticmethod
    def forward(ctx, h, weight, bias, padding):
        ctx.save_for_backward(h, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _depthwise_forward(h, weight, bias, padding, gelu=True)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_h, grad_w, grad_b = _depthwise_backward(h, weight, grad, ctx.padding, ctx.has_bias, needs, gelu=True)
        grad_b = None if grad_b is None else grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None


def gelu_dwconv(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding) -> torch.Tensor:
    """Depthwise ``conv2d(gelu(h), weight, bias, padding)`` of an NCHW (or channels-last) ``h``.

    Under autograd it stores ``h`` alone (see the module doc); with the compiled kernels, which apply
    GELU as they read ``h``, neither pass writes ``gelu(h)`` to memory. Either way it computes in the
    compute dtype (autocast's, else ``h``'s).
    """
    dtype = compute_dtype(h)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if needs_grad and route(h) is Route.FAST:
        # autocast would run the conv (and so GELU's output) in its dtype: cast h first, then all of
        # the function's ops run in that dtype whether autocast is on or not (any device, meta too)
        return _GeluDWConv.apply(h.to(dtype), weight, bias, tuple(padding))
    return F.conv2d(F.gelu(h), weight.to(h.dtype), None if bias is None else bias.to(h.dtype), padding=padding,
                    groups=weight.shape[0])


def strided_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a strided convolution, except where oneDNN's bfloat16 CPU kernel returns garbage:
    with a single output column (measured with PyTorch 2.14: NaN for stride 2, output width 1 and
    output height >= 5, in any memory layout; a single output row is fine) it runs in float32 and the
    result is cast back to bfloat16. Such maps come from narrow images (RMT's last downsampling of an
    image under ~32 px wide)."""
    if compute_dtype(x) != torch.bfloat16 or x.device.type != "cpu" or conv.stride == (1, 1):
        return conv(x)
    width = (x.shape[-1] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    if width != 1:
        return conv(x)
    with torch.autocast("cpu", enabled=False):
        bias = None if conv.bias is None else conv.bias.float()
        y = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y.to(torch.bfloat16)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)``: in CPU inference the compiled kernel (ATen's runs well below the memory speed in
    bfloat16; see :func:`rmt.models.fast.kernel.layer_norm_applies`), else the module."""
    if kernel.layer_norm_applies(x, norm):
        return kernel.layer_norm(x, norm)
    return norm(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T scale + bias) v`` of ``(B, H, L, D)`` views (``scaled_dot_product_attention``).

    A CPU pass that autograd will differentiate, in bfloat16 or float16 (the tensors' or autocast's),
    runs in float32 and returns the reduced dtype: the CPU flash kernel's reduced-precision backward
    is several times slower than its float32 one. Everything else is the plain call.
    """
    dtype = compute_dtype(q)
    if (q.device.type == "cpu" and dtype in _REDUCED and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad) and route(q) is Route.FAST):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=scale)
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
