"""Reading image files as RGB, whatever their mode, and telling bad files apart from good ones."""
from __future__ import annotations

import os
import stat
from typing import Union

import numpy as np
from PIL import Image, ImageFile

__all__ = ["IMAGE_EXTENSIONS", "load_rgb", "is_image_file", "BadImageError"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")

# a truncated JPEG must fail loudly (and be skipped), not decode half grey
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(OSError):
    """A file that cannot be decoded as an image."""


def is_image_file(path: Union[str, os.PathLike]) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits (PIL's own conversion clips everything above 255 to white)
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # composite transparent pixels on white rather than on black
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path: Union[str, os.PathLike]) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; :class:`BadImageError` if it is not one (a FIFO or
    another special file included: it is refused, not waited on)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError("not a regular file")
        with Image.open(path) as img:
            img.load()  # decode now: truncated or corrupt data fails here, not later in a transform
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(f"{path}: {reason}") from e
