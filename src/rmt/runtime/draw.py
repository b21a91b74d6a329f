"""Pictures of dense predictions (``rmt det predict``, ``rmt seg predict``): boxes, labels and masks
over an image; a colour-coded segmentation.

Drawing uses torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``; class colours
come from one fixed palette so that a class keeps its colour across images.
"""
from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.image import BadImageError, load_rgb
from ..errors import RMTError
from ..files import atomic_write_bytes

__all__ = ["palette", "draw_detections", "draw_segmentation", "picture_paths", "images_to_draw", "save_picture"]


def palette(n: int) -> List[Tuple[int, int, int]]:
    """``n`` distinct, fixed colours (hues spread by the golden ratio)."""
    colours = []
    for k in range(n):
        hue = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75 if k % 2 else 0.95, 0.95 if k % 3 else 0.8)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def draw_detections(image: Image.Image, detections: Dict[str, torch.Tensor], class_names: Sequence[str],
                    mask_threshold: float = 0.5, alpha: float = 0.45) -> Image.Image:
    """The image with each detection's mask (if any), box and ``class score`` label.

    ``detections``: torchvision output for the image (``boxes``, ``labels`` in 1..K, ``scores``,
    optional ``masks`` ``(N, 1, H, W)`` probabilities), already filtered by score.
    """
    canvas = _as_tensor(image)
    colours = palette(len(class_names) + 1)
    labels = detections["labels"].tolist()
    if len(labels) == 0:
        return image.convert("RGB")
    if "masks" in detections:
        masks = detections["masks"][:, 0] > mask_threshold
        canvas = draw_segmentation_masks(canvas, masks.cpu(), alpha=alpha, colors=[colours[k] for k in labels])
    text = [f"{class_names[k - 1]} {s:.2f}" for k, s in zip(labels, detections["scores"].tolist())]
    canvas = draw_bounding_boxes(canvas, detections["boxes"].float().cpu(), labels=text,
                                 colors=[colours[k] for k in labels], width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def draw_segmentation(image: Image.Image, prediction: torch.Tensor, class_names: Sequence[str], alpha: float = 0.5,
                      legend: bool = True, ignore: Optional[int] = None) -> Image.Image:
    """The image blended with one colour per predicted class (``prediction``: ``(H, W)`` class
    indices at the image's size), and a legend of the classes present below it."""
    colours = np.array(palette(len(class_names)), dtype=np.float32)
    pred = prediction.cpu().numpy()
    base = np.array(image.convert("RGB"), dtype=np.float32)
    valid = pred != ignore if ignore is not None else np.ones(pred.shape, dtype=bool)
    overlay = colours[np.clip(pred, 0, len(class_names) - 1)]
    blended = np.where(valid[..., None], base * (1 - alpha) + overlay * alpha, base)
    out = Image.fromarray(blended.round().astype(np.uint8))
    if not legend:
        return out
    present = [int(k) for k in np.unique(pred[valid])]
    row_h = 14
    width = max(out.width, 160)
    per_row = max(1, width // 110)
    rows = -(-len(present) // per_row)
    canvas = Image.new("RGB", (width, out.height + rows * row_h + 4), (255, 255, 255))
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, k in enumerate(present):
        x, y = (i % per_row) * 110 + 4, out.height + (i // per_row) * row_h + 3
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(c) for c in colours[k]))
        draw.text((x + 14, y - 1), str(class_names[k])[:14], fill=(0, 0, 0))
    return canvas


def picture_paths(images: Sequence[str | os.PathLike], output: Optional[str | os.PathLike], suffix: str) -> List[Path]:
    """Where the pictures of ``images`` go: ``output`` itself for one image and a ``.png`` name, else
    ``output/<stem>_<suffix>.png`` (``output`` defaults to ``predictions``); inputs that share a stem
    (``a/x.png b/x.png``) get ``<stem>-2_<suffix>.png``, ``-3``, ... in the order given, so that no
    picture overwrites another."""
    if output is not None and str(output).lower().endswith(".png"):
        if len(images) != 1:
            raise RMTError(f"--output {output} is one file, but {len(images)} images were given: pass a folder")
        return [Path(output)]
    folder = Path(output) if output is not None else Path("predictions")
    if folder.exists() and not folder.is_dir():
        raise RMTError(f"--output {folder} is a file; pass a folder for the pictures (or a .png name for one image)")
    taken, paths = set(), []
    for image in images:
        stem, k = Path(image).stem, 1
        name = f"{stem}_{suffix}.png"
        while name.lower() in taken:  # lower case: x.png and X.png are one file on some file systems
            k += 1
            name = f"{stem}-{k}_{suffix}.png"
        taken.add(name.lower())
        paths.append(folder / name)
    return paths


def images_to_draw(images: Sequence[str | os.PathLike], output: Optional[str | os.PathLike], suffix: str
                   ) -> Iterator[Tuple[str, Path, Union[Image.Image, str]]]:
    """``(path, picture path, image)`` for each of ``images``; the image is the error message (a string)
    for a file that cannot be read, which the caller reports and skips."""
    if not images:
        raise RMTError("no images given")
    for path, picture in zip(images, picture_paths(images, output, suffix)):
        try:
            yield str(path), picture, load_rgb(path)
        except (BadImageError, OSError) as e:
            yield str(path), picture, str(e).removeprefix(f"{path}: ")


def save_picture(picture: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
