"""Segmentation of image files (``rmt seg predict``); ``rmt seg eval`` is in :mod:`rmt.segmentation.evaluate`.

:func:`predict` yields one result per image in the output contract every ``predict`` command shares:
``{"path", ...}`` with the task's findings, or ``{"path", "error"}`` for an unreadable image (skipped).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence

import torch

from ..data.ade20k import SegEvalTransform
from ..errors import RMTError
from ..runtime.draw import draw_segmentation, images_to_draw, save_picture
from ..runtime.processes import resolve_device
from .models import segmentor_from_checkpoint

__all__ = ["predict"]


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike],
            output: Optional[str | os.PathLike] = None, device: str = "auto", mode: Optional[str] = None,
            alpha: float = 0.5, draw: bool = True) -> Iterator[Dict[str, Any]]:
    """Segment ``images`` with a trained segmentor (float32; ``checkpoint``: anything
    :func:`rmt.segmentation.models.segmentor_from_checkpoint` reads, official mmseg files included),
    writing one PNG per image (a colour per class blended over the image, and a legend) unless ``draw``
    is False. Images go through the official test pipeline at the run's scale, and the prediction is
    made at the original size.

    Yields, per image, ``{"path", "output", "classes": [{"label", "index", "fraction"}]}`` (the share
    of the pixels of each class present, largest first), or ``{"path", "error"}`` for an unreadable image.
    """
    if not 0 <= alpha <= 1:
        raise RMTError(f"--alpha must be between 0 and 1, got {alpha}")
    model, cfg, class_names = segmentor_from_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    model.to(torch_device)
    transform = SegEvalTransform(cfg.scale)
    for path, picture, image in images_to_draw(images, output, "seg"):
        if isinstance(image, str):
            yield dict(path=path, error=image)
            continue
        probs = model.inference(transform(image)[None].to(torch_device), mode=mode or cfg.test_mode,
                                crop_size=cfg.crop_size, stride=cfg.slide_stride,
                                output_size=(image.height, image.width))
        pred = probs.argmax(1)[0].cpu()
        counts = torch.bincount(pred.flatten(), minlength=len(class_names)).double() / pred.numel()
        classes = [dict(label=class_names[k], index=k, fraction=round(float(v), 4))
                   for k, v in enumerate(counts) if v > 0]
        if draw:
            save_picture(draw_segmentation(image, pred, class_names, alpha=alpha), picture)
        yield dict(path=path, output=str(picture) if draw else None,
                   classes=sorted(classes, key=lambda c: -c["fraction"]))
