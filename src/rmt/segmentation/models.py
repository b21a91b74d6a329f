"""Segmentors: an RMT backbone, an optional FPN neck, a decode head and (UperNet) an auxiliary head.

``build_segmentor("upernet" | "semantic_fpn", backbone="rmt_t", num_classes=150)`` returns a
:class:`Segmentor`:

* ``model(images)`` -> logits ``(B, K, H, W)`` at the input resolution;
* ``model(images, labels)`` in train mode -> ``{"loss_seg", "loss_aux"}`` (cross-entropy, label
  255 ignored; the auxiliary FCN head on stage 3 only exists in training, weight 0.4);
* ``model.inference(images, mode="whole" | "slide", crop_size, stride, output_size)`` -> class
  probabilities, optionally at another size (the original image's), as the official code computes them.

Evaluation and prediction prepare images as the official ADE20K test pipeline does
(:class:`rmt.data.ade20k.SegEvalTransform`). Official (mmseg 0.13) checkpoints load directly
(:func:`segmentor_from_checkpoint`, :func:`read_official_segmentor`).
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
from ..training.config import config_from_dict
from ..training.dense_checkpoints import (
    config_disagrees,
    load_exactly,
    load_fitting,
    official_backbone_settings,
    official_backbone_variant,
    official_class_names,
    parse_official_config,
    read_dense_checkpoint,
    read_official_file,
)
from .config import ARCHS, SegConfig
from .heads import FCNHead, SemanticFPNHead, UPerHead, upsample

__all__ = ["Segmentor", "build_segmentor", "ARCHS", "slide_inference", "segmentor_kwargs", "segmentor_from_checkpoint",
           "read_segmentor_checkpoint", "init_segmentor_from", "official_segmentor_state", "read_official_segmentor",
           "official_segmentor_config"]


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
        """Class probabilities ``(B, K, H, W)`` (float32) for ``images``, as mmseg's
        ``EncoderDecoder.inference`` computes them: the logits, resized (bilinear) to the input size, of
        the whole image or averaged over a sliding window; resized again to ``output_size`` (the
        original image's, when the input was rescaled); then the softmax. Their argmax is the map.

        ``slide``: windows of ``crop_size`` every ``stride`` (default 2/3 of the crop), logits
        averaged where windows overlap.
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
        return logits.float().softmax(1)


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


# ------------------------------------------------------------------------------ checkpoints
def segmentor_from_checkpoint(path: str | os.PathLike) -> Tuple[Segmentor, SegConfig, List[str]]:
    """``(model in eval mode, SegConfig, class names)`` from any segmentation checkpoint
    (:func:`read_segmentor_checkpoint`: a run's files, a model folder, an official mmseg file)."""
    state, cfg, class_names = read_segmentor_checkpoint(path)
    arch, kwargs = segmentor_kwargs(cfg)
    model = build_segmentor(arch, num_classes=len(class_names), **kwargs)
    load_exactly(model, state, f"{path}: {cfg.arch} {cfg.backbone} with {len(class_names)} classes")
    return model.eval(), cfg, class_names


def read_segmentor_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], SegConfig, List[str]]:
    """``(state dict in our layout, SegConfig, class names)`` of a segmentation run's ``model.safetensors``,
    ``best.pth`` or ``last.pth``, of a model folder written by ``rmt convert`` (its ``model.safetensors``),
    or of an official (mmseg 0.13) RMT Semantic FPN / UperNet checkpoint (:func:`read_official_segmentor`)."""
    return read_dense_checkpoint(path, "segmentation", SegConfig, read_official_segmentor)


def init_segmentor_from(model: Segmentor, path: str | os.PathLike, cfg: SegConfig) -> Dict[str, List[str]]:
    """Start ``model`` (built from ``cfg``) from the weights of a whole segmentor of the same architecture
    and backbone (any file :func:`read_segmentor_checkpoint` reads), for fine-tuning: every tensor of
    the same name and shape is loaded; the others -- with another class count, the classifiers
    (``conv_seg`` of the decode and auxiliary heads) -- keep their fresh initialisation.

    Returns ``{"loaded", "reinitialised", "unused"}`` key lists (``unused``: the file's keys the model
    lacks, e.g. an auxiliary head when ``aux_weight`` is 0) and ``{"classes": [the file's class count]}``."""
    state, source, class_names = read_segmentor_checkpoint(path)
    if (source.arch, source.backbone) != (cfg.arch, cfg.backbone):
        raise RMTError(f"--init-from {path} holds a {source.arch} with {source.backbone}, the config builds a "
                       f"{cfg.arch} with {cfg.backbone}: set arch and backbone to the file's")
    return load_fitting(model, state, len(class_names))


# ------------------------------------------------------------------ official (mmseg) checkpoints
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
_OFFICIAL_HEADS = {"UPerHead": "upernet", "FPNHead": "semantic_fpn"}  # mmseg decode head type -> our arch


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


def read_official_segmentor(path: str | os.PathLike
                            ) -> Optional[Tuple[Dict[str, torch.Tensor], SegConfig, List[str]]]:
    """An official segmentation checkpoint (mmcv ``{"meta", "state_dict", "optimizer"}``, mmseg keys) as
    ``(state dict in our layout, SegConfig, class names)``; ``None`` for a file of another layout.

    Architecture, variant, class count and head width come from the keys and shapes
    (:func:`official_segmentor_config`), checked against ``meta["config"]`` when that text parses;
    class names from ``meta["CLASSES"]`` (else ``class_<i>``)."""
    official = read_official_file(path)
    if official is None:
        return None
    cfg = official_segmentor_config(official.state, official.config_text, where=str(path))
    return official_segmentor_state(official.state), cfg, official_class_names(official.meta, cfg.num_classes)


def official_segmentor_config(state: Dict[str, torch.Tensor], config_text: Optional[str] = None,
                              where: str = "checkpoint") -> SegConfig:
    """The :class:`SegConfig` of an official RMT segmentor from its state dict (mmseg keys):

    * architecture: ``decode_head.psp_modules`` -> UperNet, ``decode_head.scale_heads`` -> Semantic FPN;
    * backbone variant: the widths and depths of ``backbone.layers``, and which stages have layer scale;
    * classes and head width: ``decode_head.conv_seg``; auxiliary head: ``auxiliary_head.*`` present.

    ``config_text`` (the file's ``meta["config"]``, mmcv's ``pretty_text``), when it parses
    (:func:`parse_official_config`), must agree with the weights; it adds the backbone's decomposed
    stages and drop path, and the test mode. Anything not recognised is one :class:`RMTError` line
    saying what was found and what was expected."""
    if "decode_head.conv_seg.weight" not in state:
        found = sorted({k.split(".")[0] for k in state})
        raise RMTError(f"{where}: not an official segmentor (found top-level keys {', '.join(found[:6])}, no "
                       f"decode_head.conv_seg); expected an mmseg RMT Semantic FPN or UperNet checkpoint")
    if any(k.startswith("decode_head.psp_modules.") for k in state):
        arch = "upernet"
    elif any(k.startswith("decode_head.scale_heads.") for k in state):
        arch = "semantic_fpn"
    else:
        heads = sorted({k.split(".")[1] for k in state if k.startswith("decode_head.") and k.count(".") > 1})
        raise RMTError(f"{where}: an mmseg decode head with {', '.join(heads) or 'only conv_seg'}; expected "
                       f"UperNet (decode_head.psp_modules) or Semantic FPN (decode_head.scale_heads)")
    variant, found = official_backbone_variant(state, where)
    classes, channels = state["decode_head.conv_seg.weight"].shape[:2]
    settings: Dict[str, object] = dict(arch=arch, backbone=variant, num_classes=int(classes), channels=int(channels),
                                       aux_weight=0.4 if "auxiliary_head.conv_seg.weight" in state else 0.0)
    model_cfg, test_scale = parse_official_config(config_text) if config_text else (None, None)
    if model_cfg is not None:
        settings.update(_settings_from_config(model_cfg, settings, found, where))
    if test_scale is not None:
        settings["scale"] = list(test_scale)
    return config_from_dict(SegConfig, settings)


def _settings_from_config(model_cfg: Dict, settings: Dict, found: Dict, where: str) -> Dict[str, object]:
    """What the parsed official ``model`` config adds to ``settings`` (read off the weights), after
    checking that the two agree."""
    head = model_cfg.get("decode_head") if isinstance(model_cfg.get("decode_head"), dict) else {}
    head_type = head.get("type")
    if head_type is not None and _OFFICIAL_HEADS.get(head_type) != settings["arch"]:
        raise config_disagrees(where, "decode head", head_type, f"{settings['arch']} (expected "
                               f"{' or '.join(_OFFICIAL_HEADS)})")
    out = official_backbone_settings(model_cfg, found, where)
    if head.get("num_classes") is not None and head["num_classes"] != settings["num_classes"]:
        raise config_disagrees(where, "num_classes", head["num_classes"], settings["num_classes"])
    test = model_cfg.get("test_cfg") if isinstance(model_cfg.get("test_cfg"), dict) else {}
    if test.get("mode") in ("whole", "slide"):
        out["test_mode"] = test["mode"]
        if test["mode"] == "slide":
            out.update(crop_size=list(test["crop_size"]), slide_stride=list(test["stride"]))
    return out
