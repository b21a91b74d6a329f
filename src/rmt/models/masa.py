"""Manhattan Self-Attention (MaSA), the attention of RMT.

The network talks to this module through two objects only:

* :class:`RelPos2d` -- one per stage. Holds the rotation angles and per-head decay rates (the
  official ``Relpos.angle`` / ``Relpos.decay`` buffers) and turns them into the tables a
  resolution needs (:class:`MaSATables`), kept in a small LRU cache.
* :class:`MaSA` -- ``(B, h, w, C) -> (B, h, w, C)`` given those tables; full or decomposed.

Both have plain-PyTorch forms beside their fast paths, taken where :func:`rmt.models.fast.route`
says :attr:`~rmt.models.fast.Route.PLAIN`: under TorchScript, FX symbolic tracing, ``torch.jit.trace``
and on meta tensors (timm's FX tracer keeps them as leaves instead, see :mod:`rmt.models.rmt`).
Exported for ONNX (opset 23, :func:`rmt.models.fast.onnx_operators`), MaSA is written as ONNX's own
``RotaryEmbedding`` and ``Attention`` operators. For fixed-size exports the tables of one size stand
in for :class:`RelPos2d` (:meth:`RelPos2d.frozen`).

Everything about how the attention is computed lives behind those two, so a faster kernel can
replace the internals without touching the network.

Speed notes (why the code looks the way it does):

* tokens stay channels-last ``(B, h, w, C)`` and every attention pass is a strided *view* of them:
  ``scaled_dot_product_attention`` reads the strides and writes its output in the token layout, so
  there are no permute/contiguous round trips;
* the decomposed passes batch rows as ``(B*h, heads, w, d)`` and columns as ``(B, w*heads, h, d)``,
  so both are 4-D calls (the fused CPU flash kernel needs 4-D inputs and a 4-D mask; anything else
  silently takes the slow math path);
* the decay biases and rotation tables depend only on the resolution, so they are built once
  per size and kept;
* on the CPU, passes over rows of at most 32 tokens run in a compiled kernel made for short rows
  (:mod:`rmt.models.fast.kernel`), faster than the flash kernel there (BENCHMARKS.md).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fast import Route, compute_dtype, route
from .fast.kernel import fused_rotation_applies, rotate, rotation_applies, short_attention, short_attention_applies
from .fast.ops import attention, depthwise_conv, fused_linear, gelu_dwconv, linear_chunks, scale_add

__all__ = ["MaSATables", "RelPos2d", "FrozenTables", "MaSA", "TokenConv"]


class MaSATables(NamedTuple):
    """Everything MaSA needs for one resolution.

    ``cos``/``sin``: ``(h, w, 1, d)`` rotation tables (``sin`` carries the pair signs).
    ``phase``: the same rotation as complex numbers ``cos + i sin``, ``(h, w, 1, d/2)``, for float32/64
    in eager mode (one complex multiply instead of three real passes); ``None`` otherwise.
    ``bias``: full MaSA -- ``(1, n, h*w, h*w)``; decomposed -- the width pass, ``(1, n, w, w)``.
    ``bias_h``: decomposed only -- the height pass, ``(1, w*n, h, h)`` (one copy per column, since
    columns and heads share the kernel's head dimension); ``None`` for full MaSA.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    bias_h: Optional[torch.Tensor]
    phase: Optional[torch.Tensor] = None


class RelPos2d(nn.Module):
    """Rotation angles and spatial decay of one stage, and the per-resolution tables built from them.

    ``angle``: ``1 / 10000 ** linspace(0, 1, d/2)``, each value repeated twice (interleaved).
    ``decay``: ``log(1 - 2 ** (-init_value - heads_range * t / n))`` for head ``t``.

    Both stay in float32 (float64 after ``.double()``) when the model is converted to float16 or
    bfloat16: positions up to ``h * w`` times these angles need float32 to land within a fraction
    of a radian. Tables are always computed in that precision and cast to the dtype attention runs
    in.

    Tables are kept in a small LRU cache (:attr:`cache_size` entries) keyed on the grid size, dtype,
    device and whether inference mode is on (inference-mode tensors cannot be used by autograd
    later). Changing the buffers in place (``load_state_dict``, an EMA update), replacing them or
    moving the module (``.to()``) empties it.
    """

    cache_size: int = 4
    """Tables kept per stage. A size change (detection batches, whole-image segmentation) costs a
    rebuild; a full-attention table at 800x1216 is hundreds of MiB, so the cache is kept small."""

    __jit_ignored_attributes__ = ("_cache", "_cache_source")  # TorchScript skips these (eager cache)

    constant_buffers = ("angle", "decay")
    """Buffers that training never changes and every process holds alike: data-parallel wrappers need not
    re-broadcast them (which, written in place, would empty the cache every step; rmt.training.run)."""

    def __init__(self, dim: int, num_heads: int, init_value: float, heads_range: float, decomposed: bool):
        super().__init__()
        key_dim = dim // num_heads
        dtype = _table_dtype(torch.get_default_dtype())
        base = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2, dtype=dtype))
        self.register_buffer("angle", base.repeat_interleave(2))
        heads = torch.arange(num_heads, dtype=dtype)
        self.register_buffer("decay", torch.log(1 - 2 ** (-init_value - heads_range * heads / num_heads)))
        self.num_heads = num_heads
        self.decomposed = decomposed
        self._cache: OrderedDict = OrderedDict()
        self._cache_source: Optional[tuple] = None

    def forward(self, h: int, w: int, x: torch.Tensor) -> MaSATables:
        """Tables for an ``h x w`` token grid, on ``x``'s device, in the dtype attention runs in."""
        if torch.jit.is_scripting():  # TorchScript builds them in the graph, in x's dtype (it has no autocast)
            return self._build(h, w, x.dtype)
        return self._tables(h, w, x)

    @torch.jit.unused
    def _tables(self, h: int, w: int, x: torch.Tensor) -> MaSATables:
        """:meth:`forward` in Python: built in the graph where one is recorded, else from the cache."""
        taken = route(x)
        if taken is Route.PLAIN:  # traces record them in x's dtype
            return self._build(h, w, x.dtype)
        if taken in (Route.GRAPH, Route.ONNX):  # compiled/exported graphs build them too, so exports take any size
            return self._build(h, w, compute_dtype(x))
        return self._cached(h, w, compute_dtype(x))

    @torch.no_grad()
    def frozen(self, h: int, w: int, x: torch.Tensor) -> FrozenTables:
        """A stand-in for this module holding the tables of an ``h x w`` grid for inputs like ``x``, as
        buffers (fixed-size exports: exporters write them as initializers, and the graph holds no size
        arithmetic). It accepts only that grid."""
        tables = self(h, w, x)
        return FrozenTables(MaSATables(tables.cos, tables.sin, tables.bias, tables.bias_h), (h, w))

    @torch.jit.unused
    def _cached(self, h: int, w: int, dtype: torch.dtype) -> MaSATables:
        angle, decay = self.angle, self.decay
        source = (angle, decay, _version(angle), _version(decay))
        if self._cache_source is None or self._cache_source[0] is not angle or self._cache_source[1] is not decay \
                or self._cache_source[2:] != source[2:]:
            self._cache.clear()  # the buffers were replaced or changed in place: every table is stale
            self._cache_source = source
        key = (h, w, dtype, angle.device, torch.is_inference_mode_enabled())
        tables = self._cache.get(key)
        if tables is not None:
            self._cache.move_to_end(key)
            return tables
        tables = self._build(h, w, dtype)
        if dtype in (torch.float32, torch.float64):
            tables = tables._replace(phase=torch.complex(tables.cos[..., ::2], tables.sin[..., 1::2]).contiguous())
        if self.cache_size > 0:
            self._cache[key] = tables
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return tables

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype in (torch.float16, torch.bfloat16) \
                    and new.dtype != old.dtype:
                # keep the tables' source precision (see the class doc); meta tensors have no values to keep
                self._buffers[name] = (new if old.is_meta else old).to(new.device, _table_dtype(old.dtype))
        self._cache.clear()  # new buffers: the tables built from the old ones are stale
        self._cache_source = None
        return self

    def __getstate__(self):
        return dict(self.__dict__, _cache=OrderedDict(), _cache_source=None)  # copies and pickles carry no tables

    def _build(self, h: int, w: int, dtype: torch.dtype) -> MaSATables:
        """The tables, computed in the buffers' precision (float32 or float64) and cast to ``dtype``."""
        work = _table_dtype(self.angle.dtype)
        angle, decay = self.angle.to(work), self.decay.to(work)
        # the same float ops as the reference, so the tables match it bit for bit
        position = torch.arange(h * w, device=angle.device).to(work)  # row-major token index
        phase = position[:, None] * angle[None, :]
        signs = torch.tensor([-1.0, 1.0], device=angle.device, dtype=work).repeat(angle.shape[0] // 2)
        cos = phase.cos().reshape(h, w, 1, -1)
        sin = (phase.sin() * signs).reshape(h, w, 1, -1)
        n = self.num_heads
        bias_h: Optional[torch.Tensor] = None
        if self.decomposed:
            bias = _distance_1d(w, decay)[None]
            bias_h = _distance_1d(h, decay).expand(w, n, h, h).reshape(1, w * n, h, h).to(dtype).contiguous()
        else:
            rows = torch.arange(h, device=decay.device).to(work).repeat_interleave(w)
            cols = torch.arange(w, device=decay.device).to(work).repeat(h)
            manhattan = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()
            bias = (manhattan * decay[:, None, None])[None]
        return MaSATables(cos.to(dtype).contiguous(), sin.to(dtype).contiguous(), bias.to(dtype).contiguous(), bias_h)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, decomposed={self.decomposed}"


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision tables are computed in: float64 if given, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


def _distance_1d(length: int, decay: torch.Tensor) -> torch.Tensor:
    """``|i - j| * decay[head]``, ``(heads, length, length)``."""
    index = torch.arange(length, device=decay.device).to(decay)
    return (index[:, None] - index[None, :]).abs() * decay[:, None, None]


class FrozenTables(nn.Module):
    """Stands in for a stage's :class:`RelPos2d` (see :meth:`RelPos2d.frozen`): the tables of one token
    grid, as buffers."""

    def __init__(self, tables: MaSATables, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.register_buffer("cos", tables.cos, persistent=False)
        self.register_buffer("sin", tables.sin, persistent=False)
        self.register_buffer("bias", tables.bias, persistent=False)
        self.register_buffer("bias_h", tables.bias_h, persistent=False)  # None for full MaSA

    def forward(self, h: int, w: int, x: torch.Tensor) -> MaSATables:
        if (h, w) != self.grid:
            raise ValueError(f"tables frozen for a {self.grid[0]}x{self.grid[1]} token grid, got {h}x{w}")
        return MaSATables(self.cos, self.sin, self.bias, self.bias_h)


class TokenConv(nn.Module):
    """Depthwise convolution over channels-last tokens ``(B, h, w, C)``.

    The tokens are viewed as an NCHW tensor in channels-last memory (no copy), convolved, and
    viewed back. With ``residual=True`` it returns ``x + conv(x)``, computed as one convolution
    whose centre tap is shifted by one: the same result with one memory pass less, both ways.
    """

    def __init__(self, dim: int, kernel_size: int, residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.residual = residual
        centre = None
        if residual:
            centre = torch.zeros(1, 1, kernel_size, kernel_size)
            centre[..., kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("centre", centre, persistent=False)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """``conv(x)`` (``x + conv(x)`` with ``residual``); ``gelu=True`` convolves ``gelu(x)`` instead."""
        if torch.jit.is_scripting() or route(x) is Route.PLAIN:  # TorchScript, FX graphs, traces, meta tensors
            return self._forward_plain(x, gelu)
        weight = self.conv.weight + self.centre if self.residual else self.conv.weight
        nchw = x.permute(0, 3, 1, 2)
        if gelu:
            y = gelu_dwconv(nchw, weight, self.conv.bias, self.conv.padding)
        else:
            y = depthwise_conv(nchw, weight, self.conv.bias, self.conv.padding)
        return y.permute(0, 2, 3, 1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the residual into the weights, in place (timm's ``reparameterize()``): ``x + conv(x)``
        becomes a plain convolution whose centre tap is shifted by one, so that a traced graph holds
        the weight as a constant instead of the sum ``weight + centre``."""
        if self.residual:
            self.conv.weight.add_(self.centre.to(self.conv.weight))
            self.residual = False
            self.centre = None

    def _forward_plain(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """:meth:`forward` in plain ops, for TorchScript and FX graphs."""
        weight = self.conv.weight
        centre = self.centre
        if self.residual and centre is not None:
            weight = weight + centre
        nchw = x.permute(0, 3, 1, 2)
        if gelu:
            nchw = F.gelu(nchw)
        y = F.conv2d(nchw, weight, self.conv.bias, padding=self.conv.padding, groups=self.conv.groups)
        return y.permute(0, 2, 3, 1)


def _rotate(x: torch.Tensor, tables: MaSATables) -> torch.Tensor:
    """Rotary shift of ``(B, h, w, n, d)``: pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    That is the complex product ``(x0 + i x1) * (cos + i sin)``: one pass over ``x`` in the compiled
    CPU kernel (bfloat16) or as a complex multiply (float32/64, see :class:`MaSATables`), else the
    same arithmetic in real numbers.
    """
    if rotation_applies(x, tables.cos):
        return rotate(x, tables.cos, tables.sin)
    if tables.phase is not None and x.dtype == tables.phase.real.dtype:
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * tables.phase).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * tables.cos, swapped, tables.sin)


def _rotate_plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`_rotate` in real arithmetic only: ``x cos + swap_pairs(x) sin`` over ``(B, h, w, n, d)``."""
    b, h, w, n, d = x.shape
    return x * cos + x.reshape(b, h, w, n, d // 2, 2).flip(-1).reshape(b, h, w, n, d) * sin


class MaSA(nn.Module):
    """Manhattan Self-Attention over channels-last tokens ``(B, h, w, C)``.

    Full: ``softmax(q' k'^T s + lambda * manhattan) v`` over all tokens. Decomposed: the same along
    each row, then along each column on the updated values. ``q'``/``k'`` are the rotated queries and
    keys, ``s = d ** -0.5``; LePE (a depthwise 5x5 conv of ``v``) is added before ``out_proj``.

    The query/key/value projections are one ``Linear(C, 3C)`` (``qkv``); official checkpoints'
    separate ``q_proj``/``k_proj``/``v_proj`` are concatenated when they are loaded.
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.decomposed = decomposed
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = TokenConv(dim, 5)
        self.out_proj = nn.Linear(dim, dim)
        self.reparameterized = False  # see reparameterize()

    def forward(self, x: torch.Tensor, tables: MaSATables, residual: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MaSA of ``x``; with ``residual``/``scale`` given, ``residual + scale * MaSA(x)`` (fused where it can be)."""
        if torch.jit.is_scripting():  # (a static branch: TorchScript compiles the plain form only)
            return self._forward_plain(x, tables, residual, scale)
        taken = route(x)
        if self.reparameterized:
            return self._forward_export(x, tables, residual, scale, taken is Route.ONNX)
        if taken is Route.PLAIN:  # FX graphs, traces, meta tensors
            return self._forward_plain(x, tables, residual, scale)
        if taken is Route.ONNX:
            return self._forward_onnx(x, tables, residual, scale)
        return self._forward_fast(x, tables, residual, scale)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Rewrite this layer, in place, into its export form (timm's ``reparameterize()``): the same
        function as a graph that inference runtimes fuse and quantize.

        * the rotation's pair swap is a fixed permutation of the query/key channels, so it is folded
          into the projection: ``qkv`` becomes ``Linear(C, 5C)`` giving ``q, swap(q), k, swap(k), v``,
          and the rotation is ``q * cos + swap(q) * sin`` (two multiplies and an add, no Slice/Concat);
        * the scale ``d ** -0.5`` is folded into the query weights;
        * each pass is one ``softmax(q k^T + decay) v`` with the decay as an additive mask
          (``scaled_dot_product_attention``, scale 1, which OpenVINO converts to its fused
          ``ScaledDotProductAttention``; traced for ONNX at opset 23, ONNX's ``Attention``).

        Called for every block by :meth:`rmt.models.rmt.RMT.reparameterize` (the exports use it on a copy
        of the model); the layer then computes only in that form (eager included, for checking it).
        """
        if self.reparameterized:
            return
        c = self.num_heads * self.key_dim
        weight, bias = self.qkv.weight.split(c), self.qkv.bias.split(c)
        swap = torch.arange(c, device=weight[0].device).view(-1, 2).flip(-1).reshape(-1)  # pairs (0 1) -> (1 0)
        wq, bq = weight[0] * self.scale, bias[0] * self.scale
        fused = nn.Linear(c, 5 * c, device=weight[0].device, dtype=weight[0].dtype)
        fused.weight.copy_(torch.cat([wq, wq[swap], weight[1], weight[1][swap], weight[2]]))
        fused.bias.copy_(torch.cat([bq, bq[swap], bias[1], bias[1][swap], bias[2]]))
        self.qkv = fused
        self.reparameterized = True

    @torch.jit.unused
    def _forward_export(self, x: torch.Tensor, tables: MaSATables, residual: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], onnx_operators: bool) -> torch.Tensor:
        """:meth:`forward` of the export form (see :meth:`reparameterize`); each pass ONNX's ``Attention``
        with ``onnx_operators``."""
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        q, q_swapped, k, k_swapped, v = F.linear(x, self.qkv.weight, self.qkv.bias).split(c, dim=-1)
        lepe = self.lepe(v)
        # the tables once per channel, (h, w, C): constants of a graph whose size is fixed
        cos = tables.cos.expand(h, w, n, d).reshape(h, w, c)
        sin = tables.sin.expand(h, w, n, d).reshape(h, w, c)
        q = q * cos + q_swapped * sin
        k = k * cos + k_swapped * sin
        if onnx_operators:  # ONNX's Attention takes (batch, len, C) with the heads side by side
            def attend(q_, k_, v_, bias):
                return torch.onnx.ops.attention(q_, k_, v_, bias, q_num_heads=n, kv_num_heads=n, scale=1.0)[0]

            if self.decomposed:
                assert tables.bias_h is not None
                rows = lambda t: t.reshape(b * h, w, c)  # noqa: E731
                v = attend(rows(q), rows(k), rows(v), tables.bias).reshape(b, h, w, c)
                cols = lambda t: t.transpose(1, 2).reshape(b * w, h, c)  # noqa: E731
                out = attend(cols(q), cols(k), cols(v), tables.bias_h[:, :n]).reshape(b, w, h, c).transpose(1, 2)
            else:
                out = attend(q.reshape(b, h * w, c), k.reshape(b, h * w, c), v.reshape(b, h * w, c),
                             tables.bias).reshape(b, h, w, c)
        elif self.decomposed:
            assert tables.bias_h is not None
            # along each row: (b*h, n, w, d)
            rows = [t.reshape(b * h, w, n, d).transpose(1, 2) for t in (q, k, v)]
            v = F.scaled_dot_product_attention(rows[0], rows[1], rows[2], attn_mask=tables.bias, scale=1.0)
            # along each column, on the row pass's output (b*h, n, w, d): (b*w, n, h, d)
            cols = [t.reshape(b, h, w, n, d).permute(0, 2, 3, 1, 4).reshape(b * w, n, h, d) for t in (q, k)]
            v = v.reshape(b, h, n, w, d).permute(0, 3, 2, 1, 4).reshape(b * w, n, h, d)
            out = F.scaled_dot_product_attention(cols[0], cols[1], v, attn_mask=tables.bias_h[:, :n], scale=1.0)
            out = out.reshape(b, w, n, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, w, c)
        else:
            tokens = [t.reshape(b, h * w, n, d).transpose(1, 2) for t in (q, k, v)]  # (b, n, hw, d)
            out = F.scaled_dot_product_attention(tokens[0], tokens[1], tokens[2], attn_mask=tables.bias, scale=1.0)
            out = out.transpose(1, 2).reshape(b, h, w, c)
        return scale_add(F.linear(out + lepe, self.out_proj.weight, self.out_proj.bias), scale, residual)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor, tables: MaSATables, residual: Optional[torch.Tensor] = None,
                      scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        q, k, v = linear_chunks(x, self.qkv, 3)
        if v.requires_grad:  # saved by LePE and attention: a copy of its own lets the q/k part be freed
            v = v.contiguous()
        lepe = self.lepe(v)
        q, k, v = (t.unflatten(-1, (n, d)) for t in (q, k, v))  # (b, h, w, n, d)
        if self.decomposed:
            out = self._decomposed(q, k, v, tables)
        else:
            q, k = _rotate(q, tables), _rotate(k, tables)
            tokens = lambda t: t.flatten(1, 2).transpose(1, 2)  # noqa: E731  (b, n, hw, d)
            out = attention(tokens(q), tokens(k), tokens(v), tables.bias,
                            self.scale).transpose(1, 2).contiguous().unflatten(1, (h, -1))
        # the kernel writes its (b, heads, len, d) output in (b, len, heads, d) memory, the token layout,
        # so `.contiguous()` copies nothing here; it is for tracers, whose kernel stand-ins report
        # another layout (and flatten/unflatten with -1 keep symbolic shapes provable for export)
        return fused_linear(out.flatten(-2) + lepe, self.out_proj, scale=scale, residual=residual)

    def _forward_plain(self, x: torch.Tensor, tables: MaSATables, residual: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` in plain PyTorch ops (real rotation, ``scaled_dot_product_attention``), for
        TorchScript and FX graphs; equal to the fast paths up to float rounding."""
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        lepe = self.lepe(v)
        q = _rotate_plain(q.reshape(b, h, w, n, d), tables.cos, tables.sin)
        k = _rotate_plain(k.reshape(b, h, w, n, d), tables.cos, tables.sin)
        v = v.reshape(b, h, w, n, d)
        if self.decomposed:
            bias_h = tables.bias_h
            assert bias_h is not None
            # along each row: (b*h, n, w, d)
            rows = [t.reshape(b * h, w, n, d).transpose(1, 2) for t in [q, k, v]]
            v = F.scaled_dot_product_attention(rows[0], rows[1], rows[2], attn_mask=tables.bias, scale=self.scale)
            v = v.transpose(1, 2).reshape(b, h, w, n, d)
            # along each column, on the row pass's output; columns and heads share a dimension: (b, w*n, h, d)
            cols = [t.permute(0, 2, 3, 1, 4).reshape(b, w * n, h, d) for t in [q, k, v]]
            out = F.scaled_dot_product_attention(cols[0], cols[1], cols[2], attn_mask=bias_h, scale=self.scale)
            out = out.reshape(b, w, n, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, w, c)
        else:
            tokens = [t.reshape(b, h * w, n, d).transpose(1, 2) for t in [q, k, v]]  # (b, n, hw, d)
            out = F.scaled_dot_product_attention(tokens[0], tokens[1], tokens[2], attn_mask=tables.bias,
                                                 scale=self.scale)
            out = out.transpose(1, 2).reshape(b, h, w, c)
        return scale_add(F.linear(out + lepe, self.out_proj.weight, self.out_proj.bias), scale, residual)

    @torch.jit.unused
    def _forward_onnx(self, x: torch.Tensor, tables: MaSATables, residual: Optional[torch.Tensor],
                      scale: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` as ONNX operators (opset 23, traced under :func:`rmt.models.fast.onnx_operators`):
        the rotation is ``RotaryEmbedding`` (interleaved pairs, position = token index) and each pass one
        ``Attention`` with the decay bias as its additive mask. Rows are ``(b*h, w, C)`` views of the
        tokens; columns take one transpose each way. ONNX Runtime runs this faster than the same
        arithmetic in plain ops, whose pair swap alone is dozens of strided slices (BENCHMARKS.md)."""
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).split(c, dim=-1)
        lepe = self.lepe(v)
        # the operator's caches hold each pair's angle once: cos, and sin without the pair signs
        cos = tables.cos.reshape(h * w, d)[:, ::2]
        sin = tables.sin.reshape(h * w, d)[:, 1::2]
        position = torch.arange(h * w, device=x.device)[None].expand(b, h * w)
        q, k = (torch.onnx.ops.rotary_embedding(t.reshape(b, h * w, c), cos, sin, position, interleaved=True,
                                                num_heads=n) for t in (q, k))

        def attend(q_, k_, v_, bias):  # (batch, len, C) each, the heads side by side in C
            return torch.onnx.ops.attention(q_, k_, v_, bias, q_num_heads=n, kv_num_heads=n, scale=self.scale)[0]

        if self.decomposed:
            assert tables.bias_h is not None
            rows = lambda t: t.reshape(b * h, w, c)  # noqa: E731
            v = attend(rows(q), rows(k), rows(v), tables.bias).reshape(b, h, w, c)
            cols = lambda t: t.reshape(b, h, w, c).transpose(1, 2).reshape(b * w, h, c)  # noqa: E731
            out = attend(cols(q), cols(k), cols(v), tables.bias_h[:, :n]).reshape(b, w, h, c).transpose(1, 2)
        else:
            out = attend(q, k, v.reshape(b, h * w, c), tables.bias).reshape(b, h, w, c)
        return scale_add(F.linear(out + lepe, self.out_proj.weight, self.out_proj.bias), scale, residual)

    def _decomposed(self, q, k, v, tables: MaSATables) -> torch.Tensor:
        """Row then column passes over unrotated ``(b, h, w, n, d)`` q/k: rotated by the compiled kernel
        as it reads them where it takes both passes, else by :func:`_rotate` first."""
        b, h, w, n, d = q.shape
        # along the width: one batch entry per (image, row) -> (b*h, n, w, d)
        rows = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731
        unrows = lambda o: o.transpose(1, 2).contiguous().unflatten(0, (b, -1))  # noqa: E731
        # along the height: columns and heads share the head dimension -> (b, w*n, h, d)
        cols = lambda t: t.flatten(2, 3).transpose(1, 2)  # noqa: E731
        uncols = lambda o: o.transpose(1, 2).contiguous().unflatten(2, (-1, n))  # noqa: E731
        cols_probe = q.movedim(1, 3)  # the column view's (len, d) without the copy `cols` may make
        if (short_attention_applies(rows(q), tables.bias) and short_attention_applies(cols_probe, tables.bias_h)
                and fused_rotation_applies(q, tables.cos)):
            cos, sin = tables.cos.reshape(h * w, d), tables.sin.reshape(h * w, d)
            # token position of row i of sequence (s, head): rows (s % h) * w + i; columns i * w + head // n
            v = short_attention(q, k, v, tables.bias, self.scale, rows, (cos, sin, (h, w, 1, 1, 0)))
            return short_attention(q, k, v, tables.bias_h[:, :n], self.scale, cols, (cos, sin, (1, 0, w, n, 1)))
        q, k = _rotate(q, tables), _rotate(k, tables)
        v = self._attend(q, k, v, tables.bias, rows, unrows)
        return self._attend(q, k, v, tables.bias_h, cols, uncols)

    def _attend(self, q, k, v, bias, view, unview) -> torch.Tensor:
        """One decomposed pass over ``(b, h, w, n, d)`` tokens: ``view`` gives the ``(batch, heads, len, d)``
        strided view of them, ``unview`` brings an attention output back to the token layout."""
        if short_attention_applies(view(q), bias):  # columns share their head's table: bias[:, :heads]
            return short_attention(q, k, v, bias[:, :self.num_heads], self.scale, view)
        return unview(attention(view(q), view(k), view(v), bias, self.scale))

    @torch.jit.unused
    def query_weights(self, x: torch.Tensor, tables: MaSATables, query: tuple[int, int]) -> torch.Tensor:
        """The attention weights ``(heads, h, w)`` (float64) of query token ``(row, col)`` over all tokens.

        ``x`` is this layer's input for one image, ``(1, h, w, C)``; ``tables`` the stage's tables for
        that grid. Full MaSA: one softmax over all tokens. Decomposed: the effective weight
        ``A_h[col](row, r') * A_w[r'](col, c')`` of the row-then-column passes (the value path they
        mix). For visualisation; each head sums to 1.
        """
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"expected the MaSA input of one image (1, h, w, C), got {tuple(x.shape)}")
        _, h, w, c = x.shape
        row, col = query
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"query token {query} lies outside the {h}x{w} grid")
        n, d = self.num_heads, self.key_dim
        with torch.no_grad():
            q, k, _ = F.linear(x, self.qkv.weight, self.qkv.bias).double().split(c, dim=-1)
        cos, sin = tables.cos.double(), tables.sin.double()
        q = _rotate_plain(q.reshape(1, h, w, n, d), cos, sin)[0]  # (h, w, n, d)
        k = _rotate_plain(k.reshape(1, h, w, n, d), cos, sin)[0]
        bias = tables.bias[0].double()
        if not self.decomposed:
            logits = torch.einsum("nd,hwnd->nhw", q[row, col], k).flatten(1) * self.scale
            return (logits + bias[:, row * w + col]).softmax(-1).unflatten(1, (h, w))
        # the row pass of every row r', read at the query's column: A_w[r'](col, c') -> (n, h, w)
        a_w = (torch.einsum("hnd,hwnd->nhw", q[:, col], k) * self.scale + bias[:, col][:, None, :]).softmax(-1)
        # the column pass of the query's column: A_h[col](row, r') -> (n, h)
        assert tables.bias_h is not None
        bias_h = tables.bias_h[0].double().unflatten(0, (w, n))[col]  # (n, h, h)
        a_h = (torch.einsum("nd,hnd->nh", q[row, col], k[:, col]) * self.scale + bias_h[:, row]).softmax(-1)
        return a_h[:, :, None] * a_w

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, decomposed={self.decomposed}"
