"""Box operations computed exactly as the official RMT detectors compute them (mmdet 2.11 / mmcv 1.x).

The paper's COCO models were trained and tested with mmdet; these are the pieces whose arithmetic
decides which boxes come out, written so that the same weights give the same detections here:

* :class:`GridAnchors`: mmdet's ``AnchorGenerator`` (float base anchors centred on the grid points,
  fixed strides, no rounding), with torchvision's ``AnchorGenerator`` interface so that torchvision's
  RPN and RetinaNet can use it;
* :func:`delta_to_boxes` / :func:`boxes_to_delta`: ``DeltaXYWHBBoxCoder`` (target stds, the
  ``log(1000/16)`` clamp, no +1 on widths, clipping to the resized image);
* :func:`batched_nms` / :func:`multiclass_nms`: mmcv's class-offset NMS and mmdet's score-threshold,
  per-class NMS and top-k, with the background as the *last* score column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import nms

__all__ = ["ImageMeta", "MASK_THRESHOLD", "GridAnchors", "delta_to_boxes", "boxes_to_delta", "batched_nms",
           "multiclass_nms", "WH_RATIO_CLIP"]

WH_RATIO_CLIP = 16 / 1000
"""Largest width/height change of one box regression step: ``exp(+-log(1000/16))``."""

MASK_THRESHOLD = 0.5
"""A pixel belongs to an instance when its pasted mask probability is ``>= MASK_THRESHOLD`` (mmdet's
``mask_thr_binary``)."""

NMS_SPLIT = 10000
"""mmcv runs one NMS over all classes (class offsets) below this many boxes, else one per class."""


@dataclass(frozen=True)
class ImageMeta:
    """Where one network input came from, as mmdet's ``img_metas`` carry it: what the test-time heads need to
    clip boxes (``img_shape``) and to return them in original-image coordinates (``scale_factor``,
    ``ori_shape``)."""

    ori_shape: Tuple[int, int]  # (height, width) of the original image
    img_shape: Tuple[int, int]  # (height, width) after resizing, before padding
    scale_factor: torch.Tensor  # float32 [w_new / w, h_new / h, w_new / w, h_new / h]


class GridAnchors(nn.Module):
    """mmdet's anchor generator: for every level, ``len(ratios) * len(scales)`` base anchors of size
    ``stride * scale`` (ratio-major order), centred on ``(x * stride, y * stride)``.

    Same interface as torchvision's ``AnchorGenerator`` (``forward(image_list, feature_maps)`` returns
    one ``(sum of H*W*A, 4)`` tensor per image; ``num_anchors_per_location()``), but the strides are the
    configured ones (torchvision derives them from the padded image size, which is wrong for levels whose
    size was rounded up) and the anchors are not rounded to integers.

    Args:
        strides: stride of each pyramid level, e.g. ``(4, 8, 16, 32, 64)``.
        ratios: height/width ratios.
        scales: anchor sizes in strides (``(8,)`` for the RPN); or ``None`` with ``octave_base_scale``
            and ``scales_per_octave`` (RetinaNet: ``4`` and ``3`` give ``4 * 2 ** (i / 3)``).
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 scales: Optional[Sequence[float]] = None, octave_base_scale: Optional[float] = None,
                 scales_per_octave: Optional[int] = None):
        super().__init__()
        if (scales is None) == (octave_base_scale is None or scales_per_octave is None):
            raise ValueError("give either scales or octave_base_scale and scales_per_octave")
        if scales is None:  # computed in float64, then stored as float32, as mmdet does
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.strides = tuple(int(s) for s in strides)
        scales_t = torch.tensor(list(scales), dtype=torch.float32)
        h_ratios = torch.sqrt(torch.tensor(list(ratios), dtype=torch.float32))
        w_ratios = 1 / h_ratios
        base = []
        for stride in self.strides:
            ws = (stride * w_ratios[:, None] * scales_t[None, :]).view(-1)
            hs = (stride * h_ratios[:, None] * scales_t[None, :]).view(-1)
            base.append(torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1))
        self.register_buffer("base_anchors", torch.stack(base), persistent=False)  # (levels, A, 4)

    def num_anchors_per_location(self) -> List[int]:
        return [self.base_anchors.shape[1]] * len(self.strides)

    def grid(self, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """Anchors of each level, ``(H * W * A, 4)``: location-major (row by row), anchor-minor."""
        if len(sizes) != len(self.strides):
            raise ValueError(f"{len(self.strides)} pyramid levels expected, got {len(sizes)} feature maps")
        out = []
        for base, stride, (h, w) in zip(self.base_anchors, self.strides, sizes):
            shift_x = torch.arange(0, w, device=base.device) * stride
            shift_y = torch.arange(0, h, device=base.device) * stride
            xx = shift_x.repeat(h)
            yy = shift_y.view(-1, 1).repeat(1, w).view(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).type_as(base)
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
        return out

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        anchors = torch.cat(self.grid([tuple(f.shape[-2:]) for f in feature_maps]))
        anchors = anchors.to(feature_maps[0].dtype)
        return [anchors for _ in range(len(image_list.image_sizes))]


def delta_to_boxes(rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                   max_shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Boxes from ``rois (N, 4)`` and ``deltas (N, 4 * k)`` (k boxes per RoI: class-specific deltas),
    mmdet's ``delta2bbox`` with zero means; clipped to ``max_shape = (height, width)`` when given."""
    stds_t = deltas.new_tensor(stds).view(1, -1).repeat(1, deltas.size(-1) // 4)
    d = deltas * stds_t
    dx, dy, dw, dh = d[..., 0::4], d[..., 1::4], d[..., 2::4], d[..., 3::4]
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dw = dw.clamp(min=-max_ratio, max=max_ratio)
    dh = dh.clamp(min=-max_ratio, max=max_ratio)
    x1, y1, x2, y2 = rois[..., 0], rois[..., 1], rois[..., 2], rois[..., 3]
    px = ((x1 + x2) * 0.5).unsqueeze(-1).expand_as(dx)
    py = ((y1 + y2) * 0.5).unsqueeze(-1).expand_as(dy)
    pw = (x2 - x1).unsqueeze(-1).expand_as(dw)
    ph = (y2 - y1).unsqueeze(-1).expand_as(dh)
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + pw * dx
    gy = py + ph * dy
    boxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1).view(deltas.size())
    if max_shape is not None:
        h, w = max_shape
        limit = boxes.new_tensor([w, h] * (deltas.size(-1) // 2))
        zero = boxes.new_tensor(0)
        boxes = torch.where(boxes < zero, zero, boxes)
        boxes = torch.where(boxes > limit, limit, boxes)
    return boxes


def boxes_to_delta(rois: torch.Tensor, gt: torch.Tensor, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                   ) -> torch.Tensor:
    """Regression targets of ``rois`` towards ``gt`` (both ``(N, 4)``), mmdet's ``bbox2delta``."""
    rois, gt = rois.float(), gt.float()
    px, py = (rois[..., 0] + rois[..., 2]) * 0.5, (rois[..., 1] + rois[..., 3]) * 0.5
    pw, ph = rois[..., 2] - rois[..., 0], rois[..., 3] - rois[..., 1]
    gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds).unsqueeze(0)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
                ) -> torch.Tensor:
    """Indices kept by NMS run separately within each group, by descending score (mmcv's ``batched_nms``:
    boxes of different groups are moved apart by ``group * (max coordinate + 1)`` and suppressed in one
    pass; above :data:`NMS_SPLIT` boxes one pass per group)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < NMS_SPLIT:
        offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = (groups == group).nonzero(as_tuple=False).view(-1)
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = kept.nonzero(as_tuple=False).view(-1)
    return keep[scores[keep].sort(descending=True)[1]]


def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, iou_threshold: float,
                   max_per_image: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's ``multiclass_nms``: ``boxes (n, 4 * C)`` (class-specific) or ``(n, 4)``, ``scores (n, C + 1)``
    with the background in the last column. Every (box, class) pair scoring ``> score_threshold`` (strictly),
    NMS per class, the first ``max_per_image`` by score (-1: all). Returns ``boxes (k, 4)``, ``scores (k,)``
    and ``labels (k,)`` (``0..C-1``) in that order."""
    num_classes = scores.size(1) - 1
    if boxes.shape[1] > 4:
        boxes = boxes.view(scores.size(0), -1, 4)
    else:
        boxes = boxes[:, None].expand(scores.size(0), num_classes, 4)
    class_scores = scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(class_scores)
    boxes, class_scores, labels = boxes.reshape(-1, 4), class_scores.reshape(-1), labels.reshape(-1)
    valid = (class_scores > score_threshold).nonzero(as_tuple=False).squeeze(1)
    boxes, class_scores, labels = boxes[valid], class_scores[valid], labels[valid]
    keep = batched_nms(boxes, class_scores, labels, iou_threshold)
    if max_per_image > 0:
        keep = keep[:max_per_image]
    return boxes[keep], class_scores[keep], labels[keep]
