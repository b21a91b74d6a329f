"""Checking a dataset's files before a run starts, so that a bad record is one line (exit status 2)
naming the file and the record, not an internal error hours into training.

* :func:`check_coco` checks an instances JSON record by record: images (``id``, ``file_name``,
  ``height``/``width``), categories (``id``, ``name``) and annotations (``id``, ``image_id``, a known
  ``category_id``, ``bbox`` of four finite numbers with ``w, h >= 0``, ``area``, ``iscrowd``, and a
  ``segmentation`` that decodes: polygons of at least 3 points, RLE whose ``size`` is the image's
  and whose runs cover it exactly). It is a pass over the parsed JSON, cheaper than parsing it
  (BENCHMARKS.md, "Smaller choices").
* :func:`check_label_maps` reads every label PNG of a segmentation split (threads; a progress bar
  on a terminal) and checks that it is single-channel, as large as its image (its header only),
  and holds only labels the model has. Decoding the PNG is most of the cost (a minute or two for
  ADE20K's training split on 2 cores: BENCHMARKS.md, "Smaller choices").

Both report through :class:`Problems`: the first few problems and how many there are, one line.
"""
from __future__ import annotations

import math
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import RMTError, shorten

__all__ = ["DataError", "Problems", "check_coco", "check_label_maps", "rle_counts", "regular_file_problem"]


class DataError(RMTError):
    """A dataset file holds records that cannot be trained or evaluated on."""


class Problems:
    """The problems found in ``source``: :meth:`add` each, :meth:`raise_if_any` reports the first
    ``shown`` of them and the total as one :class:`DataError` line."""

    def __init__(self, source: str, shown: int = 3):
        self.source, self.shown = source, shown
        self.note = ""  # said once, after the problems
        self.found: List[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.found) < self.shown:
            self.found.append(text)

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = f" (and {self.count - len(self.found)} more)" if self.count > len(self.found) else ""
        raise DataError(f"{self.source}: {'; '.join(self.found)}{more}{self.note}")


def regular_file_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be read as a data file (missing, or not a regular file), else ``None``.
    Only ``stat``: a FIFO is never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"{path} is missing" if isinstance(e, FileNotFoundError) else f"cannot read {path} ({e.strerror})"
    return None if stat.S_ISREG(mode) else f"{path} is not a regular file"


# ----------------------------------------------------------------------------------------- COCO
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rle_counts(counts: Any) -> Optional[List[int]]:
    """The run lengths of an RLE ``counts`` entry (a list of ints, or COCO's compressed string), or
    ``None`` when it is neither a valid list nor a valid string. (pycocotools decodes a broken string
    into whatever memory holds, so it must be checked before.)"""
    if isinstance(counts, list):
        return counts if all(_is_int(c) and c >= 0 for c in counts) else None
    if not isinstance(counts, str):
        return None
    runs: List[int] = []
    position = 0
    while position < len(counts):  # pycocotools' rleFrString: 5-bit groups, 0x20 = more, 0x10 = sign
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            c = ord(counts[position]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


def _segmentation_problem(seg: Any, size: Optional[Tuple[int, int]]) -> Optional[str]:
    """What is wrong with an annotation's ``segmentation`` (``size``: the image's ``(height, width)``)."""
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None  # no mask: the box is used
    if isinstance(seg, list):
        for k, polygon in enumerate(seg):
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return f"segmentation polygon {k} is not a list of numbers: {shorten(polygon)}"
            if len(polygon) < 6 or len(polygon) % 2:
                return (f"segmentation polygon {k} has {len(polygon)} numbers; a polygon needs x, y pairs of at "
                        f"least 3 points")
        return None
    if not isinstance(seg, dict):
        return f"segmentation is neither polygons nor RLE: {shorten(seg)}"
    rle_size = seg.get("size")
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) and v > 0 for v in rle_size)):
        return f"RLE size must be [height, width], got {shorten(rle_size)}"
    if size is not None and tuple(rle_size) != size:
        return f"RLE size {rle_size} is not the image's [height, width] {list(size)}"
    runs = rle_counts(seg.get("counts"))
    if runs is None:
        return f"RLE counts are not valid (a list of run lengths or a COCO RLE string): {shorten(seg.get('counts'))}"
    if sum(runs) != rle_size[0] * rle_size[1]:
        return f"RLE runs cover {sum(runs)} pixels, the mask has {rle_size[0] * rle_size[1]}"
    return None


def _records(data: Dict[str, Any], key: str, problems: Problems, required: bool = True) -> List[Any]:
    records = data.get(key)
    if records is None and not required:
        return []
    if not isinstance(records, list):
        problems.add(f"{key!r} must be a list, found {shorten(records)}")
        return []
    return records


def check_coco(data: Any, source: str) -> None:
    """Check a parsed instances JSON (module doc); :class:`DataError` naming the first problems.

    Fills in a missing ``area`` of an annotation with its box's (COCOeval needs one)."""
    problems = Problems(f"invalid COCO annotations in {source}")
    if not isinstance(data, dict):
        problems.add(f"expected a JSON object with images, annotations and categories, found {type(data).__name__}")
        problems.raise_if_any()
    sizes: Dict[int, Optional[Tuple[int, int]]] = {}
    for k, image in enumerate(_records(data, "images", problems)):
        where = f"images[{k}]"
        if not isinstance(image, dict):
            problems.add(f"{where} is not an object: {shorten(image)}")
            continue
        image_id = image.get("id")
        if not _is_int(image_id):
            problems.add(f"{where} has no integer 'id' (found {shorten(image_id)})")
            continue
        where = f"{where} (id {image_id})"
        if image_id in sizes:
            problems.add(f"{where}: the id is used by another image too")
        name = image.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.add(f"{where} has no 'file_name' (found {shorten(name)})")
        height, width = image.get("height"), image.get("width")
        if height is None and width is None:
            sizes[image_id] = None
        elif _is_int(height) and _is_int(width) and height > 0 and width > 0:
            sizes[image_id] = (height, width)
        else:
            problems.add(f"{where}: height and width must be positive integers, got {shorten(height)} and "
                         f"{shorten(width)}")
            sizes[image_id] = None
    categories = set()
    for k, category in enumerate(_records(data, "categories", problems)):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or not isinstance(category.get("name"),
                                                                                                  str):
            problems.add(f"categories[{k}] needs an integer 'id' and a 'name': {shorten(category)}")
            continue
        if category["id"] in categories:
            problems.add(f"categories[{k}]: id {category['id']} is used by another category too")
        categories.add(category["id"])
    annotation_ids = set()
    for k, ann in enumerate(_records(data, "annotations", problems, required=False)):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict):
            problems.add(f"{where} is not an object: {shorten(ann)}")
            continue
        if _is_int(ann.get("id")):
            where += f" (id {ann['id']})"
            if ann["id"] in annotation_ids:
                problems.add(f"{where}: the id is used by another annotation too")
            annotation_ids.add(ann["id"])
        else:
            problems.add(f"{where} has no integer 'id' (found {shorten(ann.get('id'))})")
        problem = _annotation_problem(ann, sizes, categories)
        if problem:
            problems.add(f"{where}: {problem}")
    problems.raise_if_any()


def _annotation_problem(ann: Dict[str, Any], sizes: Dict[int, Optional[Tuple[int, int]]],
                        categories: set) -> Optional[str]:
    image_id = ann.get("image_id")
    if not _is_int(image_id):
        return f"no integer 'image_id' (found {shorten(image_id)})"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
        return f"category_id {shorten(ann.get('category_id'))} is not one of the categories"
    if "bbox" not in ann:
        return "no 'bbox'"
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"bbox must be 4 finite numbers [x, y, width, height], got {shorten(box)}"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {shorten(box)} has a negative width or height"
    if "area" not in ann:
        ann["area"] = float(box[2] * box[3])
    elif not _is_number(ann["area"]) or ann["area"] < 0:
        return f"area must be a number >= 0, got {shorten(ann['area'])}"
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), float):
        return f"iscrowd must be 0 or 1, got {shorten(ann.get('iscrowd'))}"
    return _segmentation_problem(ann.get("segmentation"), sizes.get(image_id))


# --------------------------------------------------------------------------- segmentation labels
_SINGLE_CHANNEL = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _label_problem(image_path: Path, label_path: Path, valid: np.ndarray) -> Optional[str]:
    """What is wrong with one label map (``valid[v]``: whether raw value ``v`` may occur)."""
    for path in (image_path, label_path):
        problem = regular_file_problem(path)
        if problem:
            return problem
    try:
        with Image.open(image_path) as image:  # the header only: the size
            image_size = image.size
    except _UNREADABLE as e:
        return f"cannot read {image_path}: {shorten(str(e), 200)}"
    try:
        with Image.open(label_path) as label:
            if label.mode not in _SINGLE_CHANNEL:
                return f"{label_path}: a label map must be single-channel integers, found mode {label.mode}"
            if label.size != image_size:
                return f"{label_path}: label {label.size} and image {image_size} sizes differ"
            if label.mode in ("L", "P"):  # 8 bits: PIL's histogram, ~1 ms less than an array and a bincount
                present = np.flatnonzero(label.histogram())
            else:
                present = np.unique(np.asarray(label))
    except _UNREADABLE as e:
        return f"cannot read {label_path}: {shorten(str(e), 200)}"
    bad = [int(v) for v in present if not (0 <= v < len(valid) and valid[v])]
    if bad:
        return (f"{label_path}: label value{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
                f"{' ...' if len(bad) > 5 else ''} out of range")
    return None


def check_label_maps(samples: Sequence[Tuple[Path, Path]], num_classes: int, reduce_zero_label: bool,
                     ignore_index: int, source: str, workers: Optional[int] = None) -> None:
    """Read every ``(image, label PNG)`` pair's label (module doc); :class:`DataError` naming the first
    problems. Raw values allowed: ``0..num_classes - 1`` and ``ignore_index``, or with
    ``reduce_zero_label`` ``0`` (ignored), ``1..num_classes`` and ``ignore_index``."""
    valid = np.zeros(max(ignore_index, num_classes + 1) + 1, dtype=bool)
    valid[:num_classes + 1 if reduce_zero_label else num_classes] = True
    valid[ignore_index] = True
    allowed = (f"0 (ignored), 1..{num_classes} and {ignore_index} (ignored) with reduce_zero_label"
               if reduce_zero_label else f"0..{num_classes - 1} and {ignore_index} (ignored)")
    problems = Problems(f"invalid segmentation labels in {source}")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes with the GIL released
        results = pool.map(lambda pair: _label_problem(*pair, valid), samples)
        bar = tqdm(results, total=len(samples), desc="checking labels", leave=False, dynamic_ncols=True,
                   disable=not sys.stderr.isatty() or len(samples) < 500)
        for problem in bar:
            if problem:
                problems.add(problem)
    if any(p.endswith("out of range") for p in problems.found):
        problems.note = f" (a model of {num_classes} classes reads {allowed})"
    problems.raise_if_any()
