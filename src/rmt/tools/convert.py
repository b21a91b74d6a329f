"""``rmt convert``: which conversion a checkpoint file needs, and the model folder of the dense tasks.

Classification checkpoints (official ``.pth``, a run's, ours) convert with
:func:`rmt.models.factory.convert_checkpoint`. The task packages above this layer convert their own
files (official mmseg / mmdet checkpoints, their runs' checkpoints) and register how when they are
imported -- the ``rmt`` command imports every task, so ``rmt convert`` knows them all; from Python,
import the task package (``import rmt.segmentation``) before calling :func:`convert`::

    register_converter("segmentation", recognises, convert)

* ``recognises(path) -> bool``: whether the file (or model folder) is one of the task's; cheap (the
  metadata, a memory-mapped look at the keys) and quiet (False for a file it cannot read);
* ``convert(src, dst, hub, overwrite) -> (description, written path)``: write ``dst`` as one
  ``.safetensors`` file in the task's own model format (``hub=False``) or as a model folder
  (:func:`save_model_folder`).

:func:`convert` asks the registered converters in registration order and falls back to classification.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from ..errors import RMTError
from ..files import atomic_write_text, output_folder
from ..models.factory import convert_checkpoint, hub_output
from ..models.hub import HUB_CARD, HUB_CONFIG, HUB_WEIGHTS
from ..models.weights import META_KEY, open_checkpoint, read_metadata, save_weights

__all__ = ["Converter", "register_converter", "find_converter", "convert", "save_model_folder", "holds_task",
           "model_card", "write_dense_model"]


@dataclass(frozen=True)
class Converter:
    """How one task converts its checkpoints (see the module docstring)."""

    task: str
    recognises: Callable[[Path], bool]
    convert: Callable[[Path, Path, bool, bool], Tuple[str, Path]]


_CONVERTERS: Dict[str, Converter] = {}


def register_converter(task: str, recognises: Callable[[Path], bool],
                       convert: Callable[[Path, Path, bool, bool], Tuple[str, Path]]) -> None:
    """Make :func:`convert` hand the files ``recognises`` accepts to ``convert`` (one converter per task:
    registering a task again replaces its converter)."""
    _CONVERTERS[task] = Converter(task, recognises, convert)


def find_converter(src: str | os.PathLike) -> Optional[Converter]:
    """The registered converter that recognises ``src``; ``None``: a classification checkpoint (or none)."""
    return next((c for c in _CONVERTERS.values() if c.recognises(Path(src))), None)


def convert(src: str | os.PathLike, dst: str | os.PathLike, model_name: Optional[str] = None,
            use_ema: bool = False, hub: Optional[bool] = None, overwrite: bool = False) -> Tuple[str, str, Path]:
    """Convert ``src`` to our format: ``(task, description, written path)``.

    ``dst`` ending in ``.safetensors`` is one file, a path without a suffix (or ``hub=True``) a folder.
    ``model_name`` and ``use_ema`` apply to classification checkpoints only (see
    :func:`rmt.models.factory.convert_checkpoint`); a dense task's file names its own model.
    """
    src = Path(src)
    if not src.exists():
        raise RMTError(f"checkpoint not found: {src}")
    converter = find_converter(src)
    if converter is None:
        name, path = convert_checkpoint(src, dst, model_name=model_name, use_ema=use_ema, hub=hub,
                                        overwrite=overwrite)
        return "classification", name, path
    if model_name is not None or use_ema:
        raise RMTError(f"{src} is a {converter.task} checkpoint: --model and --use-ema apply to classification "
                       f"checkpoints only (the file names its model)")
    description, path = converter.convert(src, Path(dst), hub_output(dst, hub), overwrite)
    return converter.task, description, path


def save_model_folder(model: nn.Module, folder: str | os.PathLike, metadata: Mapping[str, Any],
                      config: Mapping[str, Any], card: List[str], overwrite: bool = False) -> Path:
    """A dense task's model folder: ``model.safetensors`` (the state dict and ``metadata``, as a run's
    ``model.safetensors``), ``config.json`` (``config``: what the model is, for people and the Hub) and
    ``README.md`` (``card``, one line per item). Written as one replacement (:func:`rmt.files.output_folder`;
    a folder that holds files is refused unless ``overwrite``); returns ``folder``."""
    folder = Path(folder)
    with output_folder(folder, overwrite) as staging:  # config.json last: a folder that has it is complete
        save_weights(model, staging / HUB_WEIGHTS, dict(metadata))
        atomic_write_text(staging / HUB_CARD, "\n".join(card) + "\n")
        atomic_write_text(staging / HUB_CONFIG, json.dumps(dict(config), indent=2) + "\n")
    return folder


def holds_task(path: Path, task: str, official: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Whether ``path`` holds a model of ``task`` (``"detection"``, ``"segmentation"``): a model folder or
    ``.safetensors`` whose metadata names the task, a run checkpoint of it, or an official mmcv checkpoint
    whose ``state_dict`` ``official`` accepts. False for files that cannot be read (the classification
    converter reports those)."""
    try:
        if path.is_dir():
            config = json.loads((path / HUB_CONFIG).read_text(encoding="utf-8"))
            return isinstance(config, dict) and config.get("task") == task
        if path.suffix == ".safetensors":
            return read_metadata(path).get("task") == task
        raw = open_checkpoint(path)
    except (RMTError, OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    meta = raw.get(META_KEY)
    if isinstance(meta, dict) and meta.get("task") == task:
        return True
    state = raw.get("state_dict")
    return isinstance(state, dict) and "model" not in raw and official(state)


def model_card(tag: str, title: str, what: str, facts: List[str], commands: List[str], python: str) -> List[str]:
    """The ``README.md`` lines of a dense model folder: Hub tags, title, the paper, ``facts`` as a list, the
    ``rmt`` commands that use the folder and the Python line that loads it."""
    return [
        "---", "tags:", f"- {tag}", "- rmt", "---", f"# {title}", "",
        "RMT (\"RMT: Retentive Networks Meet Vision Transformers\", Fan et al., CVPR 2024, "
        f"[arXiv:2309.11523](https://arxiv.org/abs/2309.11523)) {what}, written by the `rmt` package.", "",
        *(f"- {fact}" for fact in facts), "",
        "## Use", "", "```", *commands, "```", "", f"or in Python: `{python}`.",
    ]


def write_dense_model(task: str, model: nn.Module, cfg: Any, class_names: List[str], source: str, dst: Path,
                      hub: bool, overwrite: bool, card: List[str]) -> Tuple[str, Path]:
    """A dense task's model (``cfg``: its run config, with ``arch`` and ``backbone``) written as our model file
    ``dst`` -- the state dict with the task, config and class names in its metadata, what a run's
    ``model.safetensors`` is -- or, with ``hub``, as a model folder with ``card``. Returns
    ``("<arch> <backbone>", written path)``."""
    metadata = dict(task=task, model=cfg.backbone, num_classes=len(class_names), class_names=list(class_names),
                    config=cfg.to_dict(), source=source)
    description = f"{cfg.arch} {cfg.backbone}"
    if not hub:
        return description, save_weights(model, dst, metadata)
    config = dict(task=task, arch=cfg.arch, backbone=cfg.backbone, num_classes=len(class_names),
                  label_names=list(class_names), config=cfg.to_dict())
    return description, save_model_folder(model, dst, metadata, config, card, overwrite)
