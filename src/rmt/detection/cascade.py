"""Cascade R-CNN box stages on torchvision's RoI heads (Cai & Vasconcelos, 2018).

:class:`CascadeRoIHeads` is a drop-in for torchvision's ``RoIHeads`` inside a ``MaskRCNN``: it
reuses its RoI pooling, sampling, post-processing and mask pieces, and runs three box stages:

* training: stage 1 matches the RPN proposals (plus the ground-truth boxes) at IoU 0.5 and samples
  512 RoIs a quarter positive; each later stage takes the previous stage's sampled RoIs, refined by
  its (detached) regression, and labels them at a stricter IoU (0.6, then 0.7) without
  re-sampling. Each stage has its own box head, a classifier and a class-agnostic box regressor
  with tighter target scaling (``bbox_reg_weights``), and its losses weighted 1, 0.5, 0.25. The
  mask head trains on stage 1's positive RoIs.
* inference: boxes pass through the three stages; the class scores are the mean of the three
  stages' softmax scores, the boxes are the last stage's regression; then per-class NMS, and the
  mask head on the final boxes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

__all__ = ["CascadeRoIHeads", "AgnosticBoxPredictor", "CASCADE_IOUS", "CASCADE_REG_WEIGHTS",
           "CASCADE_LOSS_WEIGHTS"]

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
"""Inverse target standard deviations of each stage's box deltas (0.1/0.2, 0.05/0.1, 0.033/0.067)."""
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class AgnosticBoxPredictor(nn.Module):
    """Class scores ``(N, num_classes)`` and one class-agnostic box delta ``(N, 4)`` per RoI."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(RoIHeads):
    """Three (or ``len(box_heads)``) cascaded box stages and a mask head; see the module docstring.

    Args:
        box_roi_pool: RoI feature extractor shared by the stages (``MultiScaleRoIAlign``).
        box_heads, box_predictors: one per stage (predictors: :class:`AgnosticBoxPredictor`).
        iou_thresholds, bbox_reg_weights, stage_loss_weights: one per stage.
        box_loss: ``"smooth_l1"`` on the deltas, or ``"giou"`` (x10) on the decoded boxes.
        Others: as torchvision's ``RoIHeads``.
    """

    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 iou_thresholds: Sequence[float] = CASCADE_IOUS,
                 bbox_reg_weights: Sequence[Sequence[float]] = CASCADE_REG_WEIGHTS,
                 stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS, box_loss: str = "smooth_l1",
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, mask_roi_pool: Optional[nn.Module] = None,
                 mask_head: Optional[nn.Module] = None, mask_predictor: Optional[nn.Module] = None):
        stages = len(box_heads)
        if not (len(box_predictors) == len(iou_thresholds) == len(bbox_reg_weights) == len(stage_loss_weights)
                == stages):
            raise ValueError("box_heads, box_predictors, iou_thresholds, bbox_reg_weights and stage_loss_weights "
                             "need one entry per stage")
        if box_loss not in ("smooth_l1", "giou"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'giou', got {box_loss!r}")
        super().__init__(box_roi_pool, None, None, iou_thresholds[0], iou_thresholds[0], batch_size_per_image,
                         positive_fraction, tuple(bbox_reg_weights[0]), score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor)
        del self.box_head, self.box_predictor
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(w)) for w in bbox_reg_weights]
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.box_loss = box_loss

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    # ------------------------------------------------------------------------------ training
    def _label(self, stage: int, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]
               ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Matched ground-truth index and class label (0: background) of every proposal."""
        matched, labels = [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if gt_boxes.numel() == 0:
                matched.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                labels.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                continue
            idx = self.matchers[stage](box_ops.box_iou(gt_boxes, boxes))
            label = gt_labels[idx.clamp(min=0)].to(torch.int64)
            label[idx < 0] = 0  # no ignore band: stage thresholds are equal for fg and bg
            matched.append(idx.clamp(min=0))
            labels.append(label)
        return matched, labels

    def _stage_loss(self, stage: int, class_logits: torch.Tensor, deltas: torch.Tensor, proposals: List[torch.Tensor],
                    matched: List[torch.Tensor], labels: List[torch.Tensor],
                    targets: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        labels_all = torch.cat(labels)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        gt = torch.cat([t["boxes"][m] if t["boxes"].numel() else torch.zeros_like(p)
                        for t, m, p in zip(targets, matched, proposals)])
        rois = torch.cat(proposals)
        if self.box_loss == "giou":
            pred = self.box_coders[stage].decode_single(deltas[pos], rois[pos])
            loss_box = 10.0 * generalized_box_iou_loss(pred, gt[pos], reduction="sum") / max(labels_all.numel(), 1)
        else:
            reg_targets = self.box_coders[stage].encode_single(gt[pos], rois[pos])
            loss_box = F.smooth_l1_loss(deltas[pos], reg_targets, beta=1 / 9, reduction="sum")
            loss_box = loss_box / max(labels_all.numel(), 1)
        return loss_cls, loss_box

    # ------------------------------------------------------------------------------ stages
    def _run_stage(self, stage: int, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                   image_shapes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.box_roi_pool(features, proposals, image_shapes)
        return self.box_predictors[stage](self.box_heads[stage](x))

    def _refine(self, stage: int, deltas: torch.Tensor, proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        boxes = self.box_coders[stage].decode_single(deltas.detach(), torch.cat(proposals))
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(boxes.split([len(p) for p in proposals]), image_shapes)]

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training")
            return self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes)

    def _forward_train(self, features, proposals, image_shapes, targets):
        self.check_targets(targets)
        losses: Dict[str, torch.Tensor] = {}
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        boxes = self.add_gt_proposals(proposals, gt_boxes)
        matched, labels = self._label(0, boxes, targets)
        keep = self.subsample(labels)
        boxes = [b[k] for b, k in zip(boxes, keep)]
        matched = [m[k] for m, k in zip(matched, keep)]
        labels = [lab[k] for lab, k in zip(labels, keep)]
        first = (boxes, matched, labels)
        for stage in range(self.num_stages):
            if stage > 0:
                matched, labels = self._label(stage, boxes, targets)
            class_logits, deltas = self._run_stage(stage, features, boxes, image_shapes)
            loss_cls, loss_box = self._stage_loss(stage, class_logits, deltas, boxes, matched, labels, targets)
            weight = self.stage_loss_weights[stage]
            losses[f"loss_classifier_s{stage + 1}"] = weight * loss_cls
            losses[f"loss_box_reg_s{stage + 1}"] = weight * loss_box
            if stage + 1 < self.num_stages:
                boxes = self._refine(stage, deltas, boxes, image_shapes)
        if self.has_mask():
            boxes, matched, labels = first
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [b[p] for b, p in zip(boxes, pos)]
            mask_matched = [m[p] for m, p in zip(matched, pos)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets], mask_matched)
        return [], losses

    def _forward_test(self, features, proposals, image_shapes):
        boxes, scores = proposals, []
        for stage in range(self.num_stages):
            class_logits, deltas = self._run_stage(stage, features, boxes, image_shapes)
            scores.append(F.softmax(class_logits, -1))
            boxes = self._refine(stage, deltas, boxes, image_shapes)
        mean_scores = torch.stack(scores).mean(0)
        result = []
        for b, s, shape in zip(boxes, mean_scores.split([len(b) for b in boxes]), image_shapes):
            out_boxes, out_scores, out_labels = self._select(b, s)
            result.append(dict(boxes=out_boxes, scores=out_scores, labels=out_labels))
        if self.has_mask():
            mask_boxes = [r["boxes"] for r in result]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probs
        return result, {}

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor):
        """Every (box, class >= 1) pair above the score threshold, per-class NMS, the top detections."""
        num_classes = scores.shape[1]
        labels = torch.arange(num_classes, device=scores.device).expand_as(scores)[:, 1:].reshape(-1)
        boxes = boxes[:, None].expand(-1, num_classes - 1, 4).reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]
