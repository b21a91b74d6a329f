"""ADE20K-layout semantic segmentation data, and the reference's segmentation augmentations.

Layout (ADEChallengeData2016, and the bundled shapes)::

    root/images/<split>/<name>.jpg|png        RGB images (splits: training, validation)
    root/annotations/<split>/<name>.png       one label per pixel

With ``reduce_zero_label`` (ADE20K) label 0 ("other") becomes 255 and is ignored, and labels
1..K become 0..K-1. Class names come from ``root/classes.txt`` (one per line, in training-label
order) or the ``objectInfo150`` table of the ADE20K release; otherwise they are numbered.

Training augmentation (:class:`SegTrainTransform`), as in the reference configs: random rescale of
a base scale (ADE20K: 2048x512, keeping the aspect ratio) by a factor in 0.5-2.0, a random crop
(512x512) re-drawn up to 10 times while one class covers more than 75% of it, horizontal flip,
photometric distortion (brightness, contrast, saturation, hue), ImageNet normalisation, and padding
to the crop size (label 255). Evaluation (:class:`SegEvalTransform`) is the official ADE20K test
pipeline (:func:`rmt.data.dense_pipeline.prepare_image`: OpenCV resize of the uint8 image to the base
scale, OpenCV normalisation, no padding) and keeps the label at the original resolution, where the
metrics are computed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import RMTError
from .checks import check_label_maps
from .dense_pipeline import keep_ratio_size, normalize_pixels, prepare_image
from .image import IMAGE_EXTENSIONS, BadImageError, load_rgb

__all__ = ["ADE20KDataset", "SegTrainTransform", "SegEvalTransform", "IGNORE_INDEX", "IMAGENET_MEAN_255",
           "IMAGENET_STD_255", "read_class_names", "collate_segmentation"]

IGNORE_INDEX = 255
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def read_class_names(root: Path) -> Optional[List[str]]:
    """Class names from ``classes.txt`` or ADE20K's ``objectInfo150.txt/.csv`` (last column), if present."""
    if (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if path.is_file():
            rows = [line.replace(",", "\t").split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
            return [row[-1].strip().split(";")[0] for row in rows]
    return None


def reduce_zero(label: np.ndarray) -> np.ndarray:
    """ADE20K labels: 0 -> 255 (ignored), k -> k - 1."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


class ADE20KDataset(Dataset):
    """``(image, label)`` pairs of one split; ``transform(image: PIL, label: int64 array)`` prepares them.

    Items are ``(image float (3, h, w), label int64 (H, W))`` after the transform (default:
    :class:`SegEvalTransform` at the image's own size, i.e. just normalisation). Files whose names
    start with ``.`` (``.DS_Store``, ``._x.jpg``) are left out. With ``num_classes`` every label map
    is read once up front (:func:`rmt.data.checks.check_label_maps`): a label the model cannot have,
    a multi-channel or wrongly sized map is one :class:`rmt.data.checks.DataError` line now, not a
    failure at the first evaluation.
    """

    def __init__(self, root: str | os.PathLike, split: str = "training", transform: Optional[Callable] = None,
                 reduce_zero_label: bool = True, max_samples: Optional[int] = None,
                 num_classes: Optional[int] = None):
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise RMTError(f"{folder} not found (ADE20K layout: ROOT/images/<split>, ROOT/annotations/<split>)")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.startswith("."))
        labels = {p.stem: p for p in label_dir.glob("*.png") if not p.name.startswith(".")}
        missing = [p.name for p in images if p.stem not in labels]
        if missing:
            raise RMTError(f"{label_dir}: no label PNG for {len(missing)} image(s), e.g. {missing[0]}")
        if not images:
            raise RMTError(f"{image_dir} holds no images")
        if max_samples is not None:
            images = images[:max_samples]
        self.samples = [(p, labels[p.stem]) for p in images]
        if num_classes is not None:
            check_label_maps(self.samples, num_classes, reduce_zero_label, IGNORE_INDEX, f"{label_dir}")
        self.reduce_zero_label = reduce_zero_label
        self.class_names = read_class_names(self.root)
        self.transform = transform if transform is not None else SegEvalTransform(scale=None)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        """The raw image and its label array (reduced when ``reduce_zero_label``)."""
        image_path, label_path = self.samples[index]
        try:
            image = load_rgb(image_path)
            with Image.open(label_path) as f:
                label = np.array(f)
        except (BadImageError, OSError) as e:
            raise RMTError(f"cannot read {e}") from None
        if label.ndim != 2:
            raise RMTError(f"{label_path}: a label map must be single-channel, found shape {label.shape}")
        if label.shape != (image.height, image.width):
            raise RMTError(f"{label_path}: label {label.shape[::-1]} and image {image.size} sizes differ")
        return image, reduce_zero(label) if self.reduce_zero_label else label.astype(np.int64)

    def __getitem__(self, index: int):
        return self.transform(*self.load(index))


def _to_tensors(image: Image.Image, label: Optional[np.ndarray]):
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return img, (torch.from_numpy(label).long() if label is not None else None)


def _normalize(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(3, 1, 1)
    return (img.float() - mean) / std


class SegEvalTransform:
    """The official ADE20K test pipeline (:func:`rmt.data.dense_pipeline.prepare_image` without padding):
    the uint8 image resized with OpenCV to ``scale`` (long, short; keeping the aspect ratio; None keeps
    its size), then normalised; the label stays at the original size."""

    def __init__(self, scale: Optional[Sequence[int]] = (2048, 512)):
        self.scale = tuple(scale) if scale is not None else None

    def __call__(self, image: Image.Image, label: Optional[np.ndarray] = None):
        pixels = np.asarray(image, dtype=np.uint8)
        img = prepare_image(pixels, self.scale, 0).tensor if self.scale is not None else normalize_pixels(pixels)
        lab = torch.from_numpy(label).long() if label is not None else None
        return (img, lab) if label is not None else img


class SegTrainTransform:
    """The reference's training pipeline (see the module docstring); draws from torch's generator."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 photometric: bool = True):
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.crop_size, self.cat_max_ratio = tuple(crop_size), cat_max_ratio
        self.hflip, self.photometric = hflip, photometric

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def _crop_box(self, label: torch.Tensor) -> Tuple[int, int, int, int]:
        ch, cw = self.crop_size
        h, w = label.shape
        box = (0, 0, min(ch, h), min(cw, w))
        for _ in range(10):
            top = int(torch.randint(max(h - ch, 0) + 1, ()))
            left = int(torch.randint(max(w - cw, 0) + 1, ()))
            box = (top, left, min(ch, h), min(cw, w))
            if self.cat_max_ratio >= 1:
                break
            crop = label[top:top + box[2], left:left + box[3]]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def _photometric(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        img = img.float()
        if torch.rand(()) < 0.5:  # brightness: add a delta in [-32, 32]
            img = img + self._uniform(-32, 32)
        contrast_first = bool(torch.rand(()) < 0.5)
        contrast = self._uniform(0.5, 1.5) if torch.rand(()) < 0.5 else None
        if contrast_first and contrast is not None:
            img = img * contrast
        img = img.clamp(0, 255) / 255
        if torch.rand(()) < 0.5:
            img = F.adjust_saturation(img, self._uniform(0.5, 1.5))
        if torch.rand(()) < 0.5:  # hue: up to 18 of OpenCV's 180 hue steps
            img = F.adjust_hue(img, self._uniform(-0.1, 0.1))
        img = img * 255
        if not contrast_first and contrast is not None:
            img = img * contrast
        return img.clamp(0, 255)

    def __call__(self, image: Image.Image, label: np.ndarray):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        img, lab = _to_tensors(image, label)
        ratio = self._uniform(*self.ratio_range)
        size = [max(1, v) for v in keep_ratio_size(img.shape[1], img.shape[2], [s * ratio for s in self.scale])]
        img = F.resize(img, size, antialias=True)
        lab = F.resize(lab[None], size, interpolation=InterpolationMode.NEAREST)[0]
        top, left, h, w = self._crop_box(lab)
        img, lab = img[:, top:top + h, left:left + w], lab[top:top + h, left:left + w]
        if torch.rand(()) < self.hflip:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.photometric:
            img = self._photometric(img)
        img = _normalize(img)
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - img.shape[1], 0), max(cw - img.shape[2], 0)
        if pad_h or pad_w:
            img = torch.nn.functional.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = torch.nn.functional.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return img.contiguous(), lab.contiguous()


def collate_segmentation(batch: List) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack training crops (all the same size)."""
    images, labels = zip(*batch)
    return torch.stack(images), torch.stack(labels)
