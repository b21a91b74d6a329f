"""Detection of image files (``rmt det predict``) and evaluation of a saved detector (``rmt det eval``).

:func:`predict` yields one result per image, in the output contract that every ``predict`` command
shares (classification's included): ``{"path", ...}`` with the task's findings, or
``{"path", "error"}`` for an image that could not be read -- which is skipped, not fatal.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from ..data.coco import CocoDetection, coco_split_paths
from ..data.shapes import SPLITS, ensure_shapes
from ..errors import RMTError
from ..tools.draw import draw_detections, images_to_draw, save_picture
from ..training.distributed import resolve_device
from .evaluate import evaluate
from .models import detector_from_checkpoint, has_masks

__all__ = ["predict", "evaluate_checkpoint"]


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike],
            output: Optional[str | os.PathLike] = None, score_thresh: float = 0.5, device: str = "auto",
            draw: bool = True) -> Iterator[Dict[str, Any]]:
    """Detect objects in ``images`` with a trained detector (float32), writing one PNG per image
    (boxes, labels, masks) unless ``draw`` is False.

    Yields, per image, ``{"path", "output", "detections": [{"label", "index", "score", "box" (x1, y1,
    x2, y2)[, "mask_area"]}]}`` for the detections scoring at least ``score_thresh`` (``index`` is the
    class index in 0..K-1, ``label`` its name), or ``{"path", "error"}`` for an unreadable image.
    """
    if not 0 <= score_thresh <= 1:
        raise RMTError(f"--score-thresh must be between 0 and 1, got {score_thresh}")
    model, _, class_names = detector_from_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    model.to(torch_device)
    for path, picture, image in images_to_draw(images, output, "det"):
        if isinstance(image, str):
            yield dict(path=path, error=image)
            continue
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        det = {k: v.cpu() for k, v in model([tensor.to(torch_device)])[0].items()}
        keep = det["scores"] >= score_thresh
        det = {k: v[keep] for k, v in det.items()}
        entries = []
        for k in range(len(det["scores"])):
            index = int(det["labels"][k]) - 1  # torchvision's label 0 is the background
            entry = dict(label=class_names[index], index=index, score=round(float(det["scores"][k]), 4),
                         box=[round(float(v), 1) for v in det["boxes"][k]])
            if "masks" in det:
                entry["mask_area"] = int((det["masks"][k, 0] > 0.5).sum())
            entries.append(entry)
        if draw:
            save_picture(draw_detections(image, det, class_names), picture)
        yield dict(path=path, output=str(picture) if draw else None, detections=entries)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", batch_size: int = 1, workers: int = 0,
                        max_samples: Optional[int] = None, verbose: bool = False, progress: bool = True
                        ) -> Dict[str, Any]:
    """COCO box (and mask) AP of a trained detector (float32) on ``data``/``split`` (default: the run's
    validation data: its ``--data`` and ``val_split``, or the bundled shapes)."""
    model, cfg, class_names = detector_from_checkpoint(checkpoint)
    data = data if data is not None else cfg.data
    root = data if data is not None else ensure_shapes()
    split = split or (cfg.val_split if data is not None else SPLITS[1])
    dataset = CocoDetection(*coco_split_paths(root, split), masks=False, max_samples=max_samples)
    if len(dataset) == 0:
        raise RMTError(f"{root}/{split} has no images to evaluate")
    if dataset.class_names != class_names:
        raise RMTError(f"the categories of {root} ({', '.join(dataset.class_names[:5])}...) are not the model's "
                       f"({', '.join(class_names[:5])}...)")
    torch_device = resolve_device(device)
    model.to(torch_device)
    result = evaluate(model, dataset, torch_device, batch_size=batch_size, workers=workers, verbose=verbose,
                      progress=progress)
    return dict(result, arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint),
                data="shapes" if data is None else str(root), split=split, masks=has_masks(model),
                precision="float32")
