"""Cascade Mask R-CNN's second stage as the official RMT config builds it (mmdet 2.11 ``CascadeRoIHead``,
``detect/configs/_base_/models/RMT_cas_rcnn.py``; Cai & Vasconcelos, 2018).

Three box stages, each a 4conv1fc :class:`rmt.detection.rcnn.ConvFCBoxHead` with class-specific
regression and its own target stds (:data:`CASCADE_STDS`), and one :class:`rmt.detection.rcnn.FCNMaskHead`
per stage (keys ``box_heads.i`` / ``mask_heads.i`` = mmdet's ``bbox_head.i`` / ``mask_head.i``).

* inference: stage i scores the current RoIs; between stages the RoIs are regressed with the deltas of
  the argmax non-background class of that stage's scores (clipped to the resized image). The final
  scores are the softmax of the mean of the three stages' raw class logits; the boxes the last stage's
  deltas on the last stage's RoIs; then ``multiclass_nms``. The three mask heads run on the final
  boxes and their sigmoid outputs are averaged before pasting.
* training: each stage matches its RoIs (plus the ground truth) at IoU 0.5 / 0.6 / 0.7 and samples 512
  a quarter positive; cross-entropy, a GIoU loss (x10) on the decoded boxes and the mask loss of its
  positives, weighted 1 / 0.5 / 0.25; the next stage gets the RoIs refined by this stage (the ground-truth
  boxes removed, as mmdet's ``refine_bboxes``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .ops import ImageMeta, delta_to_boxes
from .rcnn import ConvFCBoxHead, FCNMaskHead, RoIExtractor, RoISampler, StandardRoIHeads, class_deltas, mask_loss

__all__ = ["CascadeRoIHeads", "CASCADE_IOUS", "CASCADE_STDS", "CASCADE_LOSS_WEIGHTS", "GIOU_LOSS_WEIGHT"]

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
"""Target standard deviations of each stage's box deltas (the config's ``target_stds``)."""
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
GIOU_LOSS_WEIGHT = 10.0


class CascadeRoIHeads(StandardRoIHeads):
    """The cascade's box stages and mask heads; see the module docstring. ``box_heads`` / ``mask_heads``:
    one per stage (``mask_heads`` may be None: no masks)."""

    def __init__(self, box_heads: Sequence[ConvFCBoxHead], mask_heads: Optional[Sequence[FCNMaskHead]] = None,
                 iou_thresholds: Sequence[float] = CASCADE_IOUS, stds: Sequence[Sequence[float]] = CASCADE_STDS,
                 stage_loss_weights: Sequence[float] = CASCADE_LOSS_WEIGHTS, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25):
        stages = len(box_heads)
        if not (len(iou_thresholds) == len(stds) == len(stage_loss_weights) == stages) or (
                mask_heads is not None and len(mask_heads) != stages):
            raise ValueError("box_heads, mask_heads, iou_thresholds, stds and stage_loss_weights need one entry "
                             "per stage")
        super().__init__(box_heads[0], None, score_thresh, nms_thresh, detections_per_img, batch_size_per_image,
                         positive_fraction, iou_thresholds[0])
        del self.box_head, self.sampler
        self.box_heads = nn.ModuleList(box_heads)
        self.mask_heads = nn.ModuleList(mask_heads) if mask_heads is not None else None
        self.mask_roi_extractor = RoIExtractor(14) if mask_heads is not None else None
        self.samplers = nn.ModuleList(RoISampler(self.num_classes, t, batch_size_per_image, positive_fraction)
                                      for t in iou_thresholds)
        self.stds = tuple(tuple(s) for s in stds)
        self.stage_loss_weights = tuple(stage_loss_weights)

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def has_mask(self) -> bool:
        return self.mask_heads is not None

    def refine(self, stage: int, rois: List[torch.Tensor], deltas: torch.Tensor, labels: torch.Tensor,
               metas: List[ImageMeta]) -> List[torch.Tensor]:
        """mmdet's ``regress_by_class``: each RoI moved by the deltas of ``labels`` (``0..K-1``), clipped."""
        chosen = class_deltas(deltas.float(), labels)
        return [delta_to_boxes(r, d, self.stds[stage], max_shape=m.img_shape)
                for r, d, m in zip(rois, chosen.split([len(r) for r in rois]), metas)]

    def forward(self, features: List[torch.Tensor], proposals: List[torch.Tensor], metas: List[ImageMeta],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training")
            return [], self.loss(features, proposals, targets, metas)
        rois, stage_scores = proposals, []
        for stage, head in enumerate(self.box_heads):
            scores, deltas = head(self.box_roi_extractor(features, rois))
            stage_scores.append(scores.float())
            if stage + 1 < self.num_stages:
                rois = self.refine(stage, rois, deltas, scores[:, :-1].argmax(dim=1), metas)
        mean_scores = sum(stage_scores) / float(self.num_stages)
        result = self.detect(rois, mean_scores, deltas, metas, self.stds[-1])
        if self.has_mask():
            self.add_masks(features, result, metas, list(self.mask_heads))
        return result, {}

    def loss(self, features: List[torch.Tensor], proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]],
             metas: List[ImageMeta]) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        boxes = proposals
        for stage, (head, sampler) in enumerate(zip(self.box_heads, self.samplers)):
            rois, labels, matched, is_gt = sampler(boxes, targets)
            scores, deltas = head(self.box_roi_extractor(features, rois))
            label = torch.cat(labels)
            gt = torch.cat([t["boxes"].to(r)[m] if len(t["boxes"]) else torch.zeros_like(r)
                            for t, m, r in zip(targets, matched, rois)])
            positive = torch.where(label < self.num_classes)[0]
            pred = delta_to_boxes(torch.cat(rois)[positive],
                                  class_deltas(deltas, label.clamp(max=self.num_classes - 1))[positive],
                                  self.stds[stage])
            weight = self.stage_loss_weights[stage]
            box_loss = generalized_box_iou_loss(pred, gt[positive], reduction="sum") / max(len(label), 1)
            losses[f"loss_classifier_s{stage + 1}"] = weight * F.cross_entropy(scores, label)
            losses[f"loss_box_reg_s{stage + 1}"] = weight * GIOU_LOSS_WEIGHT * box_loss
            if self.has_mask():
                logits = self.mask_heads[stage](self.mask_roi_extractor(
                    features, [r[lab < self.num_classes] for r, lab in zip(rois, labels)]))
                losses[f"loss_mask_s{stage + 1}"] = weight * mask_loss(logits, rois, labels, matched, targets)
            if stage + 1 < self.num_stages:
                with torch.no_grad():  # positives move by their class's deltas, the others by their best class's
                    chosen = torch.where(label < self.num_classes, label, scores[:, :-1].argmax(dim=1))
                    refined = self.refine(stage, rois, deltas.detach(), chosen, metas)
                boxes = [r[~g] for r, g in zip(refined, is_gt)]
        return losses
