"""RetinaNet as the official RMT COCO models compute it (mmdet 2.11 ``RetinaNet``,
``detect/configs/_base_/models/RMT_retinanet.py``), in torchvision's detector contract.

* Backbone: :class:`rmt.models.backbone.RMTBackbone` returning stages 1-3 (strides 8, 16, 32): the
  official model computes all four, but its FPN starts at level 1 (``start_level=1``).
* :class:`RetinaFPN`: mmdet's FPN with ``add_extra_convs='on_input'``: P3-P5 from laterals and a
  nearest-neighbour top-down path, P6 = 3x3/2 conv on C5 and P7 = 3x3/2 conv on P6, with **no** ReLU
  between them (torchvision's ``LastLevelP6P7`` applies one).
* :class:`RetinaHead`: two towers of four 3x3 conv + ReLU, ``retina_cls`` (``A * K`` sigmoid logits,
  no background) and ``retina_reg`` (``A * 4`` deltas), focal prior bias ``-log(99)``.
* Anchors: :class:`rmt.detection.ops.GridAnchors` at strides 8-128, three octave scales (``4 *
  2 ** (i / 3)`` strides) and ratios 0.5 / 1 / 2.
* Test (``AnchorHead._get_bboxes``): per level, sigmoid, the ``topk_candidates`` (mmdet's
  ``nms_pre``) anchors with the highest best-class score, decoded (stds 1, clipped to the resized
  image); levels concatenated, boxes divided by the scale factor, then ``multiclass_nms`` (scores
  ``> score_thresh``, class-wise NMS, ``detections_per_img``), labels returned as ``1..K``.
* Training (``AnchorHead.loss``): mmdet's ``MaxIoUAssigner`` (positive IoU >= 0.5, negative < 0.4,
  each ground-truth box also takes every anchor it overlaps best), anchors outside the image's padded
  area ignored, sigmoid focal loss (alpha 0.25, gamma 2) over positives and negatives and L1 on the
  deltas of the positives, both divided by the batch's positive count (at least one per image).

:func:`official_retinanet_state` maps an official checkpoint's weights onto this model.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou, sigmoid_focal_loss

from ..errors import RMTError
from ..models.backbone import RMTBackbone, official_backbone_state
from .ops import GridAnchors, ImageMeta, boxes_to_delta, delta_to_boxes, multiclass_nms
from .transform import SIZE_DIVISOR, DetectionTransform

__all__ = ["RetinaFPN", "RMTWithRetinaFPN", "RetinaHead", "RetinaNet", "MaxIoUMatcher", "RETINA_STRIDES",
           "retina_anchors", "official_retinanet_state"]

RETINA_STRIDES = (8, 16, 32, 64, 128)
"""Strides of P3-P7."""


class RetinaFPN(nn.Module):
    """mmdet's ``FPN(add_extra_convs='on_input')`` over the given input levels (C3-C5 here).

    Outputs, all ``out_channels`` wide: one per input level (1x1 lateral, top-down nearest
    upsampling added, 3x3 output conv), then ``extra_levels`` stride-2 3x3 convs, the first on the
    last *input* level, each next one on the previous output, without an activation in between.
    Key names follow mmdet's (``lateral_convs.i``, ``fpn_convs.i``, extra convs last), without its
    ``ConvModule`` wrapper.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_levels: int = 2):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        outputs = [nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels]
        extras = [nn.Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
                  for i in range(extra_levels)]
        self.fpn_convs = nn.ModuleList(outputs + extras)
        for conv in self.modules():  # mmdet's FPN.init_weights
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        source = inputs[-1]
        for conv in self.fpn_convs[len(laterals):]:
            source = conv(source)
            outs.append(source)
        return outs


class RMTWithRetinaFPN(nn.Module):
    """An :class:`RMTBackbone` (``body``) and a :class:`RetinaFPN` (``fpn``); returns P3-P7 as an
    ``OrderedDict`` (``"p3"`` ... ``"p7"``)."""

    def __init__(self, body: RMTBackbone, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = RetinaFPN(body.out_channels, out_channels, extra_levels=len(RETINA_STRIDES) - len(body.out_channels))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.fpn(list(self.body(x).values()))
        return OrderedDict((f"p{i + 3}", f) for i, f in enumerate(levels))


class RetinaHead(nn.Module):
    """mmdet's ``RetinaHead``: per level, ``(cls_logits (N, A * K, H, W), box_deltas (N, A * 4, H, W))``.

    Args:
        channels: input and tower width (``in_channels`` = ``feat_channels`` in the official config).
        num_anchors: anchors per location (A).
        num_classes: object classes (K), no background.
        stacked_convs: convs per tower.
        prior_prob: initial foreground probability of every logit (focal loss initialisation).
    """

    def __init__(self, channels: int, num_anchors: int, num_classes: int, stacked_convs: int = 4,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(stacked_convs))
        self.retina_cls = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for conv in self.modules():  # RetinaHead.init_weights
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        cls_logits, box_deltas = [], []
        for x in features:
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = F.relu(conv(cls_feat))
            for conv in self.reg_convs:
                reg_feat = F.relu(conv(reg_feat))
            cls_logits.append(self.retina_cls(cls_feat))
            box_deltas.append(self.retina_reg(reg_feat))
        return cls_logits, box_deltas


def retina_anchors(anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512)) -> GridAnchors:
    """The anchors at P3-P7: ``anchor_sizes`` are the octave base sizes per level (the official ``4 *
    stride``), each level then has sizes ``base * 2 ** (i / 3)``, i = 0, 1, 2, at ratios 0.5 / 1 / 2. mmdet
    scales anchors with the stride, so the sizes must be one multiple of the strides."""
    if len(anchor_sizes) != len(RETINA_STRIDES):
        raise RMTError(f"anchor_sizes needs one size per pyramid level ({len(RETINA_STRIDES)}), got "
                       f"{list(anchor_sizes)}")
    base_scales = {size / stride for size, stride in zip(anchor_sizes, RETINA_STRIDES)}
    if len(base_scales) != 1:
        raise RMTError(f"RetinaNet anchor_sizes must be one multiple of the strides {list(RETINA_STRIDES)} "
                       f"(e.g. 32 64 128 256 512), got {list(anchor_sizes)}")
    return GridAnchors(RETINA_STRIDES, (0.5, 1.0, 2.0), octave_base_scale=base_scales.pop(), scales_per_octave=3)


class MaxIoUMatcher(Matcher):
    """torchvision's :class:`Matcher` with mmdet's ``MaxIoUAssigner(min_pos_iou=0, gt_max_assign_all=True)``
    low-quality rule: every anchor whose IoU with a ground-truth box equals that box's best IoU is
    matched *to that box* (the later box when several claim it), where torchvision keeps the anchor's own
    best box. Below ``low``: negative (-1), between ``low`` and ``high``: ignored (-2)."""

    def __init__(self, high: float = 0.5, low: float = 0.4):
        super().__init__(high, low, allow_low_quality_matches=True)

    def set_low_quality_matches_(self, matches: torch.Tensor, all_matches: torch.Tensor,
                                 match_quality_matrix: torch.Tensor) -> None:
        best = match_quality_matrix.max(dim=1, keepdim=True).values
        order = torch.arange(1, match_quality_matrix.shape[0] + 1, device=matches.device)[:, None]
        last_claim = ((match_quality_matrix == best) * order).max(dim=0).values  # 1-based box, 0: none
        claimed = last_claim > 0
        matches[claimed] = last_claim[claimed] - 1


def _per_anchor(level_maps: List[torch.Tensor], width: int) -> torch.Tensor:
    """``(N, A * width, H, W)`` maps of all levels as ``(N, sum of H * W * A, width)`` (anchor order of
    :meth:`GridAnchors.grid`)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, width) for m in level_maps], dim=1)


class RetinaNet(nn.Module):
    """The detector: ``model(images, targets)`` in train mode returns ``{"classification", "bbox_regression"}``
    losses, ``model(images)`` in eval mode one ``{"boxes", "scores", "labels"}`` dict per image in
    original-image coordinates, labels ``1..num_classes`` (see the module docstring).

    Args:
        backbone: returns the five pyramid levels (an ``OrderedDict``), ``out_channels`` wide.
        num_classes: object classes, without a background.
        min_size, max_size: the input scaling (:class:`rmt.detection.transform.DetectionTransform`).
        anchor_generator: default :func:`retina_anchors`.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: the test settings (mmdet's
            ``score_thr``, ``nms.iou_threshold``, ``max_per_img``, ``nms_pre``).
        fg_iou_thresh, bg_iou_thresh: the assigner's positive / negative IoU thresholds.
        focal_alpha, focal_gamma: the focal loss's.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int | Sequence[int] = 800,
                 max_size: int = 1333, anchor_generator: Optional[GridAnchors] = None, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, topk_candidates: int = 1000,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.transform = DetectionTransform((min_size,) if isinstance(min_size, int) else tuple(min_size), max_size)
        self.anchor_generator = anchor_generator if anchor_generator is not None else retina_anchors()
        self.head = RetinaHead(backbone.out_channels, self.anchor_generator.num_anchors_per_location()[0],
                               num_classes)
        self.proposal_matcher = MaxIoUMatcher(fg_iou_thresh, bg_iou_thresh)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        cls_logits, box_deltas = self.head(features)
        if self.training:
            return self.compute_loss(targets, cls_logits, box_deltas, image_list.metas)
        return self.postprocess_detections(cls_logits, box_deltas, image_list.metas)

    def _valid_anchors(self, sizes: List[Tuple[int, int]], meta: ImageMeta, device: torch.device) -> torch.Tensor:
        """mmdet's anchor ``valid_flags``: only anchors on feature locations inside this image's own padded
        area (its size padded to a multiple of 32; the batch may be larger) take part in the loss."""
        pad_h, pad_w = (math.ceil(s / SIZE_DIVISOR) * SIZE_DIVISOR for s in meta.img_shape)
        flags = []
        for (h, w), stride, a in zip(sizes, self.anchor_generator.strides,
                                     self.anchor_generator.num_anchors_per_location()):
            valid = torch.zeros(h, w, dtype=torch.bool, device=device)
            valid[: min(math.ceil(pad_h / stride), h), : min(math.ceil(pad_w / stride), w)] = True
            flags.append(valid[:, :, None].expand(h, w, a).reshape(-1))
        return torch.cat(flags)

    def compute_loss(self, targets: List[Dict[str, torch.Tensor]], cls_logits: List[torch.Tensor],
                     box_deltas: List[torch.Tensor], metas: List[ImageMeta]) -> Dict[str, torch.Tensor]:
        """Focal and L1 losses (``AnchorHead.loss``; targets in the resized images' coordinates, labels
        ``1..num_classes``)."""
        sizes = [tuple(c.shape[-2:]) for c in cls_logits]
        anchors = torch.cat(self.anchor_generator.grid(sizes))
        logits = _per_anchor(cls_logits, self.num_classes).float()  # mmdet computes the losses in float32
        deltas = _per_anchor(box_deltas, 4).float()
        cls_loss, box_loss, positives = logits.new_zeros(()), deltas.new_zeros(()), 0
        for i, (target, meta) in enumerate(zip(targets, metas)):
            valid = self._valid_anchors(sizes, meta, anchors.device)
            image_anchors, image_logits, image_deltas = anchors[valid], logits[i][valid], deltas[i][valid]
            gt_boxes = target["boxes"].float()
            if len(gt_boxes):
                with torch.no_grad():
                    matches = self.proposal_matcher(box_iou(gt_boxes, image_anchors))
            else:  # every anchor is background
                matches = torch.full((len(image_anchors),), Matcher.BELOW_LOW_THRESHOLD, device=anchors.device)
            positive = matches >= 0
            counted = matches != Matcher.BETWEEN_THRESHOLDS
            class_targets = torch.zeros_like(image_logits)
            class_targets[positive, target["labels"][matches[positive]] - 1] = 1.0
            cls_loss = cls_loss + sigmoid_focal_loss(image_logits[counted], class_targets[counted],
                                                     alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
            regression = boxes_to_delta(image_anchors[positive], gt_boxes[matches[positive]])
            box_loss = box_loss + (image_deltas[positive] - regression).abs().sum()
            positives += max(int(positive.sum()), 1)
        return {"classification": cls_loss / positives, "bbox_regression": box_loss / positives}

    def postprocess_detections(self, cls_logits: List[torch.Tensor], box_deltas: List[torch.Tensor],
                               metas: List[ImageMeta]) -> List[Dict[str, torch.Tensor]]:
        """Detections per image in original-image coordinates (``AnchorHead._get_bboxes`` with
        ``rescale=True``, then ``multiclass_nms``)."""
        level_anchors = self.anchor_generator.grid([tuple(c.shape[-2:]) for c in cls_logits])
        results = []
        for i, meta in enumerate(metas):
            boxes, scores = [], []
            for logits, deltas, anchors in zip(cls_logits, box_deltas, level_anchors):
                level_scores = logits[i].detach().float().permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                level_deltas = deltas[i].detach().float().permute(1, 2, 0).reshape(-1, 4)
                if 0 < self.topk_candidates < len(level_scores):
                    top = level_scores.max(dim=1).values.topk(self.topk_candidates).indices
                    level_scores, level_deltas, anchors = level_scores[top], level_deltas[top], anchors[top]
                boxes.append(delta_to_boxes(anchors, level_deltas, max_shape=meta.img_shape))
                scores.append(level_scores)
            image_boxes = torch.cat(boxes)
            image_boxes = image_boxes / meta.scale_factor.to(image_boxes)
            # multiclass_nms takes a background score column last: sigmoid heads give it zeros, as mmdet
            image_scores = F.pad(torch.cat(scores), (0, 1))
            kept_boxes, kept_scores, labels = multiclass_nms(image_boxes, image_scores, self.score_thresh,
                                                             self.nms_thresh, self.detections_per_img)
            results.append({"boxes": kept_boxes, "scores": kept_scores, "labels": labels + 1})
        return results


_OFFICIAL_RETINA_RENAMES = (
    (r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.\1.\2.\3"),
    (r"^bbox_head\.(cls_convs|reg_convs)\.(\d+)\.conv\.(weight|bias)$", r"head.\1.\2.\3"),
    (r"^bbox_head\.(retina_cls|retina_reg)\.(weight|bias)$", r"head.\1.\2"),
)


def official_retinanet_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official (mmdet 2.11) RMT RetinaNet state dict in our :class:`RetinaNet` layout: the backbone
    through :func:`rmt.models.backbone.official_backbone_state` (levels 1-3; ``extra_norms.0``, unused by
    the official model, is dropped), the neck's and head's ``ConvModule`` keys renamed. Raises
    :class:`RMTError` on a key it has no place for."""
    out = {"backbone.body." + k: v for k, v in official_backbone_state(state_dict, out_indices=(1, 2, 3)).items()}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        for pattern, repl in _OFFICIAL_RETINA_RENAMES:
            new_key, found = re.subn(pattern, repl, key)
            if found:
                out[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise RMTError(f"not an official RetinaNet state dict: no place for {', '.join(unknown[:4])}"
                       f"{', ...' if len(unknown) > 4 else ''}")
    return out
