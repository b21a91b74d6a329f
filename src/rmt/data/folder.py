"""ImageNet-style folders: ``ROOT/<split>/<class>/<image>``. Hidden entries (names starting with ``.``:
``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints/``) are neither classes nor images.

Unlike ``torchvision.datasets.ImageFolder`` this never stops a run for a bad file: a file that
cannot be decoded is returned as a :class:`BadSample`, which :func:`collate_skip_bad` drops from
the batch and reports, so that a corrupt JPEG at hour 30 costs one image, not the run.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset, default_collate

from ..errors import RMTError
from .image import BadImageError, is_image_file, load_rgb

__all__ = ["ImageFolderDataset", "BadSample", "collate_skip_bad", "find_classes"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadSample:
    """Placeholder for a file that could not be decoded."""

    path: str
    reason: str


def find_classes(root: Path) -> List[str]:
    if not root.is_dir():
        raise RMTError(f"no such directory: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise RMTError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    return classes


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, labelled by the sorted class-folder names.

    Args:
        root: the split folder (e.g. ``imagenet/train``).
        transform: applied to the RGB PIL image.
        classes: the class list to use (e.g. the training split's, for validation); folders of
            ``root`` must be among them.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        found = find_classes(self.root)
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise RMTError(f"{self.root} has classes that the training split does not: "
                               f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        self.classes = list(classes)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        empty, skipped = [], 0
        for name in found:
            files = sorted(entry.path for entry in os.scandir(self.root / name)
                           if entry.is_file() and not entry.name.startswith("."))
            images = [f for f in files if is_image_file(f)]
            skipped += len(files) - len(images)
            if not images:
                empty.append(name)
            self.samples.extend((f, self.class_to_idx[name]) for f in images)
        if not self.samples:
            raise RMTError(f"{self.root} holds no image files in its class folders")
        if empty:
            _logger.warning("%s: %d empty class folder(s), e.g. %s", self.root, len(empty), ", ".join(empty[:3]))
        if skipped:
            _logger.warning("%s: ignored %d file(s) without an image extension", self.root, skipped)
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_rgb(path)
        except BadImageError as e:
            return BadSample(path, str(e).split(": ", 1)[-1])
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skip_bad(samples: List) -> Tuple:
    """Collate ``(image, target, ...)`` samples, dropping :class:`BadSample` entries.

    Returns the collated batch with one more element: the list of ``(path, reason)`` dropped
    (the batch is ``None`` when every sample in it was bad).
    """
    bad = [(s.path, s.reason) for s in samples if isinstance(s, BadSample)]
    good = [s for s in samples if not isinstance(s, BadSample)]
    batch = default_collate(good) if good else None
    return batch, bad
