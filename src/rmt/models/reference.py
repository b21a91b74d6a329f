"""A straightforward RMT, written line by line from the specification.

This is the numerical oracle of the project and the baseline of ``rmt benchmark``: it is built the
way the official code is built (masks and rotation tables recomputed on every forward, separate
q/k/v projections, explicit ``matmul`` + ``softmax``, tokens permuted around every convolution) and
takes the official state-dict keys as they are. The fast model in :mod:`rmt.models.rmt` must agree
with it; nothing else in the package uses it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rmt import MODEL_ARGS


def _dwconv_tokens(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a convolution to channels-last tokens ``(B, h, w, C)``."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _DWConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dwconv_tokens(self.conv, x)


class RelPos(nn.Module):
    """Rotation angles and per-head decay rates of one stage (the ``Relpos`` buffers)."""

    def __init__(self, dim: int, num_heads: int, init_value: float, heads_range: float):
        super().__init__()
        key_dim = dim // num_heads
        base = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2))
        self.register_buffer("angle", base.repeat_interleave(2))
        heads = torch.arange(num_heads, dtype=torch.float)
        self.register_buffer("decay", torch.log(1 - 2 ** (-init_value - heads_range * heads / num_heads)))

    def forward(self, h: int, w: int, decomposed: bool):
        position = torch.arange(h * w).to(self.decay)
        phase = position[:, None] * self.angle[None, :]
        sin, cos = phase.sin().reshape(h, w, -1), phase.cos().reshape(h, w, -1)
        if decomposed:
            return (sin, cos), (self._distance_1d(h), self._distance_1d(w))
        rows = torch.arange(h).to(self.decay).repeat_interleave(w)
        cols = torch.arange(w).to(self.decay).repeat(h)
        manhattan = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()
        return (sin, cos), manhattan * self.decay[:, None, None]

    def _distance_1d(self, length: int) -> torch.Tensor:
        index = torch.arange(length).to(self.decay)
        return (index[:, None] - index[None, :]).abs() * self.decay[:, None, None]


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary shift: each interleaved pair (x0, x1) becomes (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


class ReferenceMaSA(nn.Module):
    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.decomposed = decomposed
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = _DWConv(dim, 5)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rel_pos) -> torch.Tensor:
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        (sin, cos), mask = rel_pos
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lepe = self.lepe(v)
        k = k * self.key_dim ** -0.5
        q = _rotate(q.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)  # b n h w d
        k = _rotate(k.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)
        v = v.view(b, h, w, n, d).permute(0, 3, 1, 2, 4)
        if self.decomposed:
            mask_h, mask_w = mask
            # along the width: rows are batch dims -> (b, h, n, w, d)
            qw, kw, vw = (t.transpose(1, 2) for t in (q, k, v))
            attn = torch.softmax(qw @ kw.transpose(-1, -2) + mask_w, dim=-1)
            v = (attn @ vw).transpose(1, 2)  # b n h w d
            # along the height on the updated v: columns are batch dims -> (b, w, n, h, d)
            qh, kh, vh = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))
            attn = torch.softmax(qh @ kh.transpose(-1, -2) + mask_h, dim=-1)
            out = (attn @ vh).permute(0, 3, 1, 2, 4)  # b h w n d
        else:
            qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))  # b n l d
            attn = torch.softmax(qf @ kf.transpose(-1, -2) + mask, dim=-1)
            out = (attn @ vf).transpose(1, 2)  # b l n d
        out = out.reshape(b, h, w, c) + lepe
        return self.out_proj(out)


class ReferenceFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden, 3)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        x = x + self.dwconv(x)
        return self.fc2(x)


class ReferenceBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden, decomposed, layer_scale: float | None):
        super().__init__()
        self.pos = _DWConv(dim, 3)
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = ReferenceMaSA(dim, num_heads, decomposed)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ReferenceFFN(dim, hidden)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale)))

    def forward(self, x, rel_pos):
        x = x + self.pos(x)
        y = self.retention(self.retention_layer_norm(x), rel_pos)
        x = x + (self.gamma_1 * y if self.layer_scale else y)
        y = self.ffn(self.final_layer_norm(x))
        return x + (self.gamma_2 * y if self.layer_scale else y)


class ReferenceDownsample(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        x = self.norm(self.reduction(x.permute(0, 3, 1, 2).contiguous()))
        return x.permute(0, 2, 3, 1)


class ReferenceStage(nn.Module):
    def __init__(self, dim, out_dim, depth, num_heads, init_value, heads_range, mlp_ratio, decomposed,
                 layer_scale: float | None):
        super().__init__()
        self.decomposed = decomposed
        self.Relpos = RelPos(dim, num_heads, init_value, heads_range)
        self.blocks = nn.ModuleList(
            ReferenceBlock(dim, num_heads, int(mlp_ratio * dim), decomposed, layer_scale) for _ in range(depth)
        )
        self.downsample = None if out_dim is None else ReferenceDownsample(dim, out_dim)

    def forward(self, x):
        rel_pos = self.Relpos(x.shape[1], x.shape[2], self.decomposed)
        for block in self.blocks:
            x = block(x, rel_pos)
        return x


class ReferenceRMT(nn.Module):
    """The reference network in eval semantics (no stochastic depth, no MixToken).

    ``forward`` returns the logits (with the token-labelling combination when ``token_label``);
    ``forward_stages`` returns each stage's output ``(B, h, w, C)`` before its downsample.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        init_values: Sequence[float],
        heads_ranges: Sequence[float],
        mlp_ratios: Sequence[float],
        decomposed: Sequence[bool],
        layer_scale: Sequence[bool] = (False, False, False, False),
        layer_init_values: float = 1e-6,
        projection: int = 1024,
        num_classes: int = 1000,
        token_label: bool = False,
        **_unused,
    ):
        super().__init__()
        c0 = embed_dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Sequential(
            nn.Conv2d(3, c0 // 2, 3, 2, 1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0 // 2, 3, 1, 1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, 2, 1), nn.BatchNorm2d(c0), nn.GELU(),
            nn.Conv2d(c0, c0, 3, 1, 1), nn.BatchNorm2d(c0),
        )
        n = len(depths)
        self.layers = nn.ModuleList(
            ReferenceStage(
                embed_dims[i], embed_dims[i + 1] if i < n - 1 else None, depths[i], num_heads[i],
                init_values[i], heads_ranges[i], mlp_ratios[i], decomposed[i],
                layer_init_values if layer_scale[i] else None,
            )
            for i in range(n)
        )
        self.proj = nn.Linear(embed_dims[-1], projection)
        self.norm = nn.BatchNorm2d(projection)
        self.head = nn.Linear(projection, num_classes)
        self.aux_head = nn.Linear(embed_dims[-1], num_classes) if token_label else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output as NCHW, like :meth:`rmt.models.RMT.forward_features`."""
        return self.forward_stages(x)[-1].permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_stages(x)[-1]
        y = self.norm(self.proj(tokens).permute(0, 3, 1, 2))
        logits = self.head((y * torch.sigmoid(y)).mean((2, 3)))
        if self.aux_head is not None:
            logits = logits + 0.5 * self.aux_head(tokens.flatten(1, 2)).amax(1)
        return logits


def reference_rmt(variant: str, num_classes: int = 1000, token_label: bool = False) -> ReferenceRMT:
    """Build the oracle of a registered variant (``"rmt_s"``)."""
    return ReferenceRMT(**MODEL_ARGS[variant], num_classes=num_classes, token_label=token_label)


__all__: Sequence[str] = ["ReferenceRMT", "reference_rmt"]
