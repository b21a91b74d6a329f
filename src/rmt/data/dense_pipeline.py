"""The official dense models' test-time image preparation (mmdet 2.11 / mmseg 0.13 on mmcv 1.x), exactly.

The paper's COCO and ADE20K numbers come from these steps; the released checkpoints give the
released numbers only with them:

1. resize the **uint8** image with OpenCV's bilinear resampling to the largest size within
   ``scale = (long, short)`` that keeps the aspect ratio, each side *rounded* (``int(x + 0.5)``);
2. normalise with the ImageNet mean/std of 0-255 pixels, as OpenCV computes it (subtract, then
   multiply by ``1 / std``);
3. detection only: pad bottom/right with zeros to a multiple of 32.

OpenCV (``opencv-python-headless``) does the resampling: its fixed-point uint8 arithmetic is what the
official models saw, and no float re-implementation gives the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DETECTION_SCALE", "SEGMENTATION_SCALE", "PIXEL_MEAN", "PIXEL_STD", "PreparedImage",
           "keep_ratio_size", "resize_keep_ratio", "resize_masks", "normalize_pixels", "pad_to_multiple",
           "prepare_image"]

DETECTION_SCALE = (1333, 800)
"""``img_scale`` of the official COCO test pipelines (long side <= 1333, short side <= 800)."""
SEGMENTATION_SCALE = (2048, 512)
"""``img_scale`` of the official ADE20K test pipelines."""
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # a dependency; a clear message if someone removed it
        raise ImportError("the official dense pipelines need OpenCV: pip install opencv-python-headless") from e
    return cv2


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> Tuple[int, int]:
    """``(new_height, new_width)``: the largest size within ``scale`` (its larger value bounds the long
    side, its smaller one the short side) at the image's aspect ratio, rounded as mmcv's ``rescale_size``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize_keep_ratio(image: np.ndarray, scale: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``(resized uint8 HxWxC image, scale_factor)``: mmdet's ``Resize(keep_ratio=True)``;
    ``scale_factor`` is ``[w_new / w, h_new / h] * 2`` in float32, what boxes are divided by."""
    if image.dtype != np.uint8:
        raise TypeError(f"resize_keep_ratio expects a uint8 image, got {image.dtype}")
    h, w = image.shape[:2]
    new_h, new_w = keep_ratio_size(h, w, scale)
    cv2 = _cv2()
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    w_scale, h_scale = new_w / w, new_h / h
    return resized, np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)


def resize_masks(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Instance masks ``(N, H, W)`` uint8 resized to ``size = (height, width)`` with OpenCV's nearest-neighbour
    sampling, as the official pipelines resize ground-truth masks with their image."""
    cv2 = _cv2()
    h, w = size
    if len(masks) == 0:
        return np.zeros((0, h, w), dtype=masks.dtype)
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in masks])


def normalize_pixels(image: np.ndarray, mean: Sequence[float] = PIXEL_MEAN, std: Sequence[float] = PIXEL_STD
                     ) -> torch.Tensor:
    """A ``(3, H, W)`` float32 tensor from an RGB uint8 HxWx3 image: ``(pixel - mean) * (1 / std)``, rounded
    as OpenCV rounds it (the official ``Normalize``)."""
    cv2 = _cv2()
    img = image.astype(np.float32)
    cv2.subtract(img, np.float64(np.asarray(mean).reshape(1, -1)), img)
    cv2.multiply(img, 1 / np.float64(np.asarray(std).reshape(1, -1)), img)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def pad_to_multiple(tensor: torch.Tensor, divisor: int = 32) -> torch.Tensor:
    """Zero-pad the last two dimensions at the bottom/right up to multiples of ``divisor``."""
    h, w = tensor.shape[-2:]
    pad_h, pad_w = -h % divisor, -w % divisor
    return F.pad(tensor, (0, pad_w, 0, pad_h)) if pad_h or pad_w else tensor


@dataclass
class PreparedImage:
    """A network input and what is needed to map predictions back to the original image."""

    tensor: torch.Tensor  # (3, H', W') normalised, padded when a divisor was given
    ori_shape: Tuple[int, int]  # original (height, width)
    img_shape: Tuple[int, int]  # resized (height, width), before padding
    scale_factor: np.ndarray  # float32 [w_scale, h_scale, w_scale, h_scale]


def prepare_image(image: np.ndarray, scale: Sequence[int], pad_divisor: int = 0) -> PreparedImage:
    """The whole official test pipeline on one RGB uint8 HxWx3 image (``pad_divisor=32`` for detection,
    0 for segmentation)."""
    resized, scale_factor = resize_keep_ratio(image, scale)
    tensor = normalize_pixels(resized)
    if pad_divisor:
        tensor = pad_to_multiple(tensor, pad_divisor)
    return PreparedImage(tensor, tuple(image.shape[:2]), tuple(resized.shape[:2]), scale_factor)
