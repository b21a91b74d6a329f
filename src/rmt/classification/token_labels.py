"""Generating dense token labels from a teacher (``rmt token-labels``).

For every training image the teacher sees the whole image (resized to its input size, no crop, so
that the label map covers exactly what the training crops are cut from), its final feature map is
classified location by location with its own head, and the top-5 scores and classes per location
are saved in the public Token Labeling format (:mod:`rmt.data.token_label`).

Any timm classifier works as teacher: convolutional ones (features ``(B, C, h, w)``) and token
ones (``(B, N, C)``, prefix tokens dropped, square grid); RMT checkpoints too.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..data.folder import BadSample, ImageFolderDataset, collate_skip_bad
from ..data.token_label import label_path, write_label_map
from ..errors import RMTError, shorten
from ..files import atomic_write, output_folder
from ..models.factory import create_model, list_models
from ..models.weights import read_state_dict
from ..runtime.processes import resolve_device
from ..runtime.progress import progress_bar

__all__ = ["generate_token_labels", "dense_teacher_logits", "build_teacher"]

_logger = logging.getLogger(__name__)


def build_teacher(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """An RMT (any of our names, official or our checkpoints) or any timm model with its weights file."""
    if name.partition(".")[0] in list_models():
        return create_model(name, checkpoint=checkpoint)
    if name not in timm.list_models() and name.partition(".")[0] not in timm.list_models():
        raise RMTError(f"unknown teacher model {name!r} (an rmt_* name or any timm model)")
    if checkpoint is None:
        return timm.create_model(name, pretrained=False)
    if not Path(checkpoint).exists():
        raise RMTError(f"teacher checkpoint not found: {checkpoint}")
    state_dict = read_state_dict(checkpoint)  # safely, with a one-line reason for a file that is not weights
    try:  # timm adapts the weights (its filter function), then loads them strictly
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict))
    except (RuntimeError, KeyError, ValueError) as e:
        raise RMTError(f"the weights in {checkpoint} do not fit the teacher {name}: "
                       f"{shorten(str(e) or type(e).__name__, 300)}") from None


@torch.no_grad()
def dense_teacher_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-location class logits ``(B, K, h, w)``: the model's head applied to each feature vector."""
    features = model.forward_features(images)
    if features.dim() == 3:  # (B, N, C) tokens
        prefix = getattr(model, "num_prefix_tokens", 0)
        features = features[:, prefix:]
        b, n, c = features.shape
        side = math.isqrt(n)
        if side * side != n:
            raise RMTError(f"cannot lay {n} tokens out on a square grid")
        logits = model.forward_head(features.reshape(b * n, 1, c))
        return logits.reshape(b, side, side, -1).permute(0, 3, 1, 2)
    b, c, h, w = features.shape
    logits = model.forward_head(features.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1))
    return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)


class _Indexed(Dataset):
    """``(image, position)`` items, so that each output knows its file."""

    def __init__(self, folder: ImageFolderDataset):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        item = self.folder[index]
        return item if isinstance(item, BadSample) else (item[0], index)


def generate_token_labels(teacher: str, data: str | os.PathLike, output: str | os.PathLike,
                          checkpoint: Optional[str] = None, img_size: Optional[int] = None, topk: int = 5,
                          batch_size: int = 32, workers: int = 4, device: str = "auto",
                          progress: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """Write ``OUTPUT/<class>/<stem>.pt`` label maps for every image of the folder ``data``.

    An ``output`` folder that holds files is refused unless ``overwrite``; the maps are written into
    a staging folder inside it and replace the class folders of the same names only once all are
    written (:func:`rmt.files.output_folder`). Returns ``{"images", "skipped", "grid": [h, w],
    "num_classes"}``.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RMTError(f"--output {output} is a file; give the directory to write the label maps into")
    if output.is_dir() and not overwrite and any(output.iterdir()):
        raise RMTError(f"--output {output} is not empty; choose a new or empty folder, or replace the label maps "
                       f"of its class folders with --overwrite")
    if batch_size < 1:
        raise RMTError(f"--batch-size must be positive, got {batch_size}")
    model = build_teacher(teacher, checkpoint)
    num_classes = getattr(model, "num_classes", None)
    if topk < 1 or (num_classes and topk > num_classes):
        raise RMTError(f"--topk must be between 1 and the teacher's {num_classes} classes, got {topk}")
    if checkpoint is None:
        _logger.warning("no --checkpoint: the teacher is randomly initialised (labels are only good for tests)")
    torch_device = resolve_device(device)
    model.to(torch_device).eval()
    cfg = model.pretrained_cfg
    size = img_size or cfg["input_size"][-1]
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC,
                                                         antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])])
    dataset = _Indexed(ImageFolderDataset(data, transform=transform))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip_bad)
    written, skipped, grid = 0, [], None
    with output_folder(output, overwrite) as staging:
        for batch, bad in progress_bar(loader, progress, desc="token labels"):
            skipped.extend(bad)
            if batch is None:
                continue
            images, positions = batch
            logits = dense_teacher_logits(model, images.to(torch_device)).float()
            scores, indices = logits.topk(min(topk, logits.shape[1]), dim=1)
            grid = list(logits.shape[-2:])
            for position, s, i in zip(positions.tolist(), scores.cpu(), indices.cpu()):
                path = label_path(staging, dataset.folder.samples[position][0])
                atomic_write(path, lambda tmp, s=s, i=i: write_label_map(tmp, s, i))
                written += 1
    if skipped:
        _logger.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0][0])
    return dict(images=written, skipped=len(skipped), grid=grid, num_classes=num_classes, output=str(output))
