"""The bundled default dataset: scikit-learn's 8x8 handwritten digits.

1,797 real scans of handwritten digits (16 grey levels), split once into a fixed, stratified,
seeded train/test split, upsampled to a small input size and repeated to three channels, so that
the same RGB models and tools work on it. Training augmentation is a small random affine warp
(rotation, shift, scale): digits must not be flipped.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "DIGITS_MEAN", "DIGITS_STD", "DIGITS_TEST_FRACTION", "DIGITS_SPLIT_SEED"]

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _split() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    targets = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(targets)).numpy(), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return images[train_idx], targets[train_idx], images[test_idx], targets[test_idx]


class DigitsDataset(Dataset):
    """``split`` is ``"train"`` (1,437 images) or ``"test"`` (360 images).

    Items are ``(image (3, img_size, img_size) normalised, label)``; ``augment`` applies the
    random affine warp (training).
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", img_size: int = 32, augment: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        train_x, train_y, test_x, test_y = _split()
        images, self.targets = (train_x, train_y) if split == "train" else (test_x, test_y)
        self.img_size = img_size
        self.augment = augment
        # upsample once: bilinear from 8x8 keeps strokes smooth
        self.images = F.interpolate(images[:, None], size=(img_size, img_size), mode="bilinear",
                                    align_corners=False).clamp_(0, 1)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:
            image = _random_affine(image)
        image = (image - 0.5) / 0.5
        return image.expand(3, -1, -1).contiguous(), int(self.targets[index])


def _random_affine(image: torch.Tensor, degrees: float = 12.0, translate: float = 0.1,
                   scale: Tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Rotate, shift and scale a ``(1, H, W)`` image by a random amount (torch's RNG)."""
    angle = (torch.rand(()) * 2 - 1) * degrees * torch.pi / 180
    s = scale[0] + torch.rand(()) * (scale[1] - scale[0])
    tx, ty = (torch.rand(2) * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx]), torch.stack([sin, cos, ty])])[None]
    grid = F.affine_grid(theta, (1, *image.shape), align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
