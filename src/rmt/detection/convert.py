"""``rmt convert`` for detection: an official (mmdet 2.11) RMT Mask R-CNN / Cascade Mask R-CNN / RetinaNet
checkpoint, or a detection run's ``best.pth``/``last.pth``, to our detection model file (what a run's
``model.safetensors`` is: the state dict, with the task, the resolved config and the class names in its
metadata) or to a model folder (that file, ``config.json`` and a ``README.md`` model card).

Importing :mod:`rmt.detection` registers the converter with :mod:`rmt.tools.convert`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from ..errors import RMTError
from ..models.hub import HUB_CONFIG
from ..models.weights import META_KEY, open_checkpoint, read_metadata, save_weights
from ..tools.convert import register_converter, save_model_folder
from .config import DetConfig
from .models import detector_from_checkpoint, has_masks

__all__ = ["is_detection_checkpoint", "convert_detector"]

_ARCH_NAMES = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN",
               "retinanet": "RetinaNet"}


def _official_detector_keys(state: dict) -> bool:
    return "bbox_head.retina_cls.weight" in state or any(k.startswith("roi_head.bbox_head.") for k in state)


def is_detection_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a detector: an official mmdet checkpoint (``state_dict`` with
    ``roi_head.bbox_head`` or ``bbox_head.retina_cls``), a detection run's file, or a model folder of
    one. False for files that cannot be read (the classification converter reports those)."""
    try:
        if path.is_dir():
            config = json.loads((path / HUB_CONFIG).read_text(encoding="utf-8"))
            return isinstance(config, dict) and config.get("task") == "detection"
        if path.suffix == ".safetensors":
            return read_metadata(path).get("task") == "detection"
        raw = open_checkpoint(path)
    except (RMTError, OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    meta = raw.get(META_KEY)
    if isinstance(meta, dict) and meta.get("task") == "detection":
        return True
    state = raw.get("state_dict")
    return isinstance(state, dict) and "model" not in raw and _official_detector_keys(state)


def _model_card(cfg: DetConfig, class_names: List[str], masks: bool, source: str) -> List[str]:
    names = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    task = "object detection and instance segmentation" if masks else "object detection"
    return [
        "---", "tags:", "- object-detection", "- rmt", "---",
        f"# {_ARCH_NAMES[cfg.arch]} with {cfg.backbone} ({task})", "",
        "RMT (\"RMT: Retentive Networks Meet Vision Transformers\", Fan et al., CVPR 2024, "
        "[arXiv:2309.11523](https://arxiv.org/abs/2309.11523)) detector, written by the `rmt` package.",
        "",
        f"- {len(class_names)} classes: {names}",
        f"- test: resize to {cfg.max_size}x{cfg.min_size[-1]} (long x short side at most, keeping the aspect ratio), "
        f"score threshold {cfg.score_thresh}, at most {cfg.detections_per_img} detections per image",
        f"- weights converted from: `{source}`", "",
        "## Use", "",
        "```",
        "rmt det eval --checkpoint FOLDER --data /path/to/coco",
        "rmt det predict IMAGE --checkpoint FOLDER",
        "```", "",
        "or in Python: `model, cfg, class_names = rmt.detection.detector_from_checkpoint(FOLDER)`.",
    ]


def convert_detector(src: Path, dst: Path, hub: bool, overwrite: bool = False) -> Tuple[str, Path]:
    """Write the detector of ``src`` (anything :func:`detector_from_checkpoint` reads) as our model file
    ``dst`` (``hub=False``) or as a model folder; returns ``("<arch> <backbone>", written path)``. The
    weights are loaded into the model (every key and shape checked) and saved from it."""
    model, cfg, class_names = detector_from_checkpoint(src)
    metadata = dict(task="detection", model=cfg.backbone, num_classes=len(class_names), class_names=class_names,
                    config=cfg.to_dict(), source=src.name)
    description = f"{cfg.arch} {cfg.backbone}"
    if not hub:
        return description, save_weights(model, dst, metadata)
    config = dict(task="detection", arch=cfg.arch, backbone=cfg.backbone, num_classes=len(class_names),
                  label_names=class_names, config=cfg.to_dict())
    card = _model_card(cfg, class_names, has_masks(model), src.name)
    return description, save_model_folder(model, dst, metadata, config, card, overwrite)


register_converter("detection", is_detection_checkpoint, convert_detector)
