"""A classifier loaded for inference: ``rmt predict`` and :func:`rmt.predict` classify image files with
it, and export, quantization, the attention pictures and the demo load their model through it.

A :class:`Classifier` is a model together with what it needs to read a photo: its evaluation
transform and its class names.

* the transform is the one the checkpoint was trained with when the checkpoint says so (our run
  checkpoints store their ``data_config``: the digits models read grey 32x32 images), else the
  model's ``pretrained_cfg`` (bicubic resize, 0.875 centre crop, ImageNet mean/std at 224 for the
  official models);
* class names are the ones stored in our checkpoints; 1000-class models without stored names get
  timm's ImageNet-1k descriptions; anything else is labelled ``class_<index>``.

Images are read with :func:`rmt.data.image.load_rgb` (grayscale, palette, RGBA, CMYK, 16-bit ... to
RGB). A file that cannot be read is reported in its :class:`Prediction` (``error``) and the others
are still classified.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from ..data.image import BadImageError, is_image_file, load_rgb
from ..data.image import _to_rgb as to_rgb
from ..data.transforms import eval_transform
from ..errors import RMTError
from ..models.factory import checkpoint_info, create_model, find_checkpoint
from .precision import amp_dtype, autocast, describe_precision, fast_bf16
from .processes import resolve_device

__all__ = [
    "Classifier",
    "ImageSource",
    "Prediction",
    "find_images",
    "iter_predictions",
    "load_classifier",
    "predict",
]

_logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | Image.Image
"""A path to an image file or a directory of them, or an image already in memory."""


@dataclass
class Prediction:
    """The top-k classes of one image, best first; ``error`` says why an image was skipped."""

    path: str
    topk: list[dict[str, Any]] = field(default_factory=list)  # [{"label", "index", "prob"}]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "topk"}`` (and ``"error"`` for a skipped image): the ``--json`` line."""
        out: dict[str, Any] = {"path": self.path, "topk": self.topk}
        if self.error is not None:
            out["error"] = self.error
        return out


def _imagenet_names() -> list[str]:
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def class_names_for(num_classes: int, stored: Sequence[str] | None = None) -> list[str]:
    """Stored names when they fit, ImageNet-1k's for 1000 classes, else ``class_<i>``."""
    if stored is not None and len(stored) == num_classes:
        return [str(n) for n in stored]
    if stored is not None:
        _logger.warning("the checkpoint stores %d class names for %d outputs; ignoring them", len(stored), num_classes)
    if num_classes == 1000:
        return _imagenet_names()
    return [f"class_{i}" for i in range(num_classes)]


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """The evaluation preprocessing of a timm model's ``pretrained_cfg`` as a data config dict."""
    cfg = resolve_data_config(model=model)
    return {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
                "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"]}


def _checked_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """Refuse preprocessing a model cannot be fed with (a damaged or hand-edited checkpoint's)."""
    size = config.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise RMTError(f"the checkpoint's data config has input size {size!r}; expected [channels, height, width], "
                       f"all positive")
    for key in ("mean", "std"):
        if len(config.get(key) or ()) != size[0]:
            raise RMTError(f"the checkpoint's data config has {key} {config.get(key)!r} for {size[0]} channels")
    if not 0 < float(config.get("crop_pct", 1.0)) <= 1:
        raise RMTError(f"the checkpoint's data config has crop_pct {config.get('crop_pct')!r}; expected (0, 1]")
    return config


class Classifier:
    """A model in eval mode with its evaluation transform and class names.

    Args:
        model: a classifier returning logits ``(B, num_classes)``.
        data_config: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct`` and optionally
            ``grayscale`` (read images as grey, repeated to RGB); default: the model's ``pretrained_cfg``.
        class_names: one per output; default: see :func:`class_names_for`.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        amp: ``"auto"`` (bf16 autocast where the device computes bf16 natively -- CUDA, or a CPU with
            AVX512-BF16/AMX -- else float32), ``"none"`` (float32), ``"bf16"`` or ``"fp16"`` (CUDA).
            ``precision`` says which one runs.
    """

    def __init__(self, model: nn.Module, data_config: dict[str, Any] | None = None,
                 class_names: Sequence[str] | None = None, device: str | torch.device = "auto", amp: str = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        if amp == "auto":
            amp = "bf16" if fast_bf16(self.device) else "none"
        self.amp_dtype = amp_dtype(amp, self.device)
        self.precision = describe_precision(self.device, self.amp_dtype)
        self.model = model.to(self.device).eval()
        self.data_config = _checked_data_config(dict(data_config or model_data_config(model)))
        self.transform: Callable[[Image.Image], torch.Tensor] = eval_transform(self.data_config)
        num_classes = getattr(model, "num_classes", None) or len(class_names or [])
        self.class_names = class_names_for(int(num_classes), class_names)

    def read(self, source: ImageSource) -> Image.Image:
        """Load a file (or take an image) as the RGB picture the model will see before resizing."""
        # in-memory images get the same mode handling as files (RGBA on white, 16-bit scaled, ...)
        image = to_rgb(source) if isinstance(source, Image.Image) else load_rgb(source)
        if self.data_config.get("grayscale"):  # e.g. the digits models, trained on grey images
            return image.convert("L").convert("RGB")
        return image

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> normalised tensor ``(3, H, W)`` of the model's input size."""
        return self.transform(image)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` (float32, on the CPU) for a preprocessed batch."""
        with autocast(self.device, self.amp_dtype):
            logits = self.model(batch.to(self.device))
        return logits.float().softmax(dim=-1).cpu()

    def top(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The ``k`` most likely classes of one probability vector, best first."""
        values, indices = probs.topk(min(k, probs.numel()))
        return [{"label": self.class_names[i], "index": i, "prob": float(p)} for p, i in zip(values.tolist(),
                                                                                          indices.tolist())]


def load_classifier(model: str | nn.Module | None = None, checkpoint: str | os.PathLike | None = None,
                    device: str | torch.device = "auto", amp: str = "auto") -> Classifier:
    """A :class:`Classifier` for a model name (or a built model) and a checkpoint.

    ``model`` may be ``None`` when ``checkpoint`` is one of ours (it names its model): a weights file, a
    run checkpoint or a Hub-layout model folder (``rmt convert SRC FOLDER``). The checkpoint's
    stored class names and preprocessing are used when it has them. Without a checkpoint the weights
    are random (a warning says so). ``amp``: see :class:`Classifier`.
    """
    info: dict[str, Any] = {}
    if checkpoint is not None:
        info = checkpoint_info(find_checkpoint(checkpoint))
    if isinstance(model, nn.Module):
        if checkpoint is not None:
            raise RMTError("pass either a built model or a checkpoint to load, not both")
        net = model
    else:
        name = model or info.get("model")
        if name is None:
            raise RMTError(f"{checkpoint} does not name its model: pass --model (rmt_t, rmt_s, ...)"
                           if checkpoint is not None else "pass a model name (rmt_t, rmt_s, ...) or a checkpoint")
        if checkpoint is None:
            _logger.warning("no checkpoint: %s has random weights, its predictions mean nothing", name)
        net = create_model(name, checkpoint=checkpoint)
    return Classifier(net, info.get("data_config"), info.get("class_names"), device, amp)


def find_images(inputs: Iterable[ImageSource]) -> list[Path | Image.Image | Prediction]:
    """Expand directories (recursively, sorted) into their image files; keep files and images as given.

    A missing path or a directory without images becomes a failed :class:`Prediction` in its place.
    """
    found: list[Path | Image.Image | Prediction] = []
    for source in inputs:
        if isinstance(source, Image.Image):
            found.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found.extend(files)
            if not files:
                found.append(Prediction(str(path), error="no image files in this directory"))
        elif path.exists():
            found.append(path)
        else:
            found.append(Prediction(str(path), error="no such file or directory"))
    return found


def iter_predictions(classifier: Classifier, inputs: ImageSource | Iterable[ImageSource], topk: int | None = None,
                     batch_size: int = 16) -> Iterator[Prediction]:
    """Classify ``inputs`` (files, directories, PIL images), yielding one :class:`Prediction` per image
    in input order as each batch finishes. Unreadable files yield a failed prediction. ``topk``: the
    classes to return per image (default: 5, or all of fewer); more than the model has is refused."""
    if topk is None:
        topk = min(5, len(classifier.class_names))
    if topk < 1:
        raise RMTError(f"--topk must be at least 1, got {topk}")
    if topk > len(classifier.class_names):
        raise RMTError(f"--topk {topk} is more than the model's {len(classifier.class_names)} classes")
    if batch_size < 1:
        raise RMTError(f"--batch-size must be positive, got {batch_size}")
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    items = find_images(inputs)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results: list[Prediction] = []
        tensors, slots = [], []
        for n, item in enumerate(chunk, start):
            if isinstance(item, Prediction):
                results.append(item)
                continue
            name = f"<image {n}>" if isinstance(item, Image.Image) else str(item)
            try:
                tensors.append(classifier.preprocess(classifier.read(item)))
            except BadImageError as e:  # anything else is a bug and must not pass for a bad file
                reason = str(e)
                prefix = f"{item}: "
                results.append(Prediction(name, error=reason.removeprefix(prefix)))
                continue
            slots.append(len(results))
            results.append(Prediction(name))
        if tensors:
            probs = classifier.probabilities(torch.stack(tensors))
            for slot, p in zip(slots, probs):
                results[slot].topk = classifier.top(p, topk)
        yield from results


def predict(inputs: ImageSource | Sequence[ImageSource], model: str | nn.Module | None = None,
            checkpoint: str | os.PathLike | None = None, topk: int | None = None, device: str = "auto",
            batch_size: int = 16, amp: str = "auto") -> list[Prediction]:
    """Top-``topk`` classes with probabilities for image files, directories of them, or PIL images.

    Args:
        inputs: one source or a list; directories are searched recursively for image files.
        model: a variant name (``rmt_s``), or ``None`` to take it from one of our checkpoints, or a
            built model (then ``checkpoint`` must be ``None``).
        checkpoint: official ``.pth``, our ``.safetensors`` or a run checkpoint (``best.pth``).
        amp: the precision (see :class:`Classifier`; by default bf16 where the device runs it natively).

    Returns one :class:`Prediction` per image, in order; unreadable files have ``error`` set and
    an empty ``topk``.

    Example::

        >>> import rmt
        >>> [p] = rmt.predict("cat.jpg", model="rmt_s", checkpoint="RMT-S.pth")
        >>> p.topk[0]
        {'label': 'tabby, tabby cat', 'index': 281, 'prob': 0.71}
    """
    classifier = load_classifier(model, checkpoint, device, amp)
    return list(iter_predictions(classifier, inputs, topk=topk, batch_size=batch_size))
