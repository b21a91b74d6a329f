"""torchvision detectors on an RMT backbone with an FPN neck.

``build_detector(arch, backbone="rmt_t", num_classes=80)`` returns a torchvision model with the
usual contract: ``model(images, targets)`` in train mode returns a dict of losses; in eval mode
``model(images)`` returns one ``{"boxes", "labels", "scores"[, "masks"]}`` dict per image, in the
original image coordinates. ``images`` are float ``(3, H, W)`` tensors in [0, 1] of any size: the
model normalises (ImageNet mean/std), resizes (short side ``min_size`` -- one picked at random per
image in training when several are given --, long side at most ``max_size``) and pads them.

Labels are ``1..num_classes``; 0 is the background (RetinaNet included, so that all detectors
share one label space).

==================  ==========================================================================
``faster_rcnn``     FPN P2-P6 (max-pool P6), RPN, RoIAlign 7x7, two-FC box head
``mask_rcnn``       Faster R-CNN + mask head (4 convs, RoIAlign 14x14, 28x28 masks)
``cascade_mask_rcnn``  three box stages at IoU 0.5/0.6/0.7 (:mod:`rmt.detection.cascade`) + mask head
``retinanet``       FPN P3-P7 (P6 from C5, as the reference's ``add_extra_convs='on_input'``), focal loss
==================  ==========================================================================
"""
from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from ..errors import RMTError, did_you_mean
from ..models.backbone import RMTBackbone
from ..models.weights import read_weights
from ..training.config import config_from_dict
from .cascade import AgnosticBoxPredictor, CascadeRoIHeads
from .config import ARCHS, DetConfig
from .retinanet import RetinaNet, RMTWithRetinaFPN, retina_anchors

__all__ = ["ARCHS", "build_detector", "RMTWithFPN", "has_masks", "detector_kwargs",
           "detector_from_checkpoint"]


class RMTWithFPN(nn.Module):
    """An :class:`RMTBackbone` followed by torchvision's FPN; ``out_channels`` as torchvision expects."""

    def __init__(self, body: RMTBackbone, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def has_masks(model: nn.Module) -> bool:
    """Whether a detector predicts instance masks."""
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and roi_heads.has_mask()


def _anchors(sizes: Sequence[int], octaves: bool) -> AnchorGenerator:
    if octaves:  # RetinaNet: three scales per octave at each level
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    else:
        per_level = tuple((int(s),) for s in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))


def _box_head(kind: str, channels: int = 256, resolution: int = 7) -> nn.Module:
    """R-CNN box head; its widths scale with the FPN's (256 -> 256-channel convs, 1024-d FCs)."""
    if kind == "2fc":
        return TwoMLPHead(channels * resolution ** 2, 4 * channels)
    if kind == "4conv1fc":
        return FastRCNNConvFCHead((channels, resolution, resolution), [channels] * 4, [4 * channels],
                                  norm_layer=nn.BatchNorm2d)
    raise RMTError(f"box_head must be '2fc' or '4conv1fc', got {kind!r}")


def _checked_kwargs(cls, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Detector keyword arguments, checked against what ``cls`` and its parents accept."""
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    accepted -= {"self", "backbone", "num_classes", "kwargs"}
    for key in kwargs:
        if key not in accepted:
            raise RMTError(f"{cls.__name__} has no option {key!r}{did_you_mean(key, accepted)}")
    return kwargs


def build_detector(arch: str, backbone: str = "rmt_t", num_classes: int = 80,
                   backbone_weights: Optional[str | os.PathLike] = None,
                   anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                   box_head: Optional[str] = "auto", box_loss: str = "smooth_l1", neck_channels: int = 256,
                   backbone_kwargs: Optional[Dict[str, Any]] = None, **detector_kwargs) -> nn.Module:
    """A torchvision detector with an RMT backbone (see the module docstring).

    Args:
        arch: ``mask_rcnn``, ``faster_rcnn``, ``retinanet`` or ``cascade_mask_rcnn``.
        backbone: RMT variant.
        num_classes: object classes, without the background.
        backbone_weights: ImageNet weights for the backbone; the load report (missing/unexpected
            keys) is logged and kept in ``model.backbone.body.load_report``.
        anchor_sizes: anchor size at each pyramid level (5 levels; RetinaNet adds two octave steps).
        box_head: R-CNN box head: ``2fc`` (two 1024-d FCs) or ``4conv1fc`` (4 convs with BatchNorm
            and one FC); ``auto``/None: ``4conv1fc`` for the cascade (as the reference), else ``2fc``.
        box_loss: cascade box loss, ``smooth_l1`` or ``giou``.
        neck_channels: FPN width (256 in the reference); the RoI heads follow it (box-head FCs
            ``4 * neck_channels`` wide, mask-head and conv box-head convs ``neck_channels``). Smaller
            values make CPU demos affordable.
        backbone_kwargs: :class:`rmt.models.RMTBackbone` options (``frozen_stages``, ``norm_eval``,
            ``drop_path_rate``, ``decomposed``, ``grad_checkpointing``).
        detector_kwargs: torchvision options (``min_size``, ``max_size``, ``box_score_thresh``,
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ...; for RetinaNet
            ``score_thresh``, ``detections_per_img``, ...).
    """
    if arch not in ARCHS:
        raise RMTError(f"unknown detector {arch!r}{did_you_mean(arch, ARCHS)}; choose from {', '.join(ARCHS)}")
    if num_classes < 1:
        raise RMTError(f"num_classes must be positive, got {num_classes}")
    if len(anchor_sizes) != 5:
        raise RMTError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
    if "min_size" in detector_kwargs:
        detector_kwargs["min_size"] = tuple(detector_kwargs["min_size"]) if isinstance(
            detector_kwargs["min_size"], (list, tuple)) else detector_kwargs["min_size"]
    if neck_channels < 1:
        raise RMTError(f"neck_channels must be positive, got {neck_channels}")
    backbone_kwargs = dict(backbone_kwargs or {})
    classes = num_classes + 1  # + background
    width = int(neck_channels)
    if arch == "retinanet":
        body = RMTBackbone(backbone, out_indices=(1, 2, 3), weights=backbone_weights, **backbone_kwargs)
        return RetinaNet(RMTWithRetinaFPN(body, width), num_classes, anchor_generator=retina_anchors(anchor_sizes),
                         **_checked_kwargs(RetinaNet, detector_kwargs))
    body = RMTBackbone(backbone, out_indices=(0, 1, 2, 3), weights=backbone_weights, **backbone_kwargs)
    fpn = RMTWithFPN(body, width, LastLevelMaxPool())
    anchors = _anchors(anchor_sizes, octaves=False)
    if box_head in (None, "auto"):
        box_head = "4conv1fc" if arch == "cascade_mask_rcnn" else "2fc"
    # torchvision takes num_classes=None when the predictors are given (they carry the class count)
    if arch == "faster_rcnn":
        return FasterRCNN(fpn, None, rpn_anchor_generator=anchors, box_head=_box_head(box_head, width),
                          box_predictor=FastRCNNPredictor(4 * width, classes),
                          **_checked_kwargs(FasterRCNN, detector_kwargs))
    mask_parts = dict(mask_head=MaskRCNNHeads(width, [width] * 4, 1),
                      mask_predictor=MaskRCNNPredictor(width, width, classes))
    if arch == "mask_rcnn":
        return MaskRCNN(fpn, None, rpn_anchor_generator=anchors, box_head=_box_head(box_head, width),
                        box_predictor=FastRCNNPredictor(4 * width, classes), **mask_parts,
                        **_checked_kwargs(MaskRCNN, detector_kwargs))
    # cascade: a Mask R-CNN whose RoI heads are replaced by the cascade's (the placeholders are never used)
    model = MaskRCNN(fpn, None, rpn_anchor_generator=anchors, box_head=nn.Identity(), box_predictor=nn.Identity(),
                     **mask_parts, **_checked_kwargs(MaskRCNN, detector_kwargs))
    rh = model.roi_heads
    heads = [_box_head(box_head, width) for _ in range(3)]
    model.roi_heads = CascadeRoIHeads(
        rh.box_roi_pool, heads, [AgnosticBoxPredictor(4 * width, classes) for _ in heads], box_loss=box_loss,
        batch_size_per_image=rh.fg_bg_sampler.batch_size_per_image,
        positive_fraction=rh.fg_bg_sampler.positive_fraction,
        score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh, detections_per_img=rh.detections_per_img,
        mask_roi_pool=rh.mask_roi_pool, mask_head=rh.mask_head, mask_predictor=rh.mask_predictor)
    return model


def detector_kwargs(cfg) -> Dict[str, Any]:
    """:func:`build_detector` keyword arguments from a :class:`rmt.detection.config.DetConfig` (without
    ``num_classes`` and weights)."""
    kwargs: Dict[str, Any] = dict(
        backbone=cfg.backbone, anchor_sizes=tuple(cfg.anchor_sizes), min_size=tuple(cfg.min_size),
        max_size=cfg.max_size, neck_channels=cfg.neck_channels,
        backbone_kwargs=dict(frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, drop_path_rate=cfg.drop_path,
                             decomposed=cfg.decomposed, grad_checkpointing=cfg.grad_checkpointing))
    if cfg.arch == "retinanet":
        kwargs.update(score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_img)
    else:
        kwargs.update(box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
                      box_batch_size_per_image=cfg.box_batch_size_per_image, box_head=cfg.box_head,
                      rpn_post_nms_top_n_train=cfg.rpn_post_nms_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
                      box_loss=cfg.box_loss)
    return kwargs


def detector_from_checkpoint(path: str | os.PathLike) -> Tuple[nn.Module, DetConfig, List[str]]:
    """``(model in eval mode, DetConfig, class names)`` from a detection run's ``model.safetensors`` or
    ``best.pth``/``last.pth``."""
    state, meta = read_weights(path, task="detection")
    cfg = config_from_dict(DetConfig, meta["config"])
    class_names = list(meta["class_names"])
    model = build_detector(cfg.arch, num_classes=len(class_names), **detector_kwargs(cfg))
    model.load_state_dict(state)
    return model.eval(), cfg, class_names
