"""Detection of image files (``rmt det predict``); ``rmt det eval`` is in :mod:`rmt.detection.evaluate`.

:func:`predict` yields one result per image, in the output contract that every ``predict`` command
shares (classification's included): ``{"path", ...}`` with the task's findings, or
``{"path", "error"}`` for an image that could not be read -- which is skipped, not fatal.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import RMTError
from ..runtime.draw import draw_detections, images_to_draw, save_picture
from ..runtime.processes import resolve_device
from .models import detector_from_checkpoint
from .ops import MASK_THRESHOLD

__all__ = ["predict"]


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
        if "masks" in det:  # probabilities -> the instance's pixels, as mmdet's mask_thr_binary
            det["masks"] = (det["masks"] >= MASK_THRESHOLD).float()
        entries = []
        for k in range(len(det["scores"])):
            index = int(det["labels"][k]) - 1  # label 0 is the background
            entry = dict(label=class_names[index], index=index, score=round(float(det["scores"][k]), 4),
                         box=[round(float(v), 1) for v in det["boxes"][k]])
            if "masks" in det:
                entry["mask_area"] = int(det["masks"][k, 0].sum())
            entries.append(entry)
        if draw:
            save_picture(draw_detections(image, det, class_names), picture)
        yield dict(path=path, output=str(picture) if draw else None, detections=entries)
