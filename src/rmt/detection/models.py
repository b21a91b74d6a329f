"""Detectors on an RMT backbone with an FPN neck: the official RMT COCO models (mmdet 2.11 configs in the
official repository's ``detect/configs``), on torchvision's detection frame.

``build_detector(arch, backbone="rmt_t", num_classes=80)`` returns a model with torchvision's contract:
``model(images, targets)`` in train mode returns a dict of losses; in eval mode ``model(images)`` returns
one ``{"boxes", "labels", "scores"[, "masks"]}`` dict per image, in original-image coordinates (``masks``:
``(K, 1, H, W)`` probabilities; a pixel is in the instance when ``>= rmt.detection.ops.MASK_THRESHOLD``).
``images`` are float ``(3, H, W)`` tensors in [0, 1] of any size; :class:`rmt.detection.transform.
DetectionTransform` resizes, normalises and pads them as the official test pipeline does.

Labels are ``1..num_classes`` (the official 0-based label + 1); 0 is the background (never predicted). The
class-specific layers keep the official layout (R-CNN ``fc_cls``: background LAST), and :func:`official_rcnn_state`
maps an official mmdet state dict onto our R-CNN models key for key. Official (mmdet 2.11) checkpoint files load
directly (:func:`detector_from_checkpoint`, :func:`read_official_detector`).

======================  ==================================================================================
``faster_rcnn``         FPN P2-P6 (max-pool P6), RPN (anchors 8 x stride), RoIAlign 7x7, Shared2FC box head
``mask_rcnn``           Faster R-CNN + FCN mask head (4 convs, RoIAlign 14x14, 28x28 masks) = ``maskrcnn_*_1x``
``cascade_mask_rcnn``   three 4conv1fc box stages and three mask heads (:mod:`rmt.detection.cascade`) =
                        ``casrcnn_*_3x``
``retinanet``           FPN P3-P7 (P6, P7 stride-2 convs on C5, P6), focal loss (:mod:`rmt.detection.retinanet`) =
                        ``retinanet_*_1x``
======================  ==================================================================================

The R-CNN parts are in :mod:`rmt.detection.rcnn`, with what they compute at test time and in training.
"""
from __future__ import annotations

import inspect
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

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
from .cascade import CascadeRoIHeads
from .config import ARCHS, DetConfig
from .ops import MASK_THRESHOLD, GridAnchors, ImageMeta
from .rcnn import (
    ANCHOR_STRIDES,
    ConvFCBoxHead,
    FCNMaskHead,
    RegionProposalNetwork,
    RPNHead,
    StandardRoIHeads,
    check_anchor_sizes,
)
from .retinanet import RetinaNet, RMTWithRetinaFPN, official_retinanet_state, retina_anchors
from .transform import DetectionTransform

__all__ = ["ARCHS", "build_detector", "RMTWithFPN", "RCNN", "has_masks", "detector_kwargs", "detector_from_checkpoint",
           "official_rcnn_state", "RCNN_OPTIONS", "read_detector_checkpoint", "init_detector_from",
           "official_detector_state", "read_official_detector", "official_detector_config"]


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


class RCNN(GeneralizedRCNN):
    """A two-stage detector: ``transform`` (:class:`DetectionTransform`), ``backbone`` (:class:`RMTWithFPN`),
    ``rpn`` (:class:`rmt.detection.rcnn.RegionProposalNetwork`) and ``roi_heads``
    (:class:`rmt.detection.rcnn.StandardRoIHeads` or :class:`rmt.detection.cascade.CascadeRoIHeads`), which
    get the images' :class:`rmt.detection.ops.ImageMeta` to clip boxes and rescale them."""

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("targets are needed in training")
        image_list, targets = self.transform(images, targets)
        return self.forward_prepared(image_list.tensors, image_list.metas, targets)

    def forward_prepared(self, batch: torch.Tensor, metas: List[ImageMeta],
                         targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """:meth:`forward` on an already prepared batch ``(B, 3, H, W)`` with its metas (mmdet's
        ``simple_test(img, img_metas, rescale=True)`` in eval)."""
        features = list(self.backbone(batch).values())
        proposals, rpn_losses = self.rpn(features, metas, targets)
        detections, roi_losses = self.roi_heads(features[:-1], proposals, metas, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections


RCNN_OPTIONS: Dict[str, Any] = dict(
    min_size=(800,), max_size=1333, rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_train=None, rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7, rpn_batch_size_per_image=256,
    rpn_positive_fraction=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25, box_score_thresh=0.05,
    box_nms_thresh=0.5, box_detections_per_img=100)
"""The R-CNN options of :func:`build_detector` and their defaults: the official test and training settings
(``rpn_post_nms_top_n_train`` None: 1000, the cascade's 2000; ``rpn_pre_nms_top_n_*`` per pyramid level)."""


def _build_rcnn(arch: str, fpn: RMTWithFPN, num_classes: int, anchor_sizes: Sequence[float], width: int,
                options: Dict[str, Any]) -> RCNN:
    unknown = set(options) - set(RCNN_OPTIONS)
    for key in sorted(unknown):
        raise RMTError(f"{arch} has no option {key!r}{did_you_mean(key, RCNN_OPTIONS)}")
    opts = {**RCNN_OPTIONS, **options}
    try:
        scale = check_anchor_sizes(anchor_sizes)
    except ValueError as e:
        raise RMTError(str(e)) from None
    cascade = arch == "cascade_mask_rcnn"
    post_train = opts["rpn_post_nms_top_n_train"] or (2000 if cascade else 1000)
    rpn = RegionProposalNetwork(
        RPNHead(width), GridAnchors(ANCHOR_STRIDES, scales=(scale,)),
        dict(training=opts["rpn_pre_nms_top_n_train"], testing=opts["rpn_pre_nms_top_n_test"]),
        dict(training=post_train, testing=opts["rpn_post_nms_top_n_test"]), opts["rpn_nms_thresh"],
        opts["rpn_batch_size_per_image"], opts["rpn_positive_fraction"], box_loss="smooth_l1" if cascade else "l1")
    # the heads' widths follow the FPN's: 256 -> 256-channel convs and 1024-d FCs, as the configs
    test = dict(score_thresh=opts["box_score_thresh"], nms_thresh=opts["box_nms_thresh"],
                detections_per_img=opts["box_detections_per_img"],
                batch_size_per_image=opts["box_batch_size_per_image"], positive_fraction=opts["box_positive_fraction"])
    if cascade:
        box_heads = [ConvFCBoxHead(num_classes, width, num_convs=4, num_fcs=1, conv_channels=width,
                                   fc_channels=4 * width) for _ in range(3)]
        roi_heads = CascadeRoIHeads(box_heads, [FCNMaskHead(num_classes, width, width) for _ in range(3)], **test)
    else:
        mask_head = FCNMaskHead(num_classes, width, width) if arch == "mask_rcnn" else None
        roi_heads = StandardRoIHeads(ConvFCBoxHead(num_classes, width, fc_channels=4 * width), mask_head, **test)
    return RCNN(fpn, rpn, roi_heads, DetectionTransform(tuple(opts["min_size"]), opts["max_size"]))


def build_detector(arch: str, backbone: str = "rmt_t", num_classes: int = 80,
                   backbone_weights: Optional[str | os.PathLike] = None,
                   anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), neck_channels: int = 256,
                   backbone_kwargs: Optional[Dict[str, Any]] = None, **detector_kwargs) -> nn.Module:
    """A detector with an RMT backbone (see the module docstring).

    Args:
        arch: ``mask_rcnn``, ``faster_rcnn``, ``retinanet`` or ``cascade_mask_rcnn``.
        backbone: RMT variant.
        num_classes: object classes, without the background.
        backbone_weights: ImageNet weights for the backbone; the load report (missing/unexpected
            keys) is logged and kept in ``model.backbone.body.load_report``.
        anchor_sizes: anchor size at each pyramid level (5 levels); for the R-CNNs one scale times the
            strides 4-64 (the configs: 8, i.e. 32-512).
        neck_channels: FPN width (256 in the reference); the RoI heads follow it (box-head FCs
            ``4 * neck_channels`` wide, mask-head and conv box-head convs ``neck_channels``). Smaller
            values make CPU demos affordable.
        backbone_kwargs: :class:`rmt.models.RMTBackbone` options (``frozen_stages``, ``norm_eval``,
            ``drop_path_rate``, ``decomposed``, ``grad_checkpointing``).
        detector_kwargs: for the R-CNNs :data:`RCNN_OPTIONS` (``min_size``, ``max_size``,
            ``box_score_thresh``, ``rpn_post_nms_top_n_test``, ...); for RetinaNet
            :class:`rmt.detection.retinanet.RetinaNet`'s options (``score_thresh``, ``detections_per_img``, ...).
    """
    if arch not in ARCHS:
        raise RMTError(f"unknown detector {arch!r}{did_you_mean(arch, ARCHS)}; choose from {', '.join(ARCHS)}")
    if num_classes < 1:
        raise RMTError(f"num_classes must be positive, got {num_classes}")
    if len(anchor_sizes) != 5:
        raise RMTError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
    if "min_size" in detector_kwargs:
        detector_kwargs["min_size"] = tuple(detector_kwargs["min_size"]) if isinstance(
            detector_kwargs["min_size"], (list, tuple)) else (detector_kwargs["min_size"],)
    if neck_channels < 1:
        raise RMTError(f"neck_channels must be positive, got {neck_channels}")
    backbone_kwargs = dict(backbone_kwargs or {})
    width = int(neck_channels)
    if arch == "retinanet":
        body = RMTBackbone(backbone, out_indices=(1, 2, 3), weights=backbone_weights, **backbone_kwargs)
        return RetinaNet(RMTWithRetinaFPN(body, width), num_classes, anchor_generator=retina_anchors(anchor_sizes),
                         **_checked_kwargs(RetinaNet, detector_kwargs))
    body = RMTBackbone(backbone, out_indices=(0, 1, 2, 3), weights=backbone_weights, **backbone_kwargs)
    return _build_rcnn(arch, RMTWithFPN(body, width, LastLevelMaxPool()), num_classes, anchor_sizes, width,
                       detector_kwargs)


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
                      box_batch_size_per_image=cfg.box_batch_size_per_image,
                      rpn_post_nms_top_n_train=cfg.rpn_post_nms_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test)
    return kwargs


_OFFICIAL_RCNN_KEYS = (
    (re.compile(r"neck\.lateral_convs\.(\d+)\.conv\."), r"backbone.fpn.inner_blocks.\1.0."),
    (re.compile(r"neck\.fpn_convs\.(\d+)\.conv\."), r"backbone.fpn.layer_blocks.\1.0."),
    (re.compile(r"rpn_head\."), "rpn.head."),
    (re.compile(r"roi_head\.bbox_head\.(\d+)\."), r"roi_heads.box_heads.\1."),
    (re.compile(r"roi_head\.bbox_head\."), "roi_heads.box_head."),
    (re.compile(r"roi_head\.mask_head\.(\d+)\."), r"roi_heads.mask_heads.\1."),
    (re.compile(r"roi_head\.mask_head\."), "roi_heads.mask_head."),
)


def official_rcnn_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official mmdet Faster / Mask / Cascade Mask R-CNN state dict (``backbone.``, ``neck.``,
    ``rpn_head.``, ``roi_head.`` keys) as our :func:`build_detector` model's keys. The layers keep their
    layout (the class-specific ones included); an unknown key is an error."""
    out = {"backbone.body." + k: v for k, v in official_backbone_state(state_dict).items()}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        for pattern, replacement in _OFFICIAL_RCNN_KEYS:
            new, count = pattern.subn(replacement, key, count=1)
            if count and pattern.match(key):
                out[new] = value
                break
        else:
            raise RMTError(f"unexpected key {key!r} in an official R-CNN state dict (expected backbone., neck., "
                           "rpn_head. or roi_head. keys)")
    return out


# ------------------------------------------------------------------------------ checkpoints
def detector_from_checkpoint(path: str | os.PathLike) -> Tuple[nn.Module, DetConfig, List[str]]:
    """``(model in eval mode, DetConfig, class names)`` from any detection checkpoint
    (:func:`read_detector_checkpoint`: a run's files, a model folder, an official mmdet file)."""
    state, cfg, class_names = read_detector_checkpoint(path)
    model = build_detector(cfg.arch, num_classes=len(class_names), **detector_kwargs(cfg))
    load_exactly(model, state, f"{path}: {cfg.arch} {cfg.backbone} with {len(class_names)} classes")
    return model.eval(), cfg, class_names


def read_detector_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], DetConfig, List[str]]:
    """``(state dict in our layout, DetConfig, class names)`` of a detection run's ``model.safetensors``,
    ``best.pth`` or ``last.pth``, of a model folder written by ``rmt convert`` (its ``model.safetensors``),
    or of an official (mmdet 2.11) RMT detector checkpoint (:func:`read_official_detector`)."""
    return read_dense_checkpoint(path, "detection", DetConfig, read_official_detector)


def init_detector_from(model: nn.Module, path: str | os.PathLike, cfg: DetConfig) -> Dict[str, List]:
    """Start ``model`` (built from ``cfg``) from the weights of a whole detector of the same architecture,
    backbone and neck width (any file :func:`read_detector_checkpoint` reads), for fine-tuning: every tensor
    of the same name and shape is loaded; the others -- with another class count, the class-specific
    layers (``fc_cls``, class-specific ``fc_reg``, ``conv_logits``, ``retina_cls``) -- keep their fresh
    initialisation. Returns :func:`rmt.training.dense_checkpoints.load_fitting`'s report."""
    state, source, class_names = read_detector_checkpoint(path)
    if (source.arch, source.backbone, source.neck_channels) != (cfg.arch, cfg.backbone, cfg.neck_channels):
        raise RMTError(f"--init-from {path} holds a {source.arch} with {source.backbone} and neck_channels "
                       f"{source.neck_channels}, the config builds a {cfg.arch} with {cfg.backbone} and neck_channels "
                       f"{cfg.neck_channels}: set arch, backbone and neck_channels to the file's")
    return load_fitting(model, state, len(class_names))


# ------------------------------------------------------------------ official (mmdet) checkpoints
_OFFICIAL_TYPES = {"MaskRCNN": "mask_rcnn", "FasterRCNN": "faster_rcnn", "CascadeRCNN": "cascade_mask_rcnn",
                   "RetinaNet": "retinanet"}  # mmdet detector type -> our arch
_EXPECTED_DETECTORS = ("an mmdet RMT Mask R-CNN (roi_head.mask_head), Faster R-CNN (roi_head.bbox_head), Cascade "
                       "Mask R-CNN (roi_head.bbox_head.0, roi_head.mask_head.0) or RetinaNet (bbox_head.retina_cls)")


def official_detector_state(state_dict: Dict[str, torch.Tensor], arch: str) -> Dict[str, torch.Tensor]:
    """An official mmdet state dict of ``arch`` in our layout (:func:`official_rcnn_state`,
    :func:`rmt.detection.retinanet.official_retinanet_state`)."""
    return official_retinanet_state(state_dict) if arch == "retinanet" else official_rcnn_state(state_dict)


def read_official_detector(path: str | os.PathLike) -> Optional[Tuple[Dict[str, torch.Tensor], DetConfig, List[str]]]:
    """An official detection checkpoint (mmcv ``{"meta", "state_dict", "optimizer"}``, mmdet keys) as
    ``(state dict in our layout, DetConfig, class names)``; ``None`` for a file of another layout.

    Architecture, variant, class count and neck width come from the keys and shapes
    (:func:`official_detector_config`), checked against ``meta["config"]`` when that text parses;
    class names from ``meta["CLASSES"]`` (else ``class_<i>``)."""
    official = read_official_file(path)
    if official is None:
        return None
    cfg, num_classes = official_detector_config(official.state, official.config_text, where=str(path))
    return (official_detector_state(official.state, cfg.arch), cfg,
            official_class_names(official.meta, num_classes))


def _official_arch(state: Dict[str, torch.Tensor], where: str) -> str:
    if any(k.startswith("roi_head.bbox_head.0.") for k in state):
        if not any(k.startswith("roi_head.mask_head.0.") for k in state):
            raise RMTError(f"{where}: a Cascade R-CNN without mask heads (no roi_head.mask_head.0); expected "
                           f"{_EXPECTED_DETECTORS}")
        return "cascade_mask_rcnn"
    if any(k.startswith("roi_head.mask_head.") for k in state):
        return "mask_rcnn"
    if any(k.startswith("roi_head.bbox_head.") for k in state):
        return "faster_rcnn"
    if "bbox_head.retina_cls.weight" in state:
        return "retinanet"
    found = sorted({k.split(".")[0] for k in state})
    raise RMTError(f"{where}: not an official detector (found top-level keys {', '.join(found[:6])}); expected "
                   f"{_EXPECTED_DETECTORS}")


def _official_class_count(state: Dict[str, torch.Tensor], arch: str, where: str) -> int:
    """Classes without the background: R-CNN ``fc_cls`` (K + 1 rows, background last), RetinaNet
    ``retina_cls`` (K per anchor, as many anchors as ``retina_reg`` has boxes); the masks' ``conv_logits`` agree."""
    if arch == "retinanet":
        anchors = state["bbox_head.retina_reg.weight"].shape[0] // 4
        rows = state["bbox_head.retina_cls.weight"].shape[0]
        if anchors < 1 or rows % anchors:
            raise RMTError(f"{where}: retina_cls has {rows} outputs, not a multiple of the {anchors} anchors of "
                           f"retina_reg")
        return rows // anchors
    stage = "0." if arch == "cascade_mask_rcnn" else ""
    count = state[f"roi_head.bbox_head.{stage}fc_cls.weight"].shape[0] - 1
    logits = state.get(f"roi_head.mask_head.{stage}conv_logits.weight")
    if logits is not None and logits.shape[0] != count:
        raise RMTError(f"{where}: the box head predicts {count} classes, the mask head {logits.shape[0]}")
    return count


def official_detector_config(state: Dict[str, torch.Tensor], config_text: Optional[str] = None,
                             where: str = "checkpoint") -> Tuple[DetConfig, int]:
    """``(DetConfig, class count)`` of an official RMT detector from its state dict (mmdet keys):

    * architecture: ``roi_head.bbox_head.0.`` -> Cascade Mask R-CNN, ``roi_head.mask_head`` -> Mask R-CNN,
      ``roi_head.bbox_head`` -> Faster R-CNN, ``bbox_head.retina_cls`` -> RetinaNet;
    * backbone variant: the widths and depths of ``backbone.layers``, and which stages have layer scale;
    * classes: ``fc_cls`` / ``retina_cls`` (and ``conv_logits``); neck width: the FPN's output convs.

    ``config_text`` (the file's ``meta["config"]``), when it parses, must agree with the weights; it adds
    the backbone's decomposed stages and drop path, the test scale, the anchors and the test settings
    (score threshold, detections and RPN proposals per image), and its NMS settings must be the ones our
    detectors compute. Anything not recognised is one :class:`RMTError` line saying what was found and
    what was expected."""
    arch = _official_arch(state, where)
    variant, found = official_backbone_variant(state, where)
    num_classes = _official_class_count(state, arch, where)
    if "neck.fpn_convs.0.conv.weight" not in state:
        raise RMTError(f"{where}: no FPN (neck.fpn_convs.0.conv); expected {_EXPECTED_DETECTORS}")
    width = int(state["neck.fpn_convs.0.conv.weight"].shape[0])
    settings: Dict[str, Any] = dict(arch=arch, backbone=variant, neck_channels=width)
    model_cfg, test_scale = parse_official_config(config_text) if config_text else (None, None)
    if model_cfg is not None:
        settings.update(_settings_from_config(model_cfg, arch, num_classes, width, found, where))
    if test_scale is not None:
        settings.update(max_size=max(test_scale), min_size=[min(test_scale)])
    return config_from_dict(DetConfig, settings), num_classes


def _dict(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _settings_from_config(model_cfg: Dict[str, Any], arch: str, num_classes: int, width: int, found: Dict[str, Any],
                          where: str) -> Dict[str, Any]:
    """What the parsed official ``model`` config adds to the settings read off the weights, after
    checking that the two agree (and that its NMS is what :func:`build_detector` computes)."""
    kind = model_cfg.get("type")
    if kind is not None and _OFFICIAL_TYPES.get(kind) != arch:
        raise config_disagrees(where, "detector", kind, f"{arch} (expected {' or '.join(_OFFICIAL_TYPES)})")
    out = official_backbone_settings(model_cfg, found, where)
    neck = _dict(model_cfg.get("neck"))
    if isinstance(neck.get("out_channels"), int) and neck["out_channels"] != width:
        raise config_disagrees(where, "neck out_channels", neck["out_channels"], width)
    if arch == "retinanet":
        head = _dict(model_cfg.get("bbox_head"))
        anchors = _dict(head.get("anchor_generator"))
        base, strides = anchors.get("octave_base_scale"), anchors.get("strides")
        test, rpn_kept = _dict(model_cfg.get("test_cfg")), None
        nms_checks = (("test_cfg nms_pre", test.get("nms_pre"), 1000),
                      ("test_cfg nms iou_threshold", _dict(test.get("nms")).get("iou_threshold"), 0.5))
    else:
        roi = _dict(model_cfg.get("roi_head"))
        heads = roi.get("bbox_head")
        head = _dict(heads[0] if isinstance(heads, list) and heads else heads)
        anchors = _dict(_dict(model_cfg.get("rpn_head")).get("anchor_generator"))
        scales, strides = anchors.get("scales"), anchors.get("strides")
        base = scales[0] if isinstance(scales, list) and len(scales) == 1 else None
        test = _dict(_dict(model_cfg.get("test_cfg")).get("rcnn"))
        rpn = _dict(_dict(model_cfg.get("test_cfg")).get("rpn"))
        rpn_kept = rpn.get("max_per_img")
        nms_checks = (("test_cfg rpn nms_pre", rpn.get("nms_pre"), RCNN_OPTIONS["rpn_pre_nms_top_n_test"]),
                      ("test_cfg rpn nms iou_threshold", _dict(rpn.get("nms")).get("iou_threshold"),
                       RCNN_OPTIONS["rpn_nms_thresh"]),
                      ("test_cfg rcnn nms iou_threshold", _dict(test.get("nms")).get("iou_threshold"),
                       RCNN_OPTIONS["box_nms_thresh"]),
                      ("test_cfg rcnn mask_thr_binary", test.get("mask_thr_binary"), MASK_THRESHOLD))
    if head.get("num_classes") is not None and head["num_classes"] != num_classes:
        raise config_disagrees(where, "num_classes", head["num_classes"], num_classes)
    for what, value, ours in nms_checks:
        if value is not None and value != ours:
            raise RMTError(f"{where}: its config sets {what} {value}; the detectors here compute {ours}")
    if isinstance(base, (int, float)) and isinstance(strides, list) and len(strides) == 5:
        out["anchor_sizes"] = [int(base * s) for s in strides]
    if isinstance(test.get("score_thr"), (int, float)):
        out["score_thresh"] = float(test["score_thr"])
    if isinstance(test.get("max_per_img"), int):
        out["detections_per_img"] = test["max_per_img"]
    if isinstance(rpn_kept, int):
        out["rpn_post_nms_test"] = rpn_kept
    return out
