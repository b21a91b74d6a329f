"""From a list of images to the detectors' batched input, as the official mmdet pipelines prepare it.

:class:`DetectionTransform` takes the place of torchvision's ``GeneralizedRCNNTransform`` in our
detectors. Each image (float ``(3, H, W)`` in [0, 1], as the datasets give them) is resized as a
uint8 image with OpenCV to the largest size within ``(max_size, short side)`` that keeps its aspect
ratio, normalised and zero-padded to a multiple of 32 (:mod:`rmt.data.dense_pipeline`: byte for byte
the official test pipeline); training picks the short side per image among ``min_sizes``. Ground
truth follows the image: boxes times the scale factor, clipped to the resized image; masks resized
with nearest-neighbour sampling.

The batch carries ``metas`` (:class:`rmt.detection.ops.ImageMeta` per image). The heads use them
to return boxes and masks in original-image coordinates, as mmdet's ``rescale=True`` does, so
:meth:`DetectionTransform.postprocess` has nothing left to do.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from ..data.dense_pipeline import prepare_image, resize_masks
from .ops import ImageMeta

__all__ = ["DetectionTransform", "SIZE_DIVISOR"]

SIZE_DIVISOR = 32
"""The padded batch's height and width are multiples of this (the coarsest backbone stride)."""


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """HxWx3 uint8 pixels of a ``(3, H, W)`` float image in [0, 1] (exact for images that came from uint8)."""
    return (image.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _resize_target(target: Dict[str, torch.Tensor], meta: ImageMeta) -> Dict[str, torch.Tensor]:
    target = dict(target)
    h, w = meta.img_shape
    boxes = target["boxes"] * meta.scale_factor.to(target["boxes"])
    limit = boxes.new_tensor([w, h, w, h])
    target["boxes"] = torch.minimum(boxes.clamp(min=0), limit)
    if "masks" in target:
        masks = target["masks"]
        resized = resize_masks(masks.cpu().numpy().astype(np.uint8), (h, w))
        target["masks"] = torch.from_numpy(resized).to(masks.device, masks.dtype)
    return target


class DetectionTransform(nn.Module):
    """Resize, normalise and batch detector inputs (see the module docstring).

    Args:
        min_sizes: short sides to train at (one drawn per image from torch's generator); evaluation
            uses the last one.
        max_size: bound on the long side.
    """

    def __init__(self, min_sizes: Sequence[int] = (800,), max_size: int = 1333):
        super().__init__()
        if not min_sizes:
            raise ValueError("min_sizes needs at least one size")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)

    def _scale(self) -> Tuple[int, int]:
        if self.training and len(self.min_sizes) > 1:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        else:
            short = self.min_sizes[-1]
        return self.max_size, short

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None
                ) -> Tuple[ImageList, Optional[List[Dict[str, torch.Tensor]]]]:
        tensors, metas = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images must be (3, H, W) tensors, got shape {tuple(image.shape)}")
            prepared = prepare_image(_to_uint8(image), self._scale(), SIZE_DIVISOR)
            tensors.append(prepared.tensor.to(image.device))
            metas.append(ImageMeta(prepared.ori_shape, prepared.img_shape,
                                   torch.from_numpy(prepared.scale_factor).to(image.device)))
        height = max(t.shape[1] for t in tensors)
        width = max(t.shape[2] for t in tensors)
        batch = tensors[0].new_zeros((len(tensors), 3, height, width))
        for slot, t in zip(batch, tensors):
            slot[:, : t.shape[1], : t.shape[2]].copy_(t)
        image_list = ImageList(batch, [m.img_shape for m in metas])
        image_list.metas = metas
        if targets is not None:
            targets = [_resize_target(t, m) for t, m in zip(targets, metas)]
        return image_list, targets

    def postprocess(self, result: List[Dict[str, torch.Tensor]], image_shapes, original_image_sizes
                    ) -> List[Dict[str, torch.Tensor]]:
        """Nothing to undo: the heads already returned original-image coordinates."""
        return result
