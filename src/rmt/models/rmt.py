"""RMT: Retentive Networks Meet Vision Transformers (Fan et al., CVPR 2024).

The network, its variants and their timm registration. The attention (MaSA) lives in
:mod:`rmt.models.masa`; this file only wires it into blocks and stages:

    image -> stem (4 convs, stride 4) -> 4 stages of blocks (downsample between them)
          -> proj + BN + swish -> average pool -> head

Tokens travel channels-last ``(B, h, w, C)`` through the whole network; stage outputs and
``forward_features`` are handed out as NCHW views of them (channels-last memory, no copy).

Module names follow the official code, so official state dicts map onto this model with two
changes, made by :func:`checkpoint_filter_fn`: ``q_proj``/``k_proj``/``v_proj`` are fused into
``qkv`` and ``Relpos`` is spelt ``relpos``.
"""
# No postponed annotations here: FX copies the signature of RMT.forward into the graph's code, which
# TorchScript then compiles, and it cannot resolve annotations left as strings.
import contextlib
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models import load_pretrained as timm_load_pretrained
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fast import Route, route
from .fast.ops import fused_linear, layer_norm, scale_add, strided_conv
from .masa import MaSA, MaSATables, RelPos2d, TokenConv
from .weights import (
    CheckpointError,
    CheckpointMismatchError,
    infer_arch,
    read_state_dict,
    remap_official_keys,
    unwrap_state_dict,
)

__all__ = ["RMT", "MODEL_ARGS", "checkpoint_filter_fn", "guess_variant"]

_logger = logging.getLogger(__name__)


class FFN(nn.Module):
    """``fc1 -> GELU -> h + DWConv3x3(h) -> fc2`` over channels-last tokens.

    With ``residual``/``scale`` given, returns ``residual + scale * FFN(x)`` (fused where it can be).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = TokenConv(hidden, 3, residual=True)
        self.fc2 = nn.Linear(hidden, dim)
        self.reparameterized = False  # see reparameterize()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Rewrite this layer, in place, into its export form (timm's ``reparameterize()``): the same function
        computed in NCHW, ``fc1`` and ``fc2`` as 1x1 convolutions around the depthwise one (its residual folded,
        :meth:`TokenConv.reparameterize`). Inference runtimes then change the layout of the C-channel input and
        output only, not of the ``mlp_ratio`` times wider hidden tensor twice: OpenVINO int8 runs rmt_s 27%
        faster, ONNX Runtime float32 15% (BENCHMARKS.md). The layer then computes only in that form."""
        if self.reparameterized:
            return
        self.dwconv.reparameterize()
        for name in ("fc1", "fc2"):
            linear = getattr(self, name)
            conv = nn.Conv2d(linear.in_features, linear.out_features, 1, device=linear.weight.device,
                             dtype=linear.weight.dtype)
            conv.weight.copy_(linear.weight[:, :, None, None])
            conv.bias.copy_(linear.bias)
            setattr(self, name, conv)
        self.reparameterized = True

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.reparameterized:
            hidden = F.gelu(self.fc1(x.permute(0, 3, 1, 2)))
            return scale_add(self.fc2(self.dwconv.conv(hidden)).permute(0, 2, 3, 1), scale, residual)
        if torch.jit.is_scripting() or route(x) is Route.PLAIN:  # TorchScript, FX graphs, traces, meta tensors
            hidden = self.dwconv(F.linear(x, self.fc1.weight, self.fc1.bias), gelu=True)
            return scale_add(F.linear(hidden, self.fc2.weight, self.fc2.bias), scale, residual)
        if torch.is_grad_enabled():  # GELU goes with the conv, which then stores only its input
            hidden = self.dwconv(fused_linear(x, self.fc1), gelu=True)
        else:  # inference: GELU rides on fc1's matmul
            hidden = self.dwconv(fused_linear(x, self.fc1, gelu=True))
        return fused_linear(hidden, self.fc2, scale=scale, residual=residual)




class RMTBlock(nn.Module):
    """``x + DWConv(x)``, then pre-norm MaSA and FFN residuals (optionally layer-scaled)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        decomposed: bool,
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = None,
    ):
        super().__init__()
        self.pos = TokenConv(dim, 3, residual=True)
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = MaSA(dim, num_heads, decomposed)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FFN(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, tables: MaSATables) -> torch.Tensor:
        x = self.pos(x)
        if self.training and not isinstance(self.drop_path, nn.Identity):  # stochastic depth: unfused
            y = self.retention(self.retention_layer_norm(x), tables)
            x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
            y = self.ffn(self.final_layer_norm(x))
            return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        # residual adds and layer scale ride on the output projections (see rmt.models.fast.ops)
        if torch.jit.is_scripting() or route(x) is Route.PLAIN:  # TorchScript, FX graphs, traces, meta tensors
            x = self.retention(self.retention_layer_norm(x), tables, residual=x, scale=self.gamma_1)
            return self.ffn(self.final_layer_norm(x), residual=x, scale=self.gamma_2)
        x = self.retention(layer_norm(x, self.retention_layer_norm), tables, residual=x, scale=self.gamma_1)
        return self.ffn(layer_norm(x, self.final_layer_norm), residual=x, scale=self.gamma_2)


# FX: timm's tracer (``create_feature_extractor`` with timm's leaf list, ``features_only`` with
# ``feature_cls='fx'``) calls these as leaves, so the graph runs their fast paths (the blocks' layer
# norms included) and the table cache; traced without that list they record their plain ops.
register_notrace_module(RelPos2d)
register_notrace_module(MaSA)
register_notrace_module(FFN)
register_notrace_module(RMTBlock)


class Downsample(nn.Module):
    """Conv3x3 stride 2 + BatchNorm, channels-last tokens in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or route(x) is Route.PLAIN:  # TorchScript, FX graphs, traces, meta tensors
            return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return self._forward_checked(x)

    @torch.jit.unused
    def _forward_checked(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`, stepping around oneDNN's bfloat16 bug on one-column outputs (:func:`strided_conv`)."""
        return self.norm(strided_conv(self.reduction, x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class RMTStage(nn.Module):
    """The blocks of one stage, sharing one set of MaSA tables, and the downsample to the next stage.

    ``forward`` takes tokens ``(B, h, w, C)`` and returns the stage output as an NCHW view (the
    feature map that dense prediction takes) and the tokens for the next stage (the output
    downsampled; the output itself where there is no downsample). The NCHW view is the stage's
    last operation, so FX feature extraction finds the stage output under the stage's name.
    """

    def __init__(
        self,
        dim: int,
        out_dim: Optional[int],
        depth: int,
        num_heads: int,
        init_value: float,
        heads_range: float,
        mlp_ratio: float,
        decomposed: bool,
        drop_path: Sequence[float],
        layer_scale_init: Optional[float],
    ):
        super().__init__()
        self.relpos = RelPos2d(dim, num_heads, init_value, heads_range, decomposed)
        self.blocks = nn.ModuleList(
            RMTBlock(dim, num_heads, mlp_ratio, decomposed, drop_path[i], layer_scale_init) for i in range(depth)
        )
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tables = self.relpos(x.shape[1], x.shape[2], x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, tables, use_reentrant=False)
            else:
                x = block(x, tables)
        tokens = x if self.downsample is None else self.downsample(x)
        return x.permute(0, 3, 1, 2), tokens


class PatchEmbed(nn.Module):
    """The stem: four 3x3 convs (two of stride 2) with BN and GELU; NCHW image -> (B, h, w, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x).permute(0, 2, 3, 1)


def _cutmix_box(grid_h: int, grid_w: int) -> Tuple[int, int, int, int]:
    """A CutMix box on a ``grid_h x grid_w`` grid, area ratio ~ 1 - U(0, 1) (Beta(1, 1)).

    Returns ``(row0, col0, row1, col1)``, end-exclusive. Draws from torch's global generator.
    """
    cut = math.sqrt(1.0 - float(torch.rand(())))
    cut_h, cut_w = int(grid_h * cut), int(grid_w * cut)
    cy, cx = int(torch.randint(grid_h, ())), int(torch.randint(grid_w, ()))
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return (clip(cy - cut_h // 2, grid_h), clip(cx - cut_w // 2, grid_w),
            clip(cy + cut_h // 2, grid_h), clip(cx + cut_w // 2, grid_w))


class RMT(nn.Module):
    """RMT image classifier / backbone.

    Args:
        embed_dims, depths, num_heads, init_values, heads_ranges, mlp_ratios: per stage.
        decomposed: per stage, decomposed (row then column) MaSA instead of full MaSA.
        layer_scale: per stage, learnable per-channel residual scales ``gamma_1``/``gamma_2``.
        layer_init_values: initial value of those scales.
        projection: width of the per-token projection before pooling.
        num_classes: classifier outputs; 0 for a feature extractor without head.
        in_chans: image channels.
        drop_path_rate: stochastic depth, increasing linearly over all blocks to this value.
        token_label: the token-labelling model (``aux_head`` on every final token; in train mode
            MixToken and ``(logits, aux_logits, box)`` outputs; in eval mode
            ``logits + 0.5 * max_tokens(aux_logits)``).
        global_pool: ``"avg"`` (the classifier's input is the projected tokens' mean) or ``""``
            (no pooling: :meth:`forward_head` returns per-position outputs, see there).
        device, dtype: where and in which dtype to create the parameters (timm's factory arguments).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        init_values: Sequence[float] = (2, 2, 2, 2),
        heads_ranges: Sequence[float] = (4, 4, 6, 6),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        decomposed: Sequence[bool] = (True, True, False, False),
        layer_scale: Sequence[bool] = (False, False, False, False),
        layer_init_values: float = 1e-6,
        projection: int = 1024,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        token_label: bool = False,
        global_pool: str = "avg",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        for name, seq in dict(embed_dims=embed_dims, num_heads=num_heads, init_values=init_values,
                              heads_ranges=heads_ranges, mlp_ratios=mlp_ratios, decomposed=decomposed,
                              layer_scale=layer_scale).items():
            if len(seq) != num_stages:
                raise ValueError(f"{name} has {len(seq)} entries, depths has {num_stages}")
        self._check_pool(global_pool)
        self.arch_args = dict(
            embed_dims=tuple(embed_dims), depths=tuple(depths), num_heads=tuple(num_heads),
            init_values=tuple(init_values), heads_ranges=tuple(heads_ranges), mlp_ratios=tuple(mlp_ratios),
            decomposed=tuple(decomposed), layer_scale=tuple(layer_scale), layer_init_values=layer_init_values,
            projection=projection,
        )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.token_label = token_label
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection
        self.grad_checkpointing = False
        # timm's factory passes device (e.g. 'meta' for a structure check) and dtype: build in place
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
            dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
            self.layers = nn.ModuleList()
            self.feature_info = []
            for i in range(num_stages):
                first = sum(depths[:i])
                self.layers.append(RMTStage(
                    dim=embed_dims[i],
                    out_dim=embed_dims[i + 1] if i < num_stages - 1 else None,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    init_value=init_values[i],
                    heads_range=heads_ranges[i],
                    mlp_ratio=mlp_ratios[i],
                    decomposed=decomposed[i],
                    drop_path=dpr[first:first + depths[i]],
                    layer_scale_init=layer_init_values if layer_scale[i] else None,
                ))
                self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"layers.{i}"))
            self.proj = nn.Linear(embed_dims[-1], projection)
            self.norm = nn.BatchNorm2d(projection)
            self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
            self.aux_head = nn.Linear(embed_dims[-1], num_classes) if token_label and num_classes > 0 else None
            self.apply(self._init_weights)
        if dtype is not None:
            self.to(dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"RMT pools with 'avg' or not at all (''), got global_pool={global_pool!r}")

    # ----------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names to exclude from weight decay beyond timm's rule (1-D tensors and biases).

        None: the decay/rotation tables are buffers, not parameters, and the reference decays the
        layer-scale ``gamma`` tensors like other weights.
        """
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (none for 0); ``global_pool`` ``"avg"`` or ``""``, kept if None.

        The new layers take the model's device, dtype and train/eval mode.
        """
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = next(self.parameters())
        factory = {"device": like.device, "dtype": like.dtype}
        self.head = nn.Linear(self.head_hidden_size, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.aux_head = None
        if self.token_label and num_classes > 0:
            self.aux_head = nn.Linear(self.num_features, num_classes, **factory)
        for m in (self.head, self.aux_head):
            if m is not None:
                self._init_weights(m)
                m.train(self.training)

    # ----------------------------------------------------------------------------- forward
    def _forward_stages(self, tokens: torch.Tensor, last: int, take: Sequence[int] = ()):
        """Run stages ``0..last`` on stem tokens; return the last one's output and those of the stages in
        ``take`` (NCHW views, taken before each stage's downsample)."""
        features, taken = tokens, []
        for i, stage in enumerate(self.layers[: last + 1]):
            features, tokens = stage(tokens)
            if i in take:
                taken.append(features)
        return features, taken

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs before downsampling (strides 4, 8, 16, 32).

        Args:
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: accepted for timm compatibility; RMT has no final feature norm.
            stop_early: stop after the last requested stage.
            output_fmt: ``"NCHW"`` (views in channels-last memory) or ``"NHWC"``.
            intermediates_only: return only the list of stage outputs.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = max_index if stop_early or intermediates_only else len(self.layers) - 1
        features, intermediates = self._forward_stages(self.patch_embed(x), last, take_indices)
        if output_fmt == "NHWC":
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        if intermediates_only:
            return intermediates
        return features, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None
        if prune_head or max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.token_label = False
            self.proj = self.norm = None
            self.head, self.aux_head, self.num_classes = nn.Identity(), None, 0
            self.global_pool = ""  # as timm's models: a pruned model's forward returns its last feature map
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, in_chans, H, W)`` -> last stage ``(B, C3, H/32, W/32)`` (NCHW view)."""
        tokens = self.patch_embed(x)
        features = tokens
        for stage in self.layers:
            features, tokens = stage(tokens)
        return features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-stage features ``(B, C3, h, w)`` -> logits ``(B, num_classes)``.

        The head projects every token (``proj`` + BN + swish, ``head_hidden_size`` channels), averages
        them and classifies; ``pre_logits=True`` returns the averaged projection ``(B, head_hidden_size)``.
        With ``token_label`` the logits are ``head + 0.5 * max over tokens of aux_head``, the
        reference's evaluation output.

        With ``global_pool=""`` nothing is pooled: ``pre_logits=True`` (or ``num_classes=0``) gives the
        projected map ``(B, head_hidden_size, h, w)``, otherwise per-position logits ``(B, num_classes, h, w)``
        (``head + 0.5 * aux_head`` at each position with ``token_label``). A pruned model (no projection)
        passes ``x`` through.
        """
        tokens = x.permute(0, 2, 3, 1)
        features = x
        if self.proj is not None and self.norm is not None:
            features = F.silu(self.norm(self.proj(tokens).permute(0, 3, 1, 2)))
        if self.global_pool == "avg":
            pooled = features.mean((2, 3))
            if pre_logits:
                return pooled
            logits = self.head(pooled)
            if self.aux_head is not None:
                logits = logits + 0.5 * self.aux_head(tokens).flatten(1, 2).amax(1)
            return logits
        if pre_logits:
            return features
        logits = self.head(features.permute(0, 2, 3, 1))
        if self.aux_head is not None:
            logits = logits + 0.5 * self.aux_head(tokens)
        return logits.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_scripting() and self.aux_head is not None and self.training:
            return self.forward_token_label(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_token_label(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int, int]]:
        """Token-labelling training forward with MixToken.

        A CutMix box is drawn on the final token grid; the stem tokens inside it (scaled by 8) are
        taken from the batch flipped along dim 0, and the aux logits inside it are flipped back so
        that each image's aux logits line up with its own token labels.

        Returns ``(logits (B, K), aux_logits (B, h*w, K), box)``, box = ``(row0, col0, row1, col1)``
        on the final grid, end-exclusive.
        """
        if self.global_pool != "avg":
            raise ValueError("token-labelling training needs global_pool='avg'")
        tokens = self.patch_embed(x)
        grid_h, grid_w = -(-tokens.shape[1] // 8), -(-tokens.shape[2] // 8)  # three stride-2 convs
        box = _cutmix_box(grid_h, grid_w)
        r0, c0, r1, c1 = box
        tokens = tokens.clone()
        tokens[:, 8 * r0:8 * r1, 8 * c0:8 * c1] = tokens.flip(0)[:, 8 * r0:8 * r1, 8 * c0:8 * c1]
        features, _ = self._forward_stages(tokens, len(self.layers) - 1)
        logits = self.head(self.forward_head(features, pre_logits=True))
        aux = self.aux_head(features.permute(0, 2, 3, 1))  # (B, h, w, K)
        aux = aux.clone()
        aux[:, r0:r1, c0:c1] = aux.flip(0)[:, r0:r1, c0:c1]
        return logits, aux.flatten(1, 2), box

    # ----------------------------------------------------------------------------- export
    @torch.no_grad()
    def reparameterize(self) -> None:
        """Rewrite every block, in place, into its export form (as timm's ``reparameterize_model``): the
        residual depthwise convolutions become plain ones (:meth:`TokenConv.reparameterize`), each MaSA
        folds its rotation's pair swap and its scale into the projection (:meth:`MaSA.reparameterize`) and
        each FFN computes in NCHW with 1x1 convolutions (:meth:`FFN.reparameterize`).
        The same function; traced, every weight is a constant of the graph (what ONNX Runtime's quantizer
        and TensorRT need) and each attention pass the pattern that runtimes fuse."""
        for module in self.modules():
            if isinstance(module, (TokenConv, MaSA, FFN)):
                module.reparameterize()

    @torch.no_grad()
    def freeze_tables(self, example: torch.Tensor) -> None:
        """Fix every stage's MaSA tables, in place, to those of ``example``'s height and width (in its
        dtype): buffers (:meth:`RelPos2d.frozen`), which exporters write as initializers, so that a
        fixed-size graph holds no size arithmetic and no control flow. The model then takes inputs of
        that size only."""
        tokens = self.patch_embed(example[:1])  # the stem and the downsampling convs give each stage's grid
        for i, stage in enumerate(self.layers):
            if i > 0:
                tokens = self.layers[i - 1].downsample(tokens)
            if isinstance(stage.relpos, RelPos2d):
                stage.relpos = stage.relpos.frozen(tokens.shape[1], tokens.shape[2], example)

    # ----------------------------------------------------------------------------- weights
    @torch.jit.ignore
    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load`` hook: load an official or rmt checkpoint file into this model.

        Called by ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
        Reads the file safely (:func:`rmt.models.weights.read_state_dict`), then lets timm adapt the
        classifier and input channels and :func:`checkpoint_filter_fn` map and check the keys.
        """
        state_dict = read_state_dict(path)
        cfg = dict(self.pretrained_cfg, state_dict=state_dict, custom_load=False, file=None)
        timm_load_pretrained(self, pretrained_cfg=cfg, num_classes=self.num_classes, in_chans=self.in_chans,
                             filter_fn=checkpoint_filter_fn, strict=True)


# --------------------------------------------------------------------------------- checkpoints
def _describe(arch: Dict[str, Any]) -> str:
    return f"embed_dims {arch['embed_dims']}, depths {arch['depths']}"


def guess_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The registered variant whose widths and depths match a state dict (official or ours), if any."""
    arch = infer_arch(state_dict)
    if arch is None:
        return None
    for name, args in MODEL_ARGS.items():
        if (args["embed_dims"], args["depths"]) == (arch["embed_dims"], arch["depths"]):
            return name + ("_tl" if arch["token_label"] else "")
    return None


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RMT) -> Dict[str, torch.Tensor]:
    """Map an official (or rmt) state dict onto ``model`` and check that it fits.

    Accepts the raw ``torch.load`` result of an official checkpoint too (weights under ``model``,
    ``state_dict`` or ``model_ema``; optional ``module.`` prefix). Raises
    :class:`CheckpointMismatchError` naming the variant the weights belong to and the first
    mismatched keys when they were trained for another architecture.
    """
    state_dict = remap_official_keys(unwrap_state_dict(state_dict))
    expected = model.state_dict()
    if model.aux_head is None and "aux_head.weight" in state_dict:
        _logger.warning("Dropping the checkpoint's token-labelling aux_head: the model was built without "
                        "token_label=True, so its outputs differ from the reference token-labelling evaluation.")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}
    # another class count or input channel count is timm's to adapt after this filter, not a mismatch
    adapted = ("head.", "aux_head.", "patch_embed.proj.0.weight")
    missing = [k for k in expected if k not in state_dict and not k.startswith(adapted)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and not k.startswith(adapted)
                   and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    wrong_value = [k for k in expected if k.endswith((".relpos.angle", ".relpos.decay")) and k in state_dict
                   and k not in wrong_shape
                   and not torch.allclose(state_dict[k].float(), expected[k].float(), rtol=1e-5, atol=1e-6)]
    if missing or unexpected or wrong_shape or wrong_value:
        raise CheckpointMismatchError(_mismatch_message(state_dict, model, missing, unexpected, wrong_shape,
                                                        wrong_value))
    return state_dict


def _mismatch_message(state_dict, model, missing, unexpected, wrong_shape, wrong_value) -> str:
    ckpt_arch, model_arch = infer_arch(state_dict), model.arch_args
    guess = guess_variant(state_dict)
    if guess is not None:
        source = f"an {guess} checkpoint"
    elif ckpt_arch is not None:
        source = f"a checkpoint of another RMT ({_describe(ckpt_arch)})"
    else:
        source = "not an RMT checkpoint"
    variant = getattr(model, "pretrained_cfg", {}).get("architecture") or "this model"
    parts = [f"weights do not fit {variant} ({_describe(model_arch)}): this is {source}"]
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(f"{len(wrong_shape)} keys with other shapes, first {k}: checkpoint "
                     f"{tuple(state_dict[k].shape)} vs model {tuple(model.state_dict()[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} keys missing, first: {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, first: {', '.join(unexpected[:3])}")
    if wrong_value:
        parts.append(f"decay/rotation tables differ (other init_values/heads_ranges), first: {wrong_value[0]}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------- variants
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "rmt_t": dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), init_values=(2, 2, 2, 2),
        heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), decomposed=(True, True, False, False),
        drop_path_rate=0.1,
    ),
    "rmt_s": dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16), init_values=(2, 2, 2, 2),
        heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
        drop_path_rate=0.15,
    ),
    "rmt_b": dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16), init_values=(2, 2, 2, 2),
        heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
        layer_scale=(False, False, True, True), layer_init_values=1e-6, drop_path_rate=0.4,
    ),
    "rmt_l": dict(
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20), init_values=(2, 2, 2, 2),
        heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
        layer_scale=(False, False, True, True), layer_init_values=1e-6, drop_path_rate=0.5,
    ),
}
"""Architecture of each variant, as the official model functions define it (drop_path_rate is the
training recipe's stochastic depth, overridable at creation)."""


def _create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str) and tag.startswith("tl_"):
        kwargs.setdefault("token_label", True)  # the token-labelling weights need the aux head
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("file"):
        # timm resets custom_load when a file is given; keep it, so that RMT.load_pretrained reads the
        # file (official layouts, `model` before `model_ema`, clear errors) rather than timm's loader
        overlay.setdefault("custom_load", True)
        kwargs["pretrained_cfg_overlay"] = overlay
    elif pretrained and not (overlay.get("state_dict") or isinstance(tag, dict)):
        raise CheckpointError(
            f"{variant}: official RMT weights cannot be downloaded automatically (they are on Baidu Netdisk, "
            f"see https://github.com/qhfan/RMT). Download the file and pass "
            f"pretrained_cfg_overlay=dict(file='path/to/RMT-X.pth'), or a .safetensors from `rmt convert`.")
    return build_model_with_cfg(
        RMT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **dict(MODEL_ARGS[variant], **kwargs),
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head",
        "custom_load": True,
        "paper_ids": "arXiv:2309.11523",
        "paper_name": "RMT: Retentive Networks Meet Vision Transformers",
        "origin_url": "https://github.com/qhfan/RMT",
        **kwargs,
    }


def _tl_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(classifier=("head", "aux_head"), notes=("token labelling (paper's *) weights",), **kwargs)


default_cfgs = generate_default_cfgs({
    "rmt_t.in1k": _cfg(),
    "rmt_s.in1k": _cfg(),
    "rmt_s.tl_in1k": _tl_cfg(),
    "rmt_b.in1k": _cfg(),
    "rmt_b.tl_in1k": _tl_cfg(),
    "rmt_l.in1k": _cfg(),
    "rmt_l.tl_in1k": _tl_cfg(),
})


@register_model
def rmt_t(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T: 14.3M params, 2.65 GMACs at 224, 82.4% ImageNet top-1 (paper)."""
    return _create_rmt("rmt_t", pretrained, **kwargs)


@register_model
def rmt_s(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S: 27.0M params, 4.80 GMACs at 224, 84.1% ImageNet top-1 (84.8% with token labelling)."""
    return _create_rmt("rmt_s", pretrained, **kwargs)


@register_model
def rmt_b(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B: 54.2M params, 10.41 GMACs at 224, 85.0% ImageNet top-1 (85.6% with token labelling)."""
    return _create_rmt("rmt_b", pretrained, **kwargs)


@register_model
def rmt_l(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L: 95.5M params, 19.55 GMACs at 224, 85.5% ImageNet top-1 (86.1% with token labelling)."""
    return _create_rmt("rmt_l", pretrained, **kwargs)
