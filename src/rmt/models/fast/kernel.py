"""Compiled CPU kernels, built on first use (``csrc/cpu_kernels.cpp``), float32 and bfloat16.

``short_attention``: softmax attention over many short sequences (length <= 64), the shape of
MaSA's decomposed passes at ImageNet resolutions (rows and columns of 56, 28 and 14 tokens). The CPU
flash kernel pays a fixed cost per sequence and fills a fraction of each vector register for such
rows, and its bfloat16 backward pass is several times slower than its float32 one. On CPUs with AVX-512 the
kernel puts 16 sequences that share a bias table into the 16 lanes of each vector (their rows
transposed as they are loaded), so that every score, exponential and product is a full-width
operation; bfloat16 ``q k^T`` runs on AVX512-BF16 dot products (``vdpbf16ps``), all sums are
float32, and MaSA's rotation of q and k is applied as they are loaded. Elsewhere a portable
per-sequence kernel (compiler-vectorised, bfloat16 widened as it is loaded) takes rows of up to 32
tokens in float32 and 64 in bfloat16, without the fused rotation. Its speed against
``scaled_dot_product_attention``: BENCHMARKS.md ("What makes it fast"). With autograd; the backward
pass recomputes the probabilities instead of storing them.

``rotate``: MaSA's rotation of bfloat16 q or k in one pass (float32 has its complex multiply), for
passes the attention kernel does not take. ``depthwise_forward``/``depthwise_backward``: the
depthwise convolutions of training (LePE's 5x5, the blocks' 3x3, the FFN's GELU + 3x3), GELU applied
as the input is read; the backward sweep gives the input, weight and bias gradients at once (oneDNN's
weight gradient is far slower than the convolution itself). ``layer_norm``: the blocks' layer norm in
inference (ATen's runs well below the memory speed in bfloat16).

They are compiled with ``torch.utils.cpp_extension`` the first time they are needed. That takes
about a minute, and the result is cached in ``~/.cache/torch_extensions`` (or
``$TORCH_EXTENSIONS_DIR``) for later runs, under a name that digests the flags, the CPU target
``-march=native`` resolves to and the torch installation (:func:`build_name`), so a cache shared by
different CPUs or environments keeps one build each.
It needs a C++ compiler and ninja. If the build fails,
MaSA logs one warning and keeps using the PyTorch kernels. ``RMT_CPU_KERNELS=0`` (or
:func:`use_cpu_kernels`) switches the kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import Route, route

__all__ = ["short_attention", "short_attention_applies", "fused_rotation_applies", "rotate", "rotation_applies",
           "depthwise_forward", "depthwise_backward", "depthwise_applies", "layer_norm", "layer_norm_applies",
           "use_cpu_kernels", "MAX_SHORT_LENGTH"]

_logger = logging.getLogger(__name__)
MAX_SHORT_LENGTH = 64  # compiled lengths
_DTYPES = (torch.float32, torch.bfloat16)
# The portable per-sequence kernel in float32: the flash kernel is as fast from 33 tokens on
_PORTABLE_FLOAT32_LENGTH = 32
_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
_enabled = os.environ.get("RMT_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_module = None
_failed = False


def use_cpu_kernels(enabled: bool) -> None:
    """Switch the compiled CPU kernels on or off (for comparisons; on by default)."""
    global _enabled
    _enabled = enabled


def native_target(compiler: Optional[str] = None) -> str:
    """What ``-march=native`` compiles for on this machine, as the compiler resolves it: the CPU model and
    every instruction-set switch (``-march=znver3 -mavx512f ... -mno-amx-tile ...``), from the command line
    that ``c++ -march=native -v`` hands to its compiler proper (gcc's cc1plus, clang's -cc1)."""
    compiler = compiler or os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension runs
    proc = subprocess.run([compiler, "-march=native", "-E", "-v", "-x", "c++", "-"], input="", capture_output=True,
                          text=True, timeout=120)
    proper = [line.split() for line in proc.stderr.splitlines() if "cc1" in line and "-march=native" not in line]
    if proc.returncode != 0 or not proper:
        raise RuntimeError(f"{compiler} -march=native: {proc.stderr.strip()[-200:] or 'no compiler command line'}")
    words, target = proper[-1], []
    for i, word in enumerate(words):
        if word.startswith("-m") or word in ("--param", "-target-cpu", "-target-feature"):
            target.append(word)
        elif i and words[i - 1] in ("--param", "-target-cpu", "-target-feature"):
            target.append(word)
    return " ".join(target)


def build_name(cflags, target: str, torch_install: str = "", source: str = "") -> str:
    """The name the kernels are built and cached under: a digest of the flags, the resolved CPU target,
    the torch installation compiled against (its version and folder) and the source file's path, so that
    a cache shared between machines (a home directory on NFS) never hands one CPU a binary built with
    instructions it lacks, and two environments or two checkouts never rebuild one binary in turn (ninja
    rebuilds when the compile command, which names the source, changes; one process overwriting the
    binary while another loads it crashes the other); two CPUs that resolve ``-march=native`` alike
    share one build."""
    digest = hashlib.sha256("\0".join([*cflags, target, torch_install, source]).encode()).hexdigest()[:16]
    return f"rmt_cpu_kernels_{digest}"


def _load():
    global _module, _failed
    if _module is None and not _failed:
        # importing cpp_extension on a CPU-only machine warns about CUDA_HOME, which is irrelevant here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load

            start = time.perf_counter()
            name = build_name(_CFLAGS, native_target(), f"{torch.__version__} {Path(torch.__file__).parent}",
                              str(_SOURCE.resolve()))
            _module = load(name=name, sources=[str(_SOURCE)],
                           extra_cflags=list(_CFLAGS), extra_ldflags=["-fopenmp"], verbose=False)
            seconds = time.perf_counter() - start
            if seconds > 2:  # it was compiled now, not loaded from the cache
                _logger.info("compiled the CPU kernels in %.0f s (cached for later runs)", seconds)
        except Exception as e:  # no compiler, no ninja, ...: the PyTorch kernels still work
            _failed = True
            lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            reason = next((line for line in lines if "error" in line.lower()), lines[0])
            _logger.warning("rmt: CPU short-attention kernel unavailable (%s); using scaled_dot_product_attention",
                            reason.strip())
    return _module


def short_attention_applies(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`short_attention` takes a pass whose ``(S, H, L, D)`` query view is ``q``: on,
    plain eager float32 or bfloat16 CPU tensors (not while compiling or tracing, whose graphs hold
    portable ops, nor while FLOPs are counted, which must see the attention as an ATen op), a bias
    of the same dtype, ``L <= 64`` (32 for the portable kernel in float32), ``D`` of 16, 32 or 64
    (the compiled cases), and the kernel built."""
    if not _enabled or _failed or q.device.type != "cpu" or q.dtype not in _DTYPES or bias.dtype != q.dtype:
        return False
    if route(q) is not Route.FAST:
        return False
    if q.shape[-2] > MAX_SHORT_LENGTH or q.shape[-1] not in (16, 32, 64) or bias.requires_grad:
        return False
    if _load() is None:
        return False
    lanes = _module.fused_rotation  # the lane-parallel kernels are built (AVX-512)
    return lanes or q.dtype != torch.float32 or q.shape[-2] <= _PORTABLE_FLOAT32_LENGTH


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                    view: Callable[[torch.Tensor], torch.Tensor], rotation: Optional[tuple] = None) -> torch.Tensor:
    """``softmax(q k^T scale + bias) v`` over the ``(S, H, L, D)`` views ``view(t)`` of same-shaped
    token tensors ``q``, ``k``, ``v`` (unit stride in ``D``; ``bias``: a constant, contiguous
    ``(1, Hb, L, L)``, head ``h`` adding table ``h % Hb``). Returns a new token tensor ``out`` with
    ``view(out)`` the result. Differentiable in ``q``, ``k`` and ``v``. Check
    :func:`short_attention_applies` first.

    ``rotation``: ``(cos, sin, steps)`` rotates ``q`` and ``k`` as the kernel reads them (MaSA's
    rotary shift without a pass of its own; check :func:`fused_rotation_applies`): ``cos``/``sin``
    are ``(P, D)`` tables and row ``i`` of sequence ``(s, h)`` takes table row ``(s % steps[0]) *
    steps[1] + i * steps[2] + (h // steps[3]) * steps[4]``."""
    return _ShortAttention.apply(q, k, v, bias, scale, view, rotation)


def fused_rotation_applies(q: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`short_attention` can rotate ``q`` (as it reads it) by tables like ``cos``: the
    lane-parallel kernels (AVX-512 builds) do, with tables of ``q``'s dtype that need no gradient."""
    return (_module is not None and getattr(_module, "fused_rotation", False) and cos.dtype == q.dtype
            and not cos.requires_grad)


def _rotation_args(rotation: Optional[tuple]) -> tuple:
    if rotation is None:
        return None, None, []
    cos, sin, steps = rotation
    return cos, sin, list(steps)


class _ShortAttention(torch.autograd.Function):
    """Saves the inputs only; the backward kernel recomputes the attention probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, view, rotation):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if not _module.forward(view(q), view(k), view(v), bias, scale, view(out), *_rotation_args(rotation)):
            raise RuntimeError(f"short_attention: no compiled kernel for {tuple(view(q).shape)}")
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale, ctx.view, ctx.rotation = scale, view, rotation
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias = ctx.saved_tensors
        view = ctx.view
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        if not _module.backward(view(q), view(k), view(v), bias, ctx.scale, view(grad), *map(view, grads),
                                *_rotation_args(ctx.rotation)):
            raise RuntimeError(f"short_attention: no compiled kernel for {tuple(view(q).shape)}")
        return grads[0], grads[1], grads[2], None, None, None, None


def rotation_applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`rotate` takes ``x`` ``(B, h, w, n, d)`` with tables ``cos`` ``(h, w, 1, d)``: on,
    plain eager bfloat16 CPU tensors (float32 has a one-pass complex multiply of its own), unit
    stride in ``d``, tables of ``x``'s dtype that need no gradient, and the kernel built."""
    if not _enabled or _failed or x.device.type != "cpu" or x.dtype != torch.bfloat16 or cos.dtype != x.dtype:
        return False
    if route(x) is not Route.FAST or x.dim() != 5 or x.stride(-1) != 1 or cos.requires_grad:
        return False
    return _load() is not None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + swap(x) * sin`` in one pass (``swap`` exchanges the members of each channel pair):
    MaSA's rotation of ``(B, h, w, n, d)`` queries or keys by ``(h, w, 1, d)`` tables. Returns a
    contiguous tensor; differentiable in ``x``. Check :func:`rotation_applies` first."""
    return _Rotate.apply(x, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))


def _rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    tokens = x.flatten(1, 2)  # (B, h*w, n, d): a view for the q/k slices of the fused projection
    out = torch.empty(tokens.shape, dtype=x.dtype, device=x.device)
    _module.rotate(tokens, cos, sin, sign, out)
    return out.view(x.shape)


class _Rotate(torch.autograd.Function):
    """The backward pass rotates the gradient back (the transposed rotation: ``sin`` negated)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_by(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _rotate_by(grad, cos, sin, -1.0), None, None


def depthwise_applies(x: torch.Tensor, weight: torch.Tensor, padding, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the compiled depthwise kernels (:func:`depthwise_forward`, :func:`depthwise_backward`)
    take the conv of NCHW ``x``
    (computed in ``dtype``, by default ``x``'s) by ``weight`` ``(C, 1, K, K)``: on, plain eager
    float32/bfloat16 CPU tensors, channels-last ``x`` (unit stride in ``C``), ``C`` a multiple of 16,
    ``K`` of 3, 5 or 7 with ``padding`` ``K // 2`` (stride 1), and the kernel built."""
    dtype = x.dtype if dtype is None else dtype
    if not _enabled or _failed or x.device.type != "cpu" or dtype not in _DTYPES or x.dim() != 4:
        return False
    k = weight.shape[-1]
    if weight.shape != (x.shape[1], 1, k, k) or k not in (3, 5, 7) or tuple(padding) != (k // 2, k // 2):
        return False
    if x.stride(1) != 1 or x.shape[1] % 16 or route(x) is not Route.FAST:
        return False
    return _load() is not None


def depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False
                      ) -> torch.Tensor:
    """The depthwise stride-1 ``conv2d(act(x), weight, bias, padding=K // 2)`` (``act`` GELU with
    ``gelu``) of NCHW channels-last ``x``, in ``x``'s dtype with float32 sums; the activation is
    computed once per input and never stored. Check :func:`depthwise_applies` first."""
    return _module.depthwise_forward(x, weight, bias, gelu)


def depthwise_backward(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, gelu: bool = False) -> tuple:
    """Gradients of :func:`depthwise_forward` in one sweep over ``x`` and ``grad``: for ``x`` (GELU's
    derivative included; ``x``'s dtype), and for the weight ``(C, 1, K, K)`` and bias ``(C,)`` in
    float32. Check :func:`depthwise_applies` first."""
    grad = grad.to(dtype=x.dtype, memory_format=torch.channels_last)  # one copy at most, none if already so
    grad_x, sums = _module.depthwise_backward(x, grad, weight, gelu)
    k = weight.shape[-1]
    return grad_x, sums[:, :-1].reshape(-1, 1, k, k), sums[:, -1]


def layer_norm_applies(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether :func:`layer_norm` takes ``norm(x)``: on, inference (no gradient), plain eager contiguous
    float32/bfloat16 CPU ``x``, a norm over its last dimension, a multiple of 16, with float32 weight
    and bias, and the kernel built."""
    if not _enabled or _failed or x.device.type != "cpu" or x.dtype not in _DTYPES or not x.is_contiguous():
        return False
    weight, bias = norm.weight, norm.bias
    if tuple(norm.normalized_shape) != (x.shape[-1],) or x.shape[-1] % 16 or weight is None or bias is None:
        return False
    if weight.dtype != torch.float32 or bias.dtype != torch.float32 or route(x) is not Route.FAST:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return False
    return _load() is not None


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` in ``x``'s dtype with float32 statistics, for inference. Check :func:`layer_norm_applies`."""
    return _module.layer_norm(x, norm.weight.detach(), norm.bias.detach(), norm.eps)
