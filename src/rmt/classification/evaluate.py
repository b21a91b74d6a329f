"""Evaluation: top-1 / top-5 accuracy and cross-entropy over a dataset, on one process or many;
and ``rmt eval``: a checkpoint (ours or official) on an image folder or the digits test split."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DigitsDataset, ImageFolderDataset, collate_skip_bad, eval_transform
from ..errors import RMTError
from ..models.factory import checkpoint_info, create_model, find_checkpoint, split_name
from ..training.distributed import DistInfo, ShardSampler, all_reduce_sum, resolve_device
from ..training.precision import amp_dtype, autocast, describe_precision
from ..training.run import progress_bar

__all__ = ["evaluate", "evaluate_checkpoint", "eval_loader", "report_bad_files"]

_logger = logging.getLogger(__name__)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, info: DistInfo = DistInfo(),
                pin_memory: bool = False) -> DataLoader:
    """Each process's shard of ``dataset``, every image once; unreadable images are skipped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                      num_workers=workers, collate_fn=collate_skip_bad, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


def report_bad_files(bad: Sequence, where: str) -> None:
    """Log how many distinct files could not be decoded, and the first few with their reasons."""
    unique = list(dict(bad).items())  # a file drawn several times (repeated augmentation) counts once
    if unique:
        shown = "; ".join(f"{p} ({r})" for p, r in unique[:3])
        _logger.warning("%s: skipped %d unreadable image(s): %s%s", where, len(unique), shown,
                        " ..." if len(unique) > 3 else "")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, info: DistInfo = DistInfo(),
             amp: Optional[torch.dtype] = None, progress: bool = True, desc: str = "eval",
             channels_last: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``, computed in
    autocast ``amp`` (``None``: float32).

    Returns ``{"top1", "top5", "loss", "images"}``; with several processes each evaluates its shard
    and the sums are reduced, so every process returns the totals. The sums stay on the device until
    the end (no synchronisation per batch).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    bad: List = []
    for batch, skipped in progress_bar(loader, progress and info.is_main, desc=desc):
        bad.extend(skipped)
        if batch is None:
            continue
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    model.train(was_training)
    totals = all_reduce_sum(totals, info)
    report_bad_files(bad, desc)
    n = totals[3].item()
    if n == 0:
        raise RMTError(f"{desc}: no image could be evaluated (the set is empty, or every image was unreadable)")
    return dict(top1=100.0 * totals[1].item() / n, top5=100.0 * totals[2].item() / n,
                loss=totals[0].item() / n, images=int(n))


def evaluate_checkpoint(model_name: Optional[str], checkpoint: str | os.PathLike, data: Optional[str] = None,
                        split: str = "val", batch_size: int = 64, workers: int = 4, device: str = "auto",
                        amp: str = "none", progress: bool = True) -> Dict[str, Any]:
    """Evaluate a checkpoint (ours or official) on an image folder, or on the digits test split.

    ``data`` is an ImageNet-style root (``DATA/<split>/<class>/*``) or a split folder itself. The
    checkpoint's class names (ours) map folder names to outputs; without them (official weights)
    the sorted folder names are the class indices, as ImageNet's synset folders are. Images are
    prepared as the checkpoint's data config says, else as the model's ``pretrained_cfg`` (bicubic
    resize to 256, 224 centre crop for the official models). ``amp``: ``none`` (float32, the
    default: reproducing published accuracy), ``bf16`` or ``fp16``. The result says which
    (``precision``).
    """
    if model_name is not None:
        split_name(model_name)  # a wrong name is reported before any file is read
    if batch_size < 1:
        raise RMTError(f"--batch-size must be positive, got {batch_size}")
    checkpoint = find_checkpoint(checkpoint)
    info = checkpoint_info(checkpoint)
    model_name = model_name or info.get("model")
    if model_name is None:
        raise RMTError(f"{checkpoint} does not name its model: pass --model (rmt_t, rmt_s, ...)")
    torch_device = resolve_device(device)
    dtype = amp_dtype(amp, torch_device)
    model = create_model(model_name, checkpoint=checkpoint).to(torch_device)
    class_names = info.get("class_names")
    data_config = info.get("data_config")
    if data_config is None:
        cfg = model.pretrained_cfg
        data_config = dict(input_size=list(cfg["input_size"]), mean=list(cfg["mean"]), std=list(cfg["std"]),
                           interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    if data is None:
        if class_names != DigitsDataset.classes:
            raise RMTError("this checkpoint was not trained on the bundled digits: pass --data DIR")
        dataset = DigitsDataset("test", img_size=data_config["input_size"][-1])
    else:
        root = Path(data)
        root = root / split if (root / split).is_dir() else root
        dataset = ImageFolderDataset(root, transform=eval_transform(data_config), classes=class_names)
        if class_names is None and len(dataset.classes) != model.num_classes:
            raise RMTError(f"{root} has {len(dataset.classes)} class folders, the model {model.num_classes} outputs")
    if len(dataset) == 0:
        raise RMTError(f"{data} has no images to evaluate")
    loader = eval_loader(dataset, batch_size, workers if data is not None else 0,
                         pin_memory=torch_device.type == "cuda")
    result = evaluate(model, loader, torch_device, amp=dtype, progress=progress)
    return dict(result, model=model_name, checkpoint=str(checkpoint),
                precision=describe_precision(torch_device, dtype))
