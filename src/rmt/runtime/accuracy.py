"""A classifier's accuracy over a labelled dataset: top-1 / top-5 and cross-entropy, on one process or
many (each evaluates its shard, the sums are combined). Training's validation, ``rmt eval`` and the
int8 models' comparison with float32 (``rmt export --quantize int8``) all measure it here."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import collate_skip_bad
from ..errors import RMTError
from .precision import autocast
from .processes import DistInfo, ShardSampler, all_reduce_sum
from .progress import progress_bar

__all__ = ["evaluate", "eval_loader", "report_bad_files"]

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
