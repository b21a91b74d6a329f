"""Segmentors: an RMT backbone, an optional FPN neck, a decode head and (UperNet) an auxiliary head.

``build_segmentor("upernet" | "semantic_fpn", backbone="rmt_t", num_classes=150)`` returns a
:class:`Segmentor`:

* ``model(images)`` -> logits ``(B, K, H, W)`` at the input resolution;
* ``model(images, labels)`` in train mode -> ``{"loss_seg", "loss_aux"}`` (cross-entropy, label
  255 ignored; the auxiliary FCN head on stage 3 only exists in training, weight 0.4);
* ``model.inference(images, mode="whole" | "slide", crop_size, stride, output_size)`` -> logits,
  optionally resized to another size (e.g. the original image's).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ..data.ade20k import IGNORE_INDEX
from ..errors import RMTError, did_you_mean
from ..models.backbone import RMTBackbone, official_backbone_state
from ..models.rmt import MODEL_ARGS, guess_variant
from ..models.weights import META_KEY, infer_arch, read_checkpoint, read_weights
from ..training.config import config_from_dict
from .config import ARCHS, SegConfig
from .heads import FCNHead, SemanticFPNHead, UPerHead, upsample

__all__ = ["Segmentor", "build_segmentor", "ARCHS", "slide_inference", "segmentor_kwargs", "segmentor_from_checkpoint",
           "official_segmentor_state"]



class Segmentor(nn.Module):
    """Encoder-decoder segmentation model (see the module docstring).

    Args:
        backbone: returns an ordered dict of feature maps (finest first).
        decode_head: feature list -> logits at the finest map's resolution.
        neck: optional ordered dict -> ordered dict (Semantic FPN's FPN).
        aux_head: optional head on backbone level ``aux_index``, used in training only.
        aux_weight: weight of the auxiliary loss.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, neck: Optional[nn.Module] = None,
                 aux_head: Optional[nn.Module] = None, aux_index: int = 2, aux_weight: float = 0.4,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.backbone, self.neck, self.decode_head, self.aux_head = backbone, neck, decode_head, aux_head
        self.aux_index, self.aux_weight, self.ignore_index = aux_index, aux_weight, ignore_index

    def _features(self, images: torch.Tensor):
        feats = self.backbone(images)
        decoded = self.neck(feats) if self.neck is not None else feats
        return list(feats.values()), list(decoded.values())

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        backbone_feats, feats = self._features(images)
        logits = self.decode_head(feats)
        if not (self.training and labels is not None):
            return upsample(logits, images.shape[-2:])
        losses = {"loss_seg": self._loss(logits, labels)}
        if self.aux_head is not None and self.aux_weight > 0:
            losses["loss_aux"] = self.aux_weight * self._loss(self.aux_head(backbone_feats[self.aux_index]), labels)
        return losses

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = upsample(logits, labels.shape[-2:]).float()
        if not (labels != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index)

    @torch.no_grad()
    def inference(self, images: torch.Tensor, mode: str = "whole", crop_size: Optional[Sequence[int]] = None,
                  stride: Optional[Sequence[int]] = None, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for ``images``, from the whole image or a sliding window.

        ``slide``: windows of ``crop_size`` every ``stride`` (default 2/3 of the crop), logits
        averaged where windows overlap. ``output_size`` resizes the logits (bilinear) at the end.
        """
        if mode == "whole":
            logits = self(images)
        elif mode == "slide":
            if crop_size is None:
                raise RMTError("slide inference needs a crop_size")
            logits = slide_inference(self, images, crop_size, stride)
        else:
            raise RMTError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = upsample(logits, output_size)
        return logits


def _window_starts(size: int, crop: int, stride: int) -> Sequence[int]:
    steps = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(steps)})


def slide_inference(model: nn.Module, images: torch.Tensor, crop_size: Sequence[int],
                    stride: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Run ``model`` (images -> logits at their size) on overlapping windows and average the logits.

    The last window of each row/column is shifted back to end at the border; images smaller than
    the crop are run whole.
    """
    ch, cw = (int(v) for v in crop_size)
    sh, sw = (int(v) for v in stride) if stride is not None else (max(1, 2 * ch // 3), max(1, 2 * cw // 3))
    if min(ch, cw, sh, sw) <= 0:
        raise RMTError(f"slide inference needs positive crop and stride, got {crop_size} / {stride}")
    _, _, h, w = images.shape
    total: Optional[torch.Tensor] = None
    count = images.new_zeros((1, 1, h, w))
    for top in _window_starts(h, ch, sh):
        for left in _window_starts(w, cw, sw):
            bottom, right = min(top + ch, h), min(left + cw, w)
            logits = model(images[:, :, top:bottom, left:right]).float()
            if total is None:
                total = images.new_zeros((images.shape[0], logits.shape[1], h, w), dtype=torch.float32)
            total[:, :, top:bottom, left:right] += logits
            count[:, :, top:bottom, left:right] += 1
    return total / count


# --------------------------------------------------------------------------------- building
def build_segmentor(arch: str, backbone: str = "rmt_t", num_classes: int = 150,
                    backbone_weights: Optional[str | os.PathLike] = None, channels: Optional[int] = None,
                    aux_weight: float = 0.4, dropout: float = 0.1, **backbone_kwargs) -> Segmentor:
    """A :class:`Segmentor` with an RMT backbone.

    Args:
        arch: ``upernet`` (UperNet head, width 512, and an auxiliary FCN head on stage 3) or
            ``semantic_fpn`` (FPN neck, 256 channels, and the Semantic FPN head, width 128).
        backbone: RMT variant.
        num_classes: classes to predict.
        backbone_weights: ImageNet weights for the backbone (the load report is logged and kept in
            ``model.backbone.load_report``).
        channels: decode-head width (default: the architecture's).
        aux_weight: auxiliary loss weight (UperNet; 0 builds no auxiliary head).
        backbone_kwargs: :class:`rmt.models.RMTBackbone` options (``frozen_stages``, ``norm_eval``,
            ``drop_path_rate``, ``decomposed``, ``grad_checkpointing``).
    """
    if arch not in ARCHS:
        raise RMTError(f"unknown segmentor {arch!r}{did_you_mean(arch, ARCHS)}; choose from {', '.join(ARCHS)}")
    if num_classes < 1:
        raise RMTError(f"num_classes must be positive, got {num_classes}")
    body = RMTBackbone(backbone, weights=backbone_weights, **backbone_kwargs)
    if arch == "upernet":
        head = UPerHead(body.out_channels, num_classes, channels or 512, dropout=dropout)
        aux = FCNHead(body.out_channels[2], num_classes, 256, dropout=dropout) if aux_weight > 0 else None
        return Segmentor(body, head, aux_head=aux, aux_index=2, aux_weight=aux_weight)
    neck = FeaturePyramidNetwork(body.out_channels, 256)
    head = SemanticFPNHead(256, body.strides, num_classes, channels or 128, dropout=dropout)
    return Segmentor(body, head, neck=neck, aux_weight=0.0)


def segmentor_kwargs(cfg) -> Tuple[str, Dict]:
    """``(arch, kwargs)`` for :func:`build_segmentor` from a :class:`rmt.segmentation.config.SegConfig`
    (without ``num_classes`` and weights)."""
    return cfg.arch, dict(backbone=cfg.backbone, channels=cfg.channels, aux_weight=cfg.aux_weight,
                          dropout=cfg.dropout, frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
                          drop_path_rate=cfg.drop_path, decomposed=cfg.decomposed,
                          grad_checkpointing=cfg.grad_checkpointing)


def segmentor_from_checkpoint(path: str | os.PathLike) -> Tuple[nn.Module, SegConfig, List[str]]:
    """``(model in eval mode, SegConfig, class names)`` from a segmentation run's ``model.safetensors`` or
    ``best.pth``/``last.pth``, or from an official (mmseg) RMT Semantic FPN / UperNet checkpoint."""
    official = _official_checkpoint(path)
    if official is not None:
        return official
    state, meta = read_weights(path, task="segmentation")
    cfg = config_from_dict(SegConfig, meta["config"])
    class_names = list(meta["class_names"])
    arch, kwargs = segmentor_kwargs(cfg)
    model = build_segmentor(arch, num_classes=len(class_names), **kwargs)
    model.load_state_dict(state)
    return model.eval(), cfg, class_names


# mmseg (the official segmentation code) -> our module names, applied in order to keys outside the backbone
_OFFICIAL_SEG_RENAMES = (
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"neck.layer_blocks.\1.0."),
    (r"^auxiliary_head\.", "aux_head."),
    (r"^(decode_head|aux_head)\.conv_seg\.", r"\1.classifier.1."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.", r"decode_head.ppm.branches.\1.1."),
    (r"^decode_head\.bottleneck\.", "decode_head.ppm_bottleneck."),
    (r"^(decode_head|aux_head)\.(.*)\.conv\.", r"\1.\2.0."),  # ConvModule: conv, bn -> Conv2dNormActivation
    (r"^(decode_head|aux_head)\.(.*)\.bn\.", r"\1.\2.1."),
)


def official_segmentor_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official (mmseg 0.13) RMT Semantic FPN / UperNet state dict in our :class:`Segmentor` layout:
    the backbone through :func:`rmt.models.backbone.official_backbone_state`, the FPN neck's and the
    heads' ``ConvModule`` (``conv``/``bn``) and ``conv_seg`` keys renamed."""
    out = {"backbone." + k: v for k, v in official_backbone_state(state_dict).items()}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        for pattern, repl in _OFFICIAL_SEG_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _official_checkpoint(path: str | os.PathLike) -> Optional[Tuple[nn.Module, SegConfig, List[str]]]:
    """An official segmentation checkpoint (mmcv ``{"meta", "state_dict", "optimizer"}``, mmseg keys) as
    our model; ``None`` for any other file. Architecture, variant and class count come from the keys and
    shapes, class names from ``meta["CLASSES"]`` (else ``class_<i>``)."""
    raw = read_checkpoint(path) if os.fspath(path).endswith((".pth", ".pt", ".bin")) else None
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "decode_head.conv_seg.weight" not in state:
        return None
    if any(k.startswith("decode_head.psp_modules.") for k in state):
        arch = "upernet"
    elif any(k.startswith("decode_head.scale_heads.") for k in state):
        arch = "semantic_fpn"
    else:
        raise RMTError(f"{path}: an mmseg checkpoint, but its decode head is neither UperNet (psp_modules) nor "
                       f"Semantic FPN (scale_heads)")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    variant = guess_variant(backbone)
    if variant is None or variant.endswith("_tl"):
        arch_found = infer_arch(backbone)
        raise RMTError(f"{path}: backbone not recognised (found {arch_found or 'no RMT stages'}); "
                       f"expected one of {', '.join(MODEL_ARGS)}")
    num_classes = state["decode_head.conv_seg.weight"].shape[0]
    meta = raw.get(META_KEY) if isinstance(raw.get(META_KEY), dict) else {}
    classes = meta.get("CLASSES")
    class_names = [str(c) for c in classes] if classes is not None and len(classes) == num_classes else \
        [f"class_{i}" for i in range(num_classes)]
    aux = any(k.startswith("auxiliary_head.") for k in state)
    cfg = config_from_dict(SegConfig, dict(arch=arch, backbone=variant, num_classes=num_classes,
                                           aux_weight=0.4 if aux else 0.0))
    name, kwargs = segmentor_kwargs(cfg)
    model = build_segmentor(name, num_classes=num_classes, **kwargs)
    mapped = official_segmentor_state(state)
    missing, unexpected = set(model.state_dict()) - set(mapped), set(mapped) - set(model.state_dict())
    if missing or unexpected:
        raise RMTError(f"{path}: official {arch} {variant} checkpoint does not fit: missing "
                       f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(mapped)
    return model.eval(), cfg, class_names
