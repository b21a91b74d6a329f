"""COCO-format instance data for detection and instance segmentation (torchvision detectors).

:class:`CocoDetection` reads an instances JSON with pycocotools and returns
``(image float (3, H, W) in [0, 1], target)`` where ``target`` holds ``boxes`` (``(N, 4)`` xyxy,
pixels), ``labels`` (``1..K``: the categories in id order; 0 is the background), ``masks``
(``(N, H, W)`` uint8, from polygons or RLE), ``image_id``, ``area`` and ``iscrowd``. Crowd regions
are left out of the training targets (as in the reference, whose assigners ignore them) and are
scored by COCOeval from the JSON.

Augmentation (:func:`detection_transforms`): a horizontal flip in training. The reference's resize
(short side ``min_size`` -- one of 480..800 per image for the 3x schedule --, long side <= 1333)
happens inside the torchvision detector (``GeneralizedRCNNTransform``), which also maps its
predictions back to the original image size; see :mod:`rmt.detection.models`.

Layouts: ``root/annotations/instances_<split>.json`` with images in ``root/<split>/`` (COCO 2017:
``train2017``, ``val2017``) or ``root/images/<split>/`` (the bundled shapes).

The JSON is checked record by record when the dataset is built (:func:`rmt.data.checks.check_coco`),
and every image it lists is looked up (a ``stat`` each), so that a malformed annotation or a missing
image is one :class:`rmt.errors.RMTError` line before training starts, not an error mid-epoch.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import RMTError, shorten
from .checks import Problems, check_coco, regular_file_problem
from .image import BadImageError, load_rgb

__all__ = ["CocoDetection", "read_coco", "detection_transforms", "coco_split_paths", "collate_detection"]


def coco_split_paths(root: str | os.PathLike, split: str) -> Tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of ``split`` under ``root``, checked."""
    root = Path(root)
    if not root.is_dir():
        raise RMTError(f"dataset root not found: {root}")
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
        raise RMTError(f"{ann} not found (COCO layout: ROOT/annotations/instances_<split>.json)"
                       + (f"; found {', '.join(found)}" if found else ""))
    for image_dir in (root / split, root / "images" / split):
        if image_dir.is_dir():
            return image_dir, ann
    raise RMTError(f"no image folder for split {split!r}: expected {root / split} or {root / 'images' / split}")


def read_coco(ann_file: Path):
    """A pycocotools ``COCO`` of ``ann_file``, checked record by record first
    (:func:`rmt.data.checks.check_coco`)."""
    from pycocotools.coco import COCO

    problem = regular_file_problem(ann_file)
    if problem:
        raise RMTError(problem)
    try:
        data = json.loads(ann_file.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RMTError(f"{ann_file}: not a COCO instances file ({type(e).__name__}: {shorten(str(e), 200)})") from None
    check_coco(data, str(ann_file))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Images and instance targets of a COCO-format dataset.

    Args:
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: instances JSON.
        transforms: ``(image, target) -> (image, target)`` on torchvision ``tv_tensors``
            (default: :func:`detection_transforms` for evaluation).
        masks: decode instance masks (turn off for box-only detectors to save time).
        skip_empty: leave out images without a non-crowd object (for training, as the reference).
        max_samples: use only the first N images.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Optional[Callable] = None, masks: bool = True, skip_empty: bool = False,
                 max_samples: Optional[int] = None):
        self.image_dir = Path(image_dir)
        self.coco = read_coco(Path(ann_file))
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise RMTError(f"{ann_file} defines no categories")
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        if skip_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
                                         for a in self.coco.imgToAnns.get(i, []))]
        if max_samples is not None:
            ids = ids[:max_samples]
        if not ids:
            raise RMTError(f"{ann_file}: no images" + (" with annotations" if skip_empty else ""))
        missing = Problems(f"images listed in {ann_file} cannot be read")
        for image_id in ids:  # a stat each: a missing image is found now, not at the end of an epoch
            problem = regular_file_problem(self.image_dir / self.coco.imgs[image_id]["file_name"])
            if problem:
                missing.add(problem)
        missing.raise_if_any()
        self.ids = ids
        self.masks = masks
        self.transforms = transforms if transforms is not None else detection_transforms(train=False)

    def __len__(self) -> int:
        return len(self.ids)

    def load_target(self, image_id: int, height: int, width: int) -> Dict[str, torch.Tensor]:
        """The raw target of one image (before transforms)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        target = dict(boxes=boxes, labels=labels,
                      image_id=torch.tensor(image_id), area=torch.tensor([float(a.get("area", 0)) for a in anns]),
                      iscrowd=torch.zeros(len(anns), dtype=torch.int64))
        if self.masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = self._decode(a, height, width)
            target["masks"] = torch.from_numpy(masks)
        return target

    def _decode(self, ann: Dict, height: int, width: int) -> np.ndarray:
        """Polygon, compressed or uncompressed RLE -> ``(H, W)`` uint8 mask."""
        from pycocotools import mask as mask_utils

        seg = ann.get("segmentation")
        if not seg:
            mask = np.zeros((height, width), dtype=np.uint8)  # no mask: fill the box
            x, y, w, h = ann["bbox"]
            mask[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = 1
            return mask
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        if tuple(rle["size"]) != (height, width):  # checked against the JSON's size; this is the file's
            raise RMTError(f"annotation {ann.get('id')}: mask size {list(rle['size'])} is not the size of its image "
                           f"{[height, width]}")
        mask = mask_utils.decode(rle)
        return mask if mask.ndim == 2 else mask.max(axis=2)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = load_rgb(path)
        except FileNotFoundError:
            raise RMTError(f"image listed in the annotations is missing: {path}") from None
        except BadImageError as e:
            raise RMTError(f"cannot read {e}") from None
        width, height = image.size
        target = self.load_target(image_id, height, width)
        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        if "masks" in target:
            target["masks"] = tv_tensors.Mask(target["masks"])
        image, target = self.transforms(tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)),
                                        target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), target


def detection_transforms(train: bool, hflip: float = 0.5) -> Callable:
    """Training: horizontal flip, then to float in [0, 1] (degenerate boxes dropped). Evaluation: to float."""
    from torchvision.transforms import v2

    steps: List = []
    if train and hflip > 0:
        steps += [v2.RandomHorizontalFlip(hflip)]
    steps += [v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps += [v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_per_box_fields)]
    return v2.Compose(steps)


def _per_box_fields(inputs) -> Tuple[torch.Tensor, ...]:
    """The target entries that follow the boxes when degenerate boxes are dropped (masks do anyway)."""
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)


def collate_detection(batch: List) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Images of different sizes stay a list (the detector batches and pads them itself)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
