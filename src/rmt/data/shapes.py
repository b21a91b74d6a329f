"""A small synthetic dataset of coloured shapes, in the COCO and the ADE20K layouts.

Each image holds a few non-overlapping circles, squares and triangles of random saturated colours
(class = shape, not colour) on a textured background (a colour gradient, soft stripes and noise).
One set of images carries both annotation formats:

    ROOT/images/<split>/<id>.png                  RGB images
    ROOT/annotations/instances_<split>.json       COCO instances (polygon or RLE masks)
    ROOT/annotations/<split>/<id>.png             ADE20K-style labels: 1 background, 2.. shapes
    ROOT/classes.txt                              the ADE20K-style class names, label 1 first

Splits are ``training`` and ``validation``. Everything is a pure function of the seed: image ``i``
of a split is drawn from its own generator, so any image can be reproduced alone.

``ensure_shapes()`` generates the default set once into a cache directory (``$RMT_CACHE_DIR``, else
``$XDG_CACHE_HOME/rmt`` or ``~/.cache/rmt``); that is what ``rmt det train`` / ``rmt seg train``
use when no ``--data`` is given.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import RMTError

__all__ = ["SHAPE_CLASSES", "SPLITS", "generate_shapes", "ensure_shapes", "default_cache_dir", "draw_shapes_image"]

SHAPE_CLASSES = ("circle", "square", "triangle")
SPLITS = ("training", "validation")
_VERSION = 1  # bump when the drawing changes, so cached copies are regenerated


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at ``(cx, cy)``."""
    sides = {"circle": 32, "square": 4, "triangle": 3}[kind]
    start = angle if kind != "circle" else 0.0
    return [(cx + r * math.cos(start + 2 * math.pi * k / sides), cy + r * math.sin(start + 2 * math.pi * k / sides))
            for k in range(sides)]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A low-saturation texture: two-colour gradient, soft stripes, pixel noise."""
    base = rng.uniform(60, 200, size=3)
    other = np.clip(base + rng.uniform(-50, 50, size=3), 0, 255)
    grey = rng.uniform(0, 1)
    base, other = base * (1 - grey) + base.mean() * grey, other * (1 - grey) + other.mean() * grey
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w) + 1) / 2
    img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    period, phase = rng.uniform(6, 20), rng.uniform(0, 2 * math.pi)
    phi = rng.uniform(0, 2 * math.pi)
    stripes = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * 2 * math.pi / period + phase)
    img += stripes[..., None] * rng.uniform(5, 20)
    img += rng.normal(0, rng.uniform(3, 10), size=img.shape)
    return np.clip(img, 0, 255)


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def draw_shapes_image(rng: np.random.Generator, size: int, max_objects: int = 4
                      ) -> Tuple[Image.Image, List[Dict[str, object]]]:
    """One image and its objects: ``{"category": index into SHAPE_CLASSES, "polygon": [(x, y), ...],
    "mask": bool array}``. Objects do not overlap (their bounding boxes are at least 2 px apart)."""
    image = Image.fromarray(_background(rng, size, size).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects: List[Dict[str, object]] = []
    boxes: List[Tuple[float, float, float, float]] = []
    wanted = int(rng.integers(1, max_objects + 1))
    for _ in range(wanted * 20):
        if len(objects) == wanted:
            break
        category = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.07, 0.17) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        polygon = _polygon(SHAPE_CLASSES[category], cx, cy, r, rng.uniform(0, 2 * math.pi))
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        box = (min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            continue
        mask_img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask_img).polygon(polygon, fill=1)
        mask = np.asarray(mask_img, dtype=bool)
        if mask.sum() < 16:
            continue
        draw.polygon(polygon, fill=_colour(rng))
        boxes.append(box)
        objects.append(dict(category=category, polygon=polygon, mask=mask))
    return image, objects


def _rle(mask: np.ndarray) -> Dict[str, object]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_split(root: Path, split: str, count: int, size: int, seed: int, mask_format: str,
                 max_objects: int) -> None:
    from pycocotools import mask as mask_utils

    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        image, objects = draw_shapes_image(rng, size, max_objects)
        name = f"{i:05d}.png"
        image.save(image_dir / name)
        label = np.ones((size, size), dtype=np.uint8)  # 1: background (0 stays 'other', never used)
        image_id = i + 1
        images.append(dict(id=image_id, file_name=name, height=size, width=size))
        for k, obj in enumerate(objects):
            mask = obj["mask"]
            label[mask] = obj["category"] + 2
            use_rle = mask_format == "rle" or (mask_format == "mixed" and k % 2 == 1)
            if use_rle:
                segmentation = _rle(mask)
            else:
                segmentation = [[round(float(v), 2) for p in obj["polygon"] for v in p]]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=obj["category"] + 1,
                                    segmentation=segmentation, area=float(mask.sum()), bbox=[x, y, w, h],
                                    iscrowd=0))
        Image.fromarray(label).save(label_dir / name)
    categories = [dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(SHAPE_CLASSES)]
    coco = dict(info=dict(description=f"rmt synthetic shapes ({split}), seed {seed}"), images=images,
                annotations=annotations, categories=categories)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate_shapes(root: str | os.PathLike, num_train: int = 300, num_val: int = 60, image_size: int = 160,
                    seed: int = 0, mask_format: str = "polygon", max_objects: int = 4) -> Path:
    """Write the shapes dataset to ``root`` (see the module docstring); returns ``root``.

    ``mask_format``: ``"polygon"``, ``"rle"`` (compressed RLE) or ``"mixed"`` (alternating) COCO
    masks. Deterministic in all arguments.
    """
    if mask_format not in ("polygon", "rle", "mixed"):
        raise RMTError(f"mask_format must be polygon, rle or mixed, got {mask_format!r}")
    if image_size < 32 or num_train < 1 or num_val < 1 or max_objects < 1:
        raise RMTError("shapes: image_size must be >= 32 and the image and object counts positive")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, (num_train, num_val)):
        _write_split(root, split, count, image_size, seed, mask_format, max_objects)
    (root / "classes.txt").write_text("\n".join(("background",) + SHAPE_CLASSES) + "\n")
    return root


def default_cache_dir() -> Path:
    if os.environ.get("RMT_CACHE_DIR"):
        return Path(os.environ["RMT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rmt"


def ensure_shapes(cache_dir: Optional[str | os.PathLike] = None, **kwargs) -> Path:
    """The shapes dataset with these :func:`generate_shapes` arguments, generated on first use.

    Generation goes to a temporary directory renamed into place, so concurrent processes (DDP ranks)
    never see a half-written set.
    """
    params = dict(num_train=300, num_val=50, image_size=128, seed=0, mask_format="polygon", max_objects=4)
    params.update(kwargs)
    name = f"shapes-v{_VERSION}-" + "-".join(f"{v}" for v in params.values())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    if (target / "classes.txt").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        generate_shapes(tmp, **params)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            if not (target / "classes.txt").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
