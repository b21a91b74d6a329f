"""Token labelling data: dense teacher labels that move with the image.

**File format** (the public Token Labeling project's): for the training image
``train/<class>/<stem>.JPEG`` the file ``LABELS/<class>/<stem>.pt`` holds a half tensor
``[2, 5, H, W]``: the teacher's top-5 scores (logits) and class indices at each of ``H x W``
locations of the whole image (18 x 18 for the public NFNet-F6 labels).

**Augmentation**: the label map is scattered to dense logits ``(K, H, W)`` and every geometric
step applied to the image is applied to it as well: the random resized crop (the same box,
resampled with ``roi_align`` to the model's final token grid), the horizontal flip, and the
rotations, shears and translations of RandAugment (:class:`JointRandAugment`, since
torchvision's RandAugment cannot take label maps). Colour operations and random erasing touch the
image only. Items are ``(image, class_index, dense_logits (K, g, g) float16)``.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from ..errors import RMTError
from .folder import BadSample, ImageFolderDataset
from .image import BadImageError, load_rgb

__all__ = ["label_path", "read_label_map", "write_label_map", "dense_logits", "JointRandAugment",
           "TokenLabelDataset", "token_targets"]


def label_path(label_root: str | os.PathLike, image_path: str | os.PathLike) -> Path:
    """``LABELS/<class>/<stem>.pt`` for ``.../<class>/<stem>.<ext>``."""
    image_path = Path(image_path)
    return Path(label_root) / image_path.parent.name / f"{image_path.stem}.pt"


def write_label_map(path: str | os.PathLike, scores: torch.Tensor, indices: torch.Tensor) -> None:
    """Save top-k ``scores`` and class ``indices`` of shape ``(k, H, W)`` in the public format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack([scores.half(), indices.half()]).cpu(), path)


def read_label_map(path: str | os.PathLike) -> torch.Tensor:
    """Load a label file as float ``[2, k, H, W]``, checking its shape."""
    try:
        label = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RMTError(f"token label file missing: {path}") from None
    except Exception as e:
        raise RMTError(f"cannot read token label file {path}: {e}") from None
    if not isinstance(label, torch.Tensor) or label.dim() != 4 or label.shape[0] != 2:
        raise RMTError(f"{path}: expected a [2, k, H, W] tensor of top-k scores and indices")
    return label.float()


def dense_logits(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[2, k, H, W]`` top-k map -> ``(num_classes, H, W)`` logits, zero outside the top k."""
    scores, indices = label[0], label[1].long()
    if indices.min() < 0 or indices.max() >= num_classes:
        raise RMTError(f"token label indices out of range for {num_classes} classes")
    dense = torch.zeros(num_classes, *scores.shape[1:], dtype=scores.dtype)
    return dense.scatter_(0, indices, scores)


class JointRandAugment:
    """RandAugment (timm's ``rand-mM-mstd0.5-inc1`` operations and magnitudes) for an image and a
    dense label map together: geometric operations move both, colour operations only the image.

    ``image``: uint8 ``(3, S, S)``; ``label``: float ``(K, g, g)`` over the same square view.
    """

    GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
    COLOUR = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color",
              "Contrast", "Brightness", "Sharpness")

    def __init__(self, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.5, fill: int = 124):
        self.num_ops, self.magnitude, self.magnitude_std, self.fill = num_ops, magnitude, magnitude_std, fill

    @classmethod
    def from_timm_name(cls, name: str) -> "JointRandAugment":
        """Parse ``rand-m9-mstd0.5-inc1``-style names (``n`` = ops, ``m`` = magnitude)."""
        parts = name.split("-")
        if parts[0] != "rand":
            raise RMTError(f"token labelling supports RandAugment ('rand-...') only, got {name!r}")
        kwargs = {}
        for part in parts[1:]:
            if part.startswith("mstd"):
                kwargs["magnitude_std"] = float(part[4:])
            elif part.startswith("m"):
                kwargs["magnitude"] = float(part[1:])
            elif part.startswith("n"):
                kwargs["num_ops"] = int(part[1:])
        return cls(**kwargs)

    def _level(self) -> float:
        level = self.magnitude
        if self.magnitude_std > 0:
            level = random.gauss(level, self.magnitude_std)
        return min(max(level, 0.0), 10.0) / 10.0

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for op in random.choices(self.GEOMETRIC + self.COLOUR, k=self.num_ops):
            level = self._level()
            sign = -1.0 if random.random() < 0.5 else 1.0
            if op in self.GEOMETRIC:
                image, label = self._geometric(op, level * sign, image, label)
            else:
                image = self._colour(op, level, sign, image)
        return image, label

    def _geometric(self, op, level, image, label):
        angle, shear, frac = 0.0, [0.0, 0.0], [0.0, 0.0]
        if op == "Rotate":
            angle = 30.0 * level
        elif op == "ShearX":
            shear[0] = math.degrees(math.atan(0.3 * level))
        elif op == "ShearY":
            shear[1] = math.degrees(math.atan(0.3 * level))
        elif op == "TranslateX":
            frac[0] = 0.45 * level
        else:
            frac[1] = 0.45 * level
        size, grid = image.shape[-1], label.shape[-1]
        image = TF.affine(image, angle=angle, translate=[frac[0] * size, frac[1] * size], scale=1.0, shear=shear,
                          interpolation=InterpolationMode.BILINEAR, fill=[self.fill] * image.shape[0])
        label = TF.affine(label, angle=angle, translate=[frac[0] * grid, frac[1] * grid], scale=1.0, shear=shear,
                          interpolation=InterpolationMode.BILINEAR, fill=0.0)
        return image, label

    @staticmethod
    def _colour(op, level, sign, image):
        if op == "AutoContrast":
            return TF.autocontrast(image)
        if op == "Equalize":
            return TF.equalize(image)
        if op == "Invert":
            return TF.invert(image)
        if op == "Posterize":
            return TF.posterize(image, max(1, 4 - int(level * 4)))
        if op == "Solarize":
            return TF.solarize(image, 256 - int(level * 256))
        if op == "SolarizeAdd":
            added = (image.int() + int(level * 110)).clamp(0, 255).to(torch.uint8)
            return torch.where(image < 128, added, image)
        factor = max(0.0, 1.0 + 0.9 * level * sign)
        adjust = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
                  "Brightness": TF.adjust_brightness, "Sharpness": TF.adjust_sharpness}[op]
        return adjust(image, factor)


class TokenLabelDataset(Dataset):
    """An image folder with dense teacher labels, augmented jointly (see the module docstring).

    Args:
        root: the training split folder (``train/``).
        label_root: the label folder (``LABELS/<class>/<stem>.pt``).
        num_classes: K, the class count of the teacher's labels.
        img_size: square training size; ``grid`` the model's final token grid (``ceil(img_size/32)``).
        classes: class list (default: the folder's).
    """

    def __init__(self, root, label_root, num_classes: int, img_size: int, grid: int,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, aa: Optional[str] = None,
                 interpolation: str = "bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 reprob: float = 0.0, remode: str = "pixel", classes: Optional[Sequence[str]] = None):
        self.folder = ImageFolderDataset(root, classes=classes)
        self.label_root = Path(label_root)
        if not self.label_root.is_dir():
            raise RMTError(f"token label directory not found: {label_root}")
        missing = [p for p, _ in self.folder.samples[:1000] if not label_path(label_root, p).is_file()]
        if missing:
            raise RMTError(f"{len(missing)} of the first {min(1000, len(self.folder))} images have no token label "
                           f"file, e.g. {label_path(label_root, missing[0])}")
        self.classes, self.samples, self.targets = self.folder.classes, self.folder.samples, self.folder.targets
        self.num_classes, self.img_size, self.grid = num_classes, img_size, grid
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.augment = JointRandAugment.from_timm_name(aa) if aa else None
        self.interpolation = interpolation
        self.normalize = v2.Normalize(mean, std)
        self.erase = None
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(reprob, mode=remode, device="cpu")

    def __len__(self) -> int:
        return len(self.samples)

    def _interp(self) -> InterpolationMode:
        name = random.choice(["bilinear", "bicubic"]) if self.interpolation == "random" else self.interpolation
        return InterpolationMode(name)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = TF.pil_to_tensor(load_rgb(path))
        except BadImageError as e:
            return BadSample(path, str(e).split(": ", 1)[-1])
        label = dense_logits(read_label_map(label_path(self.label_root, path)), self.num_classes)
        image, label = self.joint_transform(image, label)
        image = self.normalize(TF.to_dtype(image, torch.float32, scale=True))
        if self.erase is not None:
            image = self.erase(image)
        return image, target, label.half()

    def joint_transform(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Crop, flip and RandAugment a uint8 image and its dense label map identically."""
        height, width = image.shape[-2:]
        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size],
                                interpolation=self._interp(), antialias=True)
        lh, lw = label.shape[-2:]
        box = torch.tensor([[0, left / width * lw, top / height * lh, (left + w) / width * lw,
                             (top + h) / height * lh]], dtype=label.dtype)
        label = roi_align(label[None], box, output_size=self.grid, aligned=True)[0]
        if random.random() < self.hflip:
            image, label = TF.horizontal_flip(image), label.flip(-1)
        if self.augment is not None:
            image, label = self.augment(image, label)
        return image, label


def token_targets(dense: torch.Tensor, smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Targets from a batch of dense logits ``(B, K, g, g)``.

    Returns ``(class_target (B, K), token_targets (B, g*g, K))``: softmax distributions with label
    smoothing. The class target is the teacher's label for the whole crop (the softmax of the
    mean logits over it), as in the reference token-labelling loss.
    """
    dense = dense.float().flatten(2).transpose(1, 2)  # (B, N, K)
    k = dense.shape[-1]

    def smooth(p):
        return p * (1 - smoothing) + smoothing / k

    return smooth(dense.mean(1).softmax(-1)), smooth(dense.softmax(-1))

