"""COCO box and mask AP of a detector, with pycocotools, on one process or many; and ``rmt det eval``:
the AP of a saved detector (:func:`evaluate_checkpoint`).

``evaluate(model, dataset, ...)`` runs the model over a :class:`rmt.data.coco.CocoDetection`
(each process its shard), gathers the detections on every process, and scores them with
``COCOeval`` against the dataset's own annotations: ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75`` and,
for mask models, the same for ``segm`` (fractions in [0, 1], as COCOeval reports them).
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.coco import CocoDetection, coco_split_paths, collate_detection
from ..data.shapes import SPLITS, ensure_shapes
from ..errors import RMTError
from ..runtime.precision import autocast
from ..runtime.processes import DistInfo, ShardSampler, all_gather_objects, resolve_device
from ..runtime.progress import progress_bar
from ..training.dense_checkpoints import check_class_names
from .models import detector_from_checkpoint, has_masks
from .ops import MASK_THRESHOLD

__all__ = ["evaluate", "evaluate_checkpoint", "coco_results", "coco_metrics", "STAT_NAMES"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(outputs: Sequence[Dict[str, torch.Tensor]], image_ids: Sequence[int], category_ids: Sequence[int],
                 mask_threshold: float = MASK_THRESHOLD) -> List[Dict[str, Any]]:
    """Detections -> COCO result entries (``bbox`` in xywh, ``segmentation`` as RLE of the pixels whose mask
    probability is ``>= mask_threshold``, as mmdet's ``mask_thr_binary``).

    ``category_ids[label - 1]`` is the COCO category of label ``label``.
    """
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()
        masks = None
        if "masks" in out:
            masks = (out["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            entry = dict(image_id=int(image_id), category_id=int(category_ids[label - 1]),
                         bbox=[round(v, 2) for v in box], score=round(float(score), 5))
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                entry["segmentation"] = rle
            results.append(entry)
    return results


def coco_metrics(coco_gt, results: List[Dict[str, Any]], image_ids: Sequence[int], iou_types: Sequence[str],
                 verbose: bool = False) -> Dict[str, float]:
    """``COCOeval`` summary per IoU type: ``{"bbox_AP", "bbox_AP50", ..., "segm_APl"}`` (-1: undefined)."""
    from pycocotools.cocoeval import COCOeval

    metrics: Dict[str, float] = {}
    for iou_type in iou_types:
        entries = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not entries:  # nothing detected: AP is zero (loadRes rejects an empty list)
            metrics.update({f"{iou_type}_{name}": 0.0 for name in STAT_NAMES})
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            detections = coco_gt.loadRes(entries)
            evaluator = COCOeval(coco_gt, detections, iou_type)
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if verbose:
            print(f"{iou_type}:\n{out.getvalue()}")
        metrics.update({f"{iou_type}_{name}": float(evaluator.stats[k]) for k, name in enumerate(STAT_NAMES)})
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, device: torch.device, info: Optional[DistInfo] = None,
             amp_dtype: Optional[torch.dtype] = None, batch_size: int = 1, workers: int = 0,
             progress: bool = True, verbose: bool = False) -> Dict[str, float]:
    """COCO AP of ``model`` on ``dataset`` (see the module docstring); every process returns the totals.

    Also returns ``images`` (how many were evaluated) and ``detections``.
    """
    info = info if info is not None else DistInfo()
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                        num_workers=workers, collate_fn=collate_detection)
    results: List[Dict[str, Any]] = []
    image_ids: List[int] = []
    for images, targets in progress_bar(loader, progress and info.is_main, desc="eval"):
        with autocast(device, amp_dtype):
            outputs = model([im.to(device) for im in images])
        ids = [int(t["image_id"]) for t in targets]
        results += coco_results(outputs, ids, dataset.category_ids)
        image_ids += ids
    model.train(was_training)
    if info.distributed:
        gathered = all_gather_objects((results, image_ids), info)
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
    iou_types = ["bbox", "segm"] if has_masks(model) else ["bbox"]
    metrics = coco_metrics(dataset.coco, results, image_ids, iou_types, verbose=verbose and info.is_main)
    return dict(metrics, images=len(image_ids), detections=len(results))


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", batch_size: int = 1, workers: int = 0,
                        max_samples: Optional[int] = None, verbose: bool = False, progress: bool = True
                        ) -> Dict[str, Any]:
    """COCO box (and mask) AP of a trained detector (float32) on ``data``/``split`` (default: the run's
    validation data: its ``--data`` and ``val_split``, or the bundled shapes).

    ``checkpoint`` is anything :func:`rmt.detection.models.detector_from_checkpoint` reads, an official
    (mmdet) file included: images are prepared by the official test pipeline. The data's categories (in
    category-id order) must be the model's classes, in the model's order (compared without case and
    surrounding spaces); other data -- e.g. a COCO checkpoint's 80 classes against a dataset of 3 -- is
    one error line: fine-tune on it first (``rmt det train --init-from CHECKPOINT``)."""
    model, cfg, class_names = detector_from_checkpoint(checkpoint)
    data = data if data is not None else cfg.data
    root = data if data is not None else ensure_shapes()
    split = split or (cfg.val_split if data is not None else SPLITS[1])
    dataset = CocoDetection(*coco_split_paths(root, split), masks=False, max_samples=max_samples)
    if len(dataset) == 0:
        raise RMTError(f"{root}/{split} has no images to evaluate")
    check_class_names(dataset.class_names, class_names, root, fine_tune=f"rmt det train --init-from {checkpoint}")
    torch_device = resolve_device(device)
    model.to(torch_device)
    result = evaluate(model, dataset, torch_device, batch_size=batch_size, workers=workers, verbose=verbose,
                      progress=progress)
    return dict(result, arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint),
                data="shapes" if data is None else str(root), split=split, masks=has_masks(model),
                precision="float32")
