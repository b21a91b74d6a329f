"""Evaluation: top-1 / top-5 accuracy and cross-entropy over a dataset, on one or many processes."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..data.folder import collate_skip_bad
from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate", "evaluate_checkpoint", "ShardSampler", "eval_loader", "autocast_context",
           "report_bad_files"]

_logger = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each sample is evaluated exactly once overall
    (unlike ``DistributedSampler``, which pads with repeats)."""

    def __init__(self, length: int, info: DistInfo):
        self.indices = list(range(info.rank, length, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, info: DistInfo, pin_memory: bool = False):
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                      num_workers=workers, collate_fn=collate_skip_bad, pin_memory=pin_memory,
                      persistent_workers=False, generator=torch.Generator().manual_seed(0))


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def report_bad_files(bad: Sequence, where: str) -> None:
    """Log how many distinct files could not be decoded, and the first few with their reasons."""
    unique = list(dict(bad).items())  # a file drawn several times (repeated augmentation) counts once
    if unique:
        shown = "; ".join(f"{p} ({r})" for p, r in unique[:3])
        _logger.warning("%s: skipped %d unreadable image(s): %s%s", where, len(unique), shown,
                        " ..." if len(unique) > 3 else "")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, info: DistInfo = DistInfo(),
             amp_dtype: Optional[torch.dtype] = None, progress: bool = True, desc: str = "eval",
             channels_last: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Returns ``{"top1", "top5", "loss", "images"}``; with several processes each evaluates its
    shard and the sums are reduced, so every process returns the totals.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, images
    bad: List = []
    show = progress and info.is_main and sys.stderr.isatty()
    for batch, skipped in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        bad.extend(skipped)
        if batch is None:
            continue
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(),
                                hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(targets)],
                               dtype=torch.float64)
    model.train(was_training)
    totals = all_reduce_sum(totals.to(device if info.distributed and device.type == "cuda" else "cpu"), info).cpu()
    report_bad_files(bad, desc)
    n = max(totals[3].item(), 1.0)
    return dict(top1=100.0 * totals[1].item() / n, top5=100.0 * totals[2].item() / n,
                loss=totals[0].item() / n, images=int(totals[3].item()))


def evaluate_checkpoint(model_name: Optional[str], checkpoint: str, data: Optional[str] = None, split: str = "val",
                        batch_size: int = 64, workers: int = 4, device: str = "auto",
                        amp: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Evaluate a checkpoint (ours or official) on an image folder, or on the digits test split.

    ``data`` is an ImageNet-style root (``DATA/<split>/<class>/*``) or a split folder itself. The
    checkpoint's class names (ours) map folder names to outputs; without them (official weights)
    the sorted folder names are the class indices, as ImageNet's synset folders are. Images are
    prepared as the checkpoint's data config says, else as the model's ``pretrained_cfg`` (bicubic
    resize to 256, 224 centre crop for the official models).
    """
    from pathlib import Path

    from ..data import DigitsDataset, ImageFolderDataset, eval_transform
    from ..errors import RMTError
    from ..models.factory import checkpoint_info, create_model, split_name
    from .distributed import resolve_device

    if model_name is not None:
        split_name(model_name)  # a wrong name is reported before any file is read
    if not Path(checkpoint).is_file():
        raise RMTError(f"checkpoint not found: {checkpoint}")
    info = checkpoint_info(checkpoint)
    model_name = model_name or info.get("model")
    if model_name is None:
        raise RMTError(f"{checkpoint} does not name its model: pass --model (rmt_t, rmt_s, ...)")
    model = create_model(model_name, checkpoint=checkpoint)
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
    torch_device = resolve_device(device, DistInfo())
    model.to(torch_device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "none")
    loader = eval_loader(dataset, batch_size, workers if data is not None else 0, DistInfo(),
                         pin_memory=torch_device.type == "cuda")
    result = evaluate(model, loader, torch_device, DistInfo(), amp_dtype, progress=progress)
    return dict(result, model=model_name, checkpoint=str(checkpoint))
