"""The R-CNN parts as the official RMT configs build them (mmdet 2.11: ``detect/configs/_base_/models/
RMT_rcnn.py``, ``RMT_cas_rcnn.py``), with mmdet's module names so that official weights map key for key.

* :class:`RPNHead` / :class:`RegionProposalNetwork`: a 3x3 conv + ReLU, sigmoid objectness and deltas
  for 3 anchors per location (:class:`rmt.detection.ops.GridAnchors`, scale 8, strides 4-64). Test-time
  proposals: per level the ``pre_nms_top_n`` best anchors by score, decoded and clipped to the resized
  image, no size filter, one NMS (IoU 0.7) with the level as the group, the first ``post_nms_top_n``.
* :class:`RoIExtractor`: mmdet's ``SingleRoIExtractor`` (level ``floor(log2(sqrt(area) / 56 + 1e-6))``
  clamped to P2-P5; mmcv's RoIAlign = torchvision's ``roi_align(sampling_ratio=0, aligned=True)``).
* :class:`ConvFCBoxHead`: ``Shared2FCBBoxHead`` (two FCs) or the cascade's 4conv1fc head; ``fc_cls``
  scores ``num_classes + 1`` classes with the background LAST, ``fc_reg`` class-specific deltas.
* :class:`FCNMaskHead`: 4 convs, a 2x transposed conv, ``num_classes`` mask logits.
* :class:`StandardRoIHeads`: Mask/Faster R-CNN's test (softmax, per-class decode with stds
  (0.1, 0.1, 0.2, 0.2), clip, divide by the scale factor, ``multiclass_nms``; masks on the detections
  mapped back to the network input, pasted with :func:`paste_masks`) and training.

Training follows the configs where it is cheap to: RPN anchors matched at IoU 0.7 / 0.3 and 256 sampled
half positive, L1 loss (smooth L1 with beta 1/9 for the cascade); RoIs matched at 0.5 with the ground
truth added, 512 sampled a quarter positive, cross-entropy and L1 on the deltas scaled by the stds; the
mask loss on the positives (torchvision's matcher, sampler and mask targets). mmdet's low-quality matching
floor (``min_pos_iou``) and its RPN border filter of the cascade are not reproduced.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import box_iou, roi_align

from .ops import GridAnchors, ImageMeta, batched_nms, boxes_to_delta, delta_to_boxes, multiclass_nms

__all__ = ["ANCHOR_STRIDES", "FEATURE_STRIDES", "RPN_STDS", "RCNN_STDS", "ConvBlock", "RPNHead",
           "RegionProposalNetwork", "RoIExtractor", "ConvFCBoxHead", "FCNMaskHead", "paste_masks",
           "StandardRoIHeads", "RoISampler"]

ANCHOR_STRIDES = (4, 8, 16, 32, 64)
"""Strides of the FPN levels P2-P6 the RPN runs on."""
FEATURE_STRIDES = (4, 8, 16, 32)
"""Strides of the levels P2-P5 the RoIs are pooled from."""
FINEST_SCALE = 56
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


class ConvBlock(nn.Module):
    """mmcv's ``ConvModule``: conv (no bias when normalised), optional BatchNorm, ReLU; keys ``conv``, ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x)


class RPNHead(nn.Module):
    """``(objectness logits per level (B, A, H, W), deltas per level (B, 4A, H, W))`` of FPN features."""

    def __init__(self, channels: int, num_anchors: int = 3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        scores, deltas = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            scores.append(self.rpn_cls(x))
            deltas.append(self.rpn_reg(x))
        return scores, deltas


def _flat(maps: Sequence[torch.Tensor], per_anchor: int) -> List[torch.Tensor]:
    """``(B, A * k, H, W)`` maps as ``(B, H * W * A, k)`` (location-major, anchor-minor, as the anchors)."""
    return [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, per_anchor) for m in maps]


class RegionProposalNetwork(nn.Module):
    """Proposals (and their losses in training) from the FPN levels; see the module docstring.

    Args:
        head: :class:`RPNHead`.
        anchors: one anchor set per level of ``features``.
        pre_nms_top_n, post_nms_top_n: ``{"training": n, "testing": n}``: anchors kept per level before
            the NMS, proposals kept per image after it.
        box_loss: ``"l1"`` or ``"smooth_l1"`` (beta 1/9).
    """

    def __init__(self, head: RPNHead, anchors: GridAnchors, pre_nms_top_n: Dict[str, int],
                 post_nms_top_n: Dict[str, int], nms_thresh: float = 0.7, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 box_loss: str = "l1"):
        super().__init__()
        if box_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"box_loss must be 'l1' or 'smooth_l1', got {box_loss!r}")
        self.head = head
        self.anchors = anchors
        self.pre_nms_top_n = dict(pre_nms_top_n)
        self.post_nms_top_n = dict(post_nms_top_n)
        self.nms_thresh = nms_thresh
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_loss = box_loss

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def proposals(self, scores: List[torch.Tensor], deltas: List[torch.Tensor], anchors: List[torch.Tensor],
                  img_shape: Tuple[int, int]) -> torch.Tensor:
        """Proposals ``(n, 4)`` of one image from its per-level scores ``(HWA,)``, deltas ``(HWA, 4)`` and
        anchors ``(HWA, 4)``, best first."""
        pre_nms = self.pre_nms_top_n[self._mode()]
        kept_scores, kept_deltas, kept_anchors, levels = [], [], [], []
        for level, (s, d, a) in enumerate(zip(scores, deltas, anchors)):
            s = s.sigmoid()
            if s.numel() > pre_nms:
                s, order = s.sort(descending=True)  # mmdet sorts (not topk): the same order among ties
                s, order = s[:pre_nms], order[:pre_nms]
                d, a = d[order], a[order]
            kept_scores.append(s)
            kept_deltas.append(d)
            kept_anchors.append(a)
            levels.append(torch.full_like(s, level, dtype=torch.int64))
        boxes = delta_to_boxes(torch.cat(kept_anchors), torch.cat(kept_deltas), RPN_STDS, max_shape=img_shape)
        keep = batched_nms(boxes, torch.cat(kept_scores), torch.cat(levels), self.nms_thresh)
        return boxes[keep[: self.post_nms_top_n[self._mode()]]]

    def forward(self, features: List[torch.Tensor], metas: List[ImageMeta],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None
                ) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
        score_maps, delta_maps = self.head(features)
        anchors = self.anchors.grid([tuple(f.shape[-2:]) for f in features])
        anchors = [a.to(features[0].dtype) for a in anchors]
        scores = [s[..., 0] for s in _flat(score_maps, 1)]
        deltas = _flat(delta_maps, 4)
        with torch.no_grad():  # proposals are inputs of the second stage, not trained through it
            proposals = [self.proposals([s[i].detach().float() for s in scores],
                                        [d[i].detach().float() for d in deltas],
                                        [a.float() for a in anchors], meta.img_shape)
                         for i, meta in enumerate(metas)]
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training")
            losses = self.loss(torch.cat(scores, 1), torch.cat(deltas, 1), torch.cat(anchors), targets)
        return proposals, losses

    def loss(self, scores: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor,
             targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Objectness (binary cross-entropy) and box losses over the sampled anchors, both divided by the
        number of samples (mmdet's ``avg_factor``)."""
        labels, regression = [], []
        for target in targets:
            gt = target["boxes"].to(anchors)
            if gt.numel() == 0:
                labels.append(torch.zeros(len(anchors), device=anchors.device))
                regression.append(torch.zeros_like(anchors))
                continue
            matched = self.matcher(box_iou(gt, anchors))
            label = (matched >= 0).to(anchors)
            label[matched == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
            labels.append(label)
            regression.append(boxes_to_delta(anchors, gt[matched.clamp(min=0)], RPN_STDS))
        positive, negative = self.sampler(labels)
        positive = torch.cat(positive).bool()
        sampled = positive | torch.cat(negative).bool()
        count = max(int(sampled.sum()), 1)
        cls_loss = F.binary_cross_entropy_with_logits(scores.flatten()[sampled], torch.cat(labels)[sampled],
                                                      reduction="sum") / count
        pred, target = deltas.reshape(-1, 4)[positive], torch.cat(regression)[positive]
        if self.box_loss == "l1":
            box_loss = F.l1_loss(pred, target, reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")
        return {"loss_objectness": cls_loss, "loss_rpn_box_reg": box_loss / count}


def _rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n, 5)`` rows ``[image index, x1, y1, x2, y2]`` (mmdet's ``bbox2roi``)."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b[:, :4]], 1) for i, b in enumerate(boxes)])


class RoIExtractor(nn.Module):
    """RoI features ``(n, C, size, size)`` of boxes given per image, each pooled from one level (mmdet's
    ``SingleRoIExtractor``: see the module docstring)."""

    def __init__(self, output_size: int, strides: Sequence[int] = FEATURE_STRIDES, finest_scale: int = FINEST_SCALE):
        super().__init__()
        self.output_size = output_size
        self.strides = tuple(strides)
        self.finest_scale = finest_scale

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        rois = _rois(boxes).float()
        levels = self.levels(rois[:, 1:])
        size = self.output_size
        out = features[0].new_zeros((len(rois), features[0].shape[1], size, size), dtype=torch.float32)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = (levels == level).nonzero(as_tuple=False).squeeze(1)
            if index.numel():
                out[index] = roi_align(feature.float(), rois[index], size, spatial_scale=1 / stride,
                                       sampling_ratio=0, aligned=True)
        return out


class ConvFCBoxHead(nn.Module):
    """Box head: ``num_convs`` 3x3 convs (BatchNorm, ReLU), ``num_fcs`` FCs (ReLU), then ``fc_cls``
    ``(n, num_classes + 1)`` (background last) and ``fc_reg`` ``(n, 4 * num_classes)``.

    ``num_convs=0, num_fcs=2``: mmdet's ``Shared2FCBBoxHead``; ``num_convs=4, num_fcs=1``: the cascade's
    ``ConvFCBBoxHead`` (4conv1fc)."""

    def __init__(self, num_classes: int, in_channels: int = 256, roi_size: int = 7, num_convs: int = 0,
                 num_fcs: int = 2, conv_channels: int = 256, fc_channels: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.shared_convs = nn.ModuleList(ConvBlock(in_channels if i == 0 else conv_channels, conv_channels, 3, True)
                                          for i in range(num_convs))
        flat = (conv_channels if num_convs else in_channels) * roi_size ** 2
        self.shared_fcs = nn.ModuleList(nn.Linear(flat if i == 0 else fc_channels, fc_channels)
                                        for i in range(num_fcs))
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """Mask logits ``(n, num_classes, 2 * size, 2 * size)`` of RoI features ``(n, C, size, size)``."""

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(ConvBlock(in_channels if i == 0 else channels, channels, 3)
                                   for i in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mask probabilities ``(n, h, w)`` pasted into ``boxes (n, 4)`` of a ``height x width`` image:
    ``(n, 1, height, width)``.

    mmdet's CPU path of ``_do_paste_mask`` (one mask at a time, ``skip_empty``): bilinear samples
    (``grid_sample``, zero outside the mask) at the pixel centres within the box widened to whole pixels
    plus one; pixels farther away stay 0 (the samples there are below 0.5 anyway)."""
    out = probs.new_zeros((len(probs), 1, height, width), dtype=torch.float32)
    for k in range(len(probs)):
        box = boxes[k:k + 1].float()
        x0_int, y0_int = (box.min(dim=0).values.floor()[:2] - 1).clamp(min=0).to(torch.int32).tolist()
        x1_int = int((box[:, 2].max().ceil() + 1).clamp(max=width).to(torch.int32))
        y1_int = int((box[:, 3].max().ceil() + 1).clamp(max=height).to(torch.int32))
        x0, y0, x1, y1 = box.split(1, dim=1)
        img_y = torch.arange(y0_int, y1_int, device=box.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=box.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)  # a box of zero width
        img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
        grid = torch.stack([img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1)),
                            img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))], dim=3)
        pasted = F.grid_sample(probs[k][None, None].float(), grid, align_corners=False)
        out[k, 0, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0]
    return out


class RoISampler(nn.Module):
    """Training RoIs of one R-CNN stage: the proposals plus the ground truth, matched at ``iou_thresh``, then
    ``batch_size_per_image`` sampled with at most ``positive_fraction`` positives (mmdet's ``MaxIoUAssigner``
    + ``RandomSampler`` with ``add_gt_as_proposals``)."""

    def __init__(self, num_classes: int, iou_thresh: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = det_utils.Matcher(iou_thresh, iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)

    def forward(self, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Per image: the sampled RoIs, their class (``0..K-1``, ``K`` = background), matched ground-truth
        index and whether the RoI is a ground-truth box."""
        boxes, labels, matched, is_gt = [], [], [], []
        for props, target in zip(proposals, targets):
            gt = target["boxes"].to(props)
            rois = torch.cat([props, gt])
            gt_flag = torch.cat([torch.zeros(len(props), dtype=torch.bool, device=props.device),
                                 torch.ones(len(gt), dtype=torch.bool, device=props.device)])
            if gt.numel() == 0:
                index = torch.zeros(len(rois), dtype=torch.int64, device=props.device)
                label = torch.full_like(index, self.num_classes)
            else:
                index = self.matcher(box_iou(gt, rois))
                label = target["labels"].to(torch.int64)[index.clamp(min=0)] - 1  # datasets count from 1
                label[index < 0] = self.num_classes
                index = index.clamp(min=0)
            boxes.append(rois)
            labels.append(label)
            matched.append(index)
            is_gt.append(gt_flag)
        positive, negative = self.sampler([(lab < self.num_classes).to(torch.int64) for lab in labels])
        keep = [torch.where(p.bool() | n.bool())[0] for p, n in zip(positive, negative)]
        return ([b[k] for b, k in zip(boxes, keep)], [lab[k] for lab, k in zip(labels, keep)],
                [m[k] for m, k in zip(matched, keep)], [g[k] for g, k in zip(is_gt, keep)])


def class_deltas(deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 4 deltas of each row's class from class-specific deltas ``(n, 4 * K)``."""
    return deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels]


def mask_loss(logits: torch.Tensor, boxes: List[torch.Tensor], labels: List[torch.Tensor],
              matched: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """Binary cross-entropy of the positive RoIs' mask logits of their class (torchvision's mask targets)."""
    positive = [lab < logits.shape[1] for lab in labels]
    return maskrcnn_loss(logits, [b[p] for b, p in zip(boxes, positive)], [t["masks"] for t in targets],
                         [t["labels"].to(torch.int64) - 1 for t in targets], [m[p] for m, p in zip(matched, positive)])


class StandardRoIHeads(nn.Module):
    """Faster / Mask R-CNN's second stage (mmdet's ``StandardRoIHead``), see the module docstring.

    In eval, ``forward`` returns one ``{"boxes", "scores", "labels" (1..K)[, "masks" (k, 1, H, W)]}`` per
    image in original-image coordinates; in training ``([], losses)``."""

    def __init__(self, box_head: ConvFCBoxHead, mask_head: Optional[FCNMaskHead] = None, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, iou_thresh: float = 0.5):
        super().__init__()
        self.num_classes = box_head.num_classes
        self.box_roi_extractor = RoIExtractor(7)
        self.box_head = box_head
        self.mask_roi_extractor = RoIExtractor(14) if mask_head is not None else None
        self.mask_head = mask_head
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.sampler = RoISampler(self.num_classes, iou_thresh, batch_size_per_image, positive_fraction)

    def has_mask(self) -> bool:
        return self.mask_head is not None

    def detect(self, rois: List[torch.Tensor], scores: torch.Tensor, deltas: torch.Tensor, metas: List[ImageMeta],
               stds: Sequence[float]) -> List[Dict[str, torch.Tensor]]:
        """mmdet's ``BBoxHead.get_bboxes(rescale=True)`` + ``multiclass_nms`` per image, labels from 1."""
        result = []
        counts = [len(r) for r in rois]
        for r, s, d, meta in zip(rois, scores.split(counts), deltas.split(counts), metas):
            probs = F.softmax(s.float(), dim=-1)
            boxes = delta_to_boxes(r, d.float(), stds, max_shape=meta.img_shape)
            boxes = boxes / meta.scale_factor.to(boxes).repeat(boxes.shape[-1] // 4)
            boxes, probs, labels = multiclass_nms(boxes, probs, self.score_thresh, self.nms_thresh,
                                                  self.detections_per_img)
            result.append(dict(boxes=boxes, scores=probs, labels=labels + 1))
        return result

    def add_masks(self, features: List[torch.Tensor], result: List[Dict[str, torch.Tensor]], metas: List[ImageMeta],
                  mask_heads: Sequence[FCNMaskHead]) -> None:
        """``masks`` of every detection: the mask heads' sigmoid outputs (averaged when several) on the boxes
        mapped back to the network input, pasted on the original image."""
        mask_rois = [r["boxes"] * m.scale_factor.to(r["boxes"]) for r, m in zip(result, metas)]
        if sum(len(b) for b in mask_rois) == 0:
            for r, m in zip(result, metas):
                r["masks"] = r["boxes"].new_zeros((0, 1, *m.ori_shape))
            return
        roi_features = self.mask_roi_extractor(features, mask_rois)
        probs = None
        for head in mask_heads:
            p = head(roi_features).float().sigmoid()
            probs = p if probs is None else probs + p
        if len(mask_heads) > 1:
            probs = probs / len(mask_heads)
        for r, m, boxes, p in zip(result, metas, mask_rois, probs.split([len(b) for b in mask_rois])):
            p = p[torch.arange(len(p), device=p.device), r["labels"] - 1]
            r["masks"] = paste_masks(p, boxes / m.scale_factor.to(boxes), *m.ori_shape)

    def forward(self, features: List[torch.Tensor], proposals: List[torch.Tensor], metas: List[ImageMeta],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training")
            return [], self.loss(features, proposals, targets)
        scores, deltas = self.box_head(self.box_roi_extractor(features, proposals))
        result = self.detect(proposals, scores, deltas, metas, RCNN_STDS)
        if self.has_mask():
            self.add_masks(features, result, metas, [self.mask_head])
        return result, {}

    def loss(self, features: List[torch.Tensor], proposals: List[torch.Tensor],
             targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Cross-entropy over the sampled RoIs, L1 on the positives' class deltas (targets scaled by the
        stds), both divided by the number of samples; the mask loss on the positives."""
        rois, labels, matched, _ = self.sampler(proposals, targets)
        scores, deltas = self.box_head(self.box_roi_extractor(features, rois))
        label = torch.cat(labels)
        gt = torch.cat([t["boxes"].to(r)[m] if len(t["boxes"]) else torch.zeros_like(r)
                        for t, m, r in zip(targets, matched, rois)])
        positive = torch.where(label < self.num_classes)[0]
        target = boxes_to_delta(torch.cat(rois)[positive], gt[positive], RCNN_STDS)
        pred = class_deltas(deltas, label.clamp(max=self.num_classes - 1))[positive]
        losses = {"loss_classifier": F.cross_entropy(scores, label),
                  "loss_box_reg": F.l1_loss(pred, target, reduction="sum") / max(len(label), 1)}
        if self.has_mask():
            logits = self.mask_head(self.mask_roi_extractor(features, [r[lab < self.num_classes] for r, lab in
                                                                       zip(rois, labels)]))
            losses["loss_mask"] = mask_loss(logits, rois, labels, matched, targets)
        return losses


def check_anchor_sizes(sizes: Sequence[float], strides: Sequence[int] = ANCHOR_STRIDES) -> float:
    """The anchor scale (size / stride, the same at every level, as mmdet's ``AnchorGenerator(scales=[s])``)
    of per-level anchor sizes; ``ValueError`` when the sizes are not one scale times the strides."""
    if len(sizes) != len(strides):
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({len(strides)}), got {list(sizes)}")
    scale = sizes[0] / strides[0]
    if any(not math.isclose(size, scale * stride) for size, stride in zip(sizes, strides)):
        raise ValueError(f"anchor_sizes must be one scale times the level strides {list(strides)} "
                         f"(e.g. {[int(8 * s) for s in strides]}), got {list(sizes)}")
    return scale
