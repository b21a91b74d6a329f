"""Segmentation metrics: a confusion matrix accumulated over a dataset (summed across processes),
and mIoU / mAcc / aAcc from it, in percent as the reference reports them; and ``rmt seg eval``:
the metrics of a saved segmentor (:func:`evaluate_checkpoint`).

* IoU of class k: ``TP / (TP + FP + FN)``; mIoU: the mean over the classes that occur in the
  labels or the predictions (a class absent from both has no IoU).
* Acc of class k: ``TP / (TP + FN)``; mAcc: the mean over classes that occur in the labels.
* aAcc: correctly labelled pixels / labelled pixels.

Pixels labelled ``ignore_index`` (255) are left out. Predictions are scored at the label's
(original) resolution.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.ade20k import IGNORE_INDEX, ADE20KDataset, SegEvalTransform, read_class_names
from ..data.shapes import SPLITS, ensure_shapes
from ..errors import RMTError
from ..runtime.precision import autocast
from ..runtime.processes import DistInfo, ShardSampler, all_reduce_sum, resolve_device
from ..runtime.progress import progress_bar
from ..training.dense_checkpoints import check_class_names
from .models import segmentor_from_checkpoint

__all__ = ["confusion_matrix", "segmentation_metrics", "evaluate", "evaluate_checkpoint"]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = label, columns = prediction, ignored pixels left out."""
    keep = label != ignore_index
    if keep.any() and (label[keep].max() >= num_classes or label[keep].min() < 0):
        raise ValueError(f"labels outside 0..{num_classes - 1} (other than {ignore_index})")
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``{"mIoU", "mAcc", "aAcc", "IoU": {class: value}, "Acc": {...}}`` (percent) from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    labelled, predicted = cm.sum(1), cm.sum(0)
    union = labelled + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]

    def mean(values: torch.Tensor) -> float:
        valid = values[~values.isnan()]
        return 100.0 * valid.mean().item() if len(valid) else 0.0

    return dict(mIoU=mean(iou), mAcc=mean(acc), aAcc=100.0 * (tp.sum() / cm.sum().clamp(min=1)).item(),
                IoU={n: (None if math.isnan(v) else 100.0 * v) for n, v in zip(names, iou.tolist())},
                Acc={n: (None if math.isnan(v) else 100.0 * v) for n, v in zip(names, acc.tolist())})


def _collate_one_by_one(batch):
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device,
             info: Optional[DistInfo] = None, amp_dtype: Optional[torch.dtype] = None, mode: str = "whole",
             crop_size: Optional[Sequence[int]] = None,
             stride: Optional[Sequence[int]] = None, workers: int = 0, progress: bool = True,
             class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU/Acc of ``model`` over ``dataset``, whose items are
    ``(image (3, h, w) normalised, label (H, W))``; the prediction is made at the label's size
    (:meth:`rmt.segmentation.models.Segmentor.inference`, then the argmax).
    With several processes each evaluates its shard and the confusion matrices are summed. The matrix
    stays on the device until the end."""
    info = info if info is not None else DistInfo()
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), info), num_workers=workers,
                        collate_fn=_collate_one_by_one)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in progress_bar(loader, progress and info.is_main, desc="eval"):
        for image, label in batch:
            with autocast(device, amp_dtype):
                probs = model.inference(image[None].to(device), mode=mode, crop_size=crop_size, stride=stride,
                                        output_size=label.shape[-2:])
            cm += confusion_matrix(probs.argmax(1)[0], label.to(device), num_classes)
    model.train(was_training)
    total = all_reduce_sum(cm, info)
    return dict(segmentation_metrics(total, class_names), images=len(dataset))


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Optional[str] = None, split: Optional[str] = None,
                        device: str = "auto", mode: Optional[str] = None, workers: int = 0,
                        max_samples: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """mIoU / mAcc / aAcc (percent) and per-class IoU of a trained segmentor (float32) on ``data``/``split``
    (default: the run's validation data: its ``--data`` and ``val_split``, or the bundled shapes).

    ``checkpoint`` is anything :func:`rmt.segmentation.models.segmentor_from_checkpoint` reads, an
    official (mmseg) file included: images are prepared by the official test pipeline and the metrics
    are mmseg's. When ``data`` names its classes (``classes.txt``, ``objectInfo150``), they must be the
    model's, in the model's order (compared without case and surrounding spaces); other data -- e.g.
    an ADE20K checkpoint's 150 classes against a dataset of 4 -- is one error line: fine-tune on it
    first (``rmt seg train --init-from CHECKPOINT``)."""
    model, cfg, class_names = segmentor_from_checkpoint(checkpoint)
    data = data if data is not None else cfg.data
    root = data if data is not None else ensure_shapes()
    split = split or (cfg.val_split if data is not None else SPLITS[1])
    check_class_names(read_class_names(Path(root)), class_names, root,  # before reading the labels
                      fine_tune=f"rmt seg train --init-from {checkpoint}")
    dataset = ADE20KDataset(root, split, SegEvalTransform(cfg.scale), cfg.reduce_zero_label, max_samples,
                            num_classes=len(class_names))
    if len(dataset) == 0:
        raise RMTError(f"{root}/{split} has no images to evaluate")
    torch_device = resolve_device(device)
    model.to(torch_device)
    result = evaluate(model, dataset, len(class_names), torch_device, mode=mode or cfg.test_mode,
                      crop_size=cfg.crop_size, stride=cfg.slide_stride, workers=workers, progress=progress,
                      class_names=class_names)
    return dict(result, arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint),
                data="shapes" if data is None else str(root), split=split, precision="float32")
