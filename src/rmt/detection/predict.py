"""Detection on image files, and evaluation of a saved detector: what ``rmt det predict|eval`` call."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.image import BadImageError, load_rgb
from ..engine.distributed import DistInfo, resolve_device
from ..errors import RMTError
from .models import detector_from_checkpoint, has_masks

__all__ = ["predict", "evaluate_checkpoint", "output_paths"]


def output_paths(images: Sequence[str | os.PathLike], output: Optional[str | os.PathLike], suffix: str) -> List[Path]:
    """Where the pictures go: ``output`` itself for one image and a ``.png`` name, else
    ``output/<stem>_<suffix>.png`` (``output`` defaults to ``predictions``)."""
    if output is not None and str(output).lower().endswith(".png"):
        if len(images) != 1:
            raise RMTError(f"--output {output} is one file, but {len(images)} images were given: pass a folder")
        return [Path(output)]
    folder = Path(output) if output is not None else Path("predictions")
    return [folder / f"{Path(p).stem}_{suffix}.png" for p in images]


def _read(path: str | os.PathLike):
    try:
        return load_rgb(path)
    except FileNotFoundError:
        raise RMTError(f"image not found: {path}") from None
    except BadImageError as e:
        raise RMTError(f"cannot read {e}") from None


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], output: Optional[str | os.PathLike] = None,
            score_thresh: float = 0.5, device: str = "auto", draw: bool = True) -> List[Dict[str, Any]]:
    """Detect objects in ``images`` with a trained detector; write one PNG per image (boxes, labels,
    masks) unless ``draw`` is False. Returns, per image, ``{"image", "output", "detections": [{"label",
    "class", "score", "box" (x1, y1, x2, y2)[, "mask_area"]}]}`` for the detections above ``score_thresh``."""
    from ..dense.visualize import draw_detections

    if not images:
        raise RMTError("no images given")
    model, _, class_names = detector_from_checkpoint(checkpoint)
    torch_device = resolve_device(device, DistInfo())
    model.to(torch_device)
    paths = output_paths(images, output, "det")
    results = []
    for image_path, out_path in zip(images, paths):
        image = _read(image_path)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        det = {k: v.cpu() for k, v in model([tensor.to(torch_device)])[0].items()}
        keep = det["scores"] >= score_thresh
        det = {k: v[keep] for k, v in det.items()}
        entries = []
        for k in range(len(det["scores"])):
            entry = dict(label=int(det["labels"][k]), score=round(float(det["scores"][k]), 4),
                         box=[round(float(v), 1) for v in det["boxes"][k]])
            entry["class"] = class_names[entry["label"] - 1]
            if "masks" in det:
                entry["mask_area"] = int((det["masks"][k, 0] > 0.5).sum())
            entries.append(entry)
        if draw:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            draw_detections(image, det, class_names).save(out_path)
        results.append(dict(image=str(image_path), output=str(out_path) if draw else None, detections=entries))
    return results


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", batch_size: int = 1, workers: int = 0,
                        max_samples: Optional[int] = None, verbose: bool = False, progress: bool = True
                        ) -> Dict[str, Any]:
    """COCO box (and mask) AP of a trained detector on ``data``/``split`` (default: the run's
    validation data: its ``--data`` and ``val_split``, or the bundled shapes)."""
    from ..data.coco import CocoDetection, coco_split_paths
    from ..data.shapes import SPLITS, ensure_shapes
    from .evaluate import evaluate

    model, cfg, class_names = detector_from_checkpoint(checkpoint)
    data = data if data is not None else cfg.data
    root = data if data is not None else ensure_shapes()
    split = split or (cfg.val_split if data is not None else SPLITS[1])
    dataset = CocoDetection(*coco_split_paths(root, split), masks=False, max_samples=max_samples)
    if dataset.class_names != class_names:
        raise RMTError(f"the categories of {root} ({', '.join(dataset.class_names[:5])}...) are not the model's "
                       f"({', '.join(class_names[:5])}...)")
    torch_device = resolve_device(device, DistInfo())
    model.to(torch_device)
    result = evaluate(model, dataset, torch_device, batch_size=batch_size, workers=workers, verbose=verbose,
                      progress=progress)
    return dict(result, arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint),
                data="shapes" if data is None else str(root), split=split, masks=has_masks(model))
