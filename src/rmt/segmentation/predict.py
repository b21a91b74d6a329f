"""Segmentation of image files, and evaluation of a saved segmentor: what ``rmt seg predict|eval`` call."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.ade20k import SegEvalTransform
from ..detection.predict import _read, output_paths
from ..engine.distributed import DistInfo, resolve_device
from ..errors import RMTError
from .models import segmentor_from_checkpoint

__all__ = ["predict", "evaluate_checkpoint"]


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], output: Optional[str | os.PathLike] = None,
            device: str = "auto", mode: Optional[str] = None, alpha: float = 0.5, draw: bool = True
            ) -> List[Dict[str, Any]]:
    """Segment ``images`` with a trained segmentor; write one PNG per image (a colour per class
    blended over the image, and a legend) unless ``draw`` is False. Images are rescaled as in the
    run's evaluation and the prediction is made at the original size. Returns, per image,
    ``{"image", "output", "classes": {name: fraction of the pixels}}``."""
    from ..dense.visualize import draw_segmentation

    if not images:
        raise RMTError("no images given")
    model, cfg, class_names = segmentor_from_checkpoint(checkpoint)
    torch_device = resolve_device(device, DistInfo())
    model.to(torch_device)
    transform = SegEvalTransform(cfg.scale)
    paths = output_paths(images, output, "seg")
    results = []
    for image_path, out_path in zip(images, paths):
        image = _read(image_path)
        logits = model.inference(transform(image)[None].to(torch_device), mode=mode or cfg.test_mode,
                                 crop_size=cfg.crop_size, stride=cfg.slide_stride,
                                 output_size=(image.height, image.width))
        pred = logits.argmax(1)[0].cpu()
        counts = torch.bincount(pred.flatten(), minlength=len(class_names)).double() / pred.numel()
        classes = {class_names[k]: round(float(v), 4) for k, v in enumerate(counts) if v > 0}
        if draw:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            draw_segmentation(image, pred, class_names, alpha=alpha).save(out_path)
        results.append(dict(image=str(image_path), output=str(out_path) if draw else None,
                            classes=dict(sorted(classes.items(), key=lambda kv: -kv[1]))))
    return results


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", mode: Optional[str] = None, workers: int = 0,
                        max_samples: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """mIoU / mAcc / aAcc (percent) and per-class IoU of a trained segmentor on ``data``/``split``
    (default: the run's validation data: its ``--data`` and ``val_split``, or the bundled shapes)."""
    from ..data.ade20k import ADE20KDataset
    from ..data.shapes import SPLITS, ensure_shapes
    from .evaluate import evaluate

    model, cfg, class_names = segmentor_from_checkpoint(checkpoint)
    data = data if data is not None else cfg.data
    root = data if data is not None else ensure_shapes()
    split = split or (cfg.val_split if data is not None else SPLITS[1])
    dataset = ADE20KDataset(root, split, SegEvalTransform(cfg.scale), cfg.reduce_zero_label, max_samples)
    if dataset.class_names is not None and dataset.class_names != class_names:
        raise RMTError(f"the classes of {root} ({', '.join(dataset.class_names[:5])}...) are not the model's "
                       f"({', '.join(class_names[:5])}...)")
    torch_device = resolve_device(device, DistInfo())
    model.to(torch_device)
    result = evaluate(model, dataset, len(class_names), torch_device, mode=mode or cfg.test_mode,
                      crop_size=cfg.crop_size, stride=cfg.slide_stride, workers=workers, progress=progress,
                      class_names=class_names)
    return dict(result, arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint),
                data="shapes" if data is None else str(root), split=split)
