"""``rmt convert`` for detection: an official (mmdet 2.11) RMT Mask R-CNN / Cascade Mask R-CNN / RetinaNet
checkpoint, or a detection run's ``best.pth``/``last.pth``, to our detection model file (what a run's
``model.safetensors`` is: the state dict, with the task, the resolved config and the class names in its
metadata) or to a model folder (that file, ``config.json`` and a ``README.md`` model card).

Importing :mod:`rmt.detection` registers the converter with :mod:`rmt.tools.convert`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from ..tools.convert import holds_task, model_card, register_converter, write_dense_model
from .config import DetConfig
from .models import detector_from_checkpoint, has_masks

__all__ = ["is_detection_checkpoint", "convert_detector"]

_ARCH_NAMES = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN",
               "retinanet": "RetinaNet"}


def _official_detector_keys(state) -> bool:
    return "bbox_head.retina_cls.weight" in state or any(k.startswith("roi_head.bbox_head.") for k in state)


def is_detection_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a detector: an official mmdet checkpoint (``state_dict`` with
    ``roi_head.bbox_head`` or ``bbox_head.retina_cls``), a detection run's file, or a model folder of
    one."""
    return holds_task(path, "detection", _official_detector_keys)


def _model_card(cfg: DetConfig, class_names: List[str], masks: bool, source: str) -> List[str]:
    names = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    task = "object detection and instance segmentation" if masks else "object detection"
    return model_card(
        "object-detection", f"{_ARCH_NAMES[cfg.arch]} with {cfg.backbone} ({task})", "detector",
        [f"{len(class_names)} classes: {names}",
         f"test: resize to {cfg.max_size}x{cfg.min_size[-1]} (long x short side at most, keeping the aspect ratio), "
         f"score threshold {cfg.score_thresh}, at most {cfg.detections_per_img} detections per image",
         f"weights converted from: `{source}`"],
        ["rmt det eval --checkpoint FOLDER --data /path/to/coco", "rmt det predict IMAGE --checkpoint FOLDER"],
        "model, cfg, class_names = rmt.detection.detector_from_checkpoint(FOLDER)")


def convert_detector(src: Path, dst: Path, hub: bool, overwrite: bool = False) -> Tuple[str, Path]:
    """Write the detector of ``src`` (anything :func:`detector_from_checkpoint` reads) as our model file
    ``dst`` (``hub=False``) or as a model folder; returns ``("<arch> <backbone>", written path)``. The
    weights are loaded into the model (every key and shape checked) and saved from it."""
    model, cfg, class_names = detector_from_checkpoint(src)
    return write_dense_model("detection", model, cfg, class_names, src.name, dst, hub, overwrite,
                             _model_card(cfg, class_names, has_masks(model), src.name))


register_converter("detection", is_detection_checkpoint, convert_detector)
