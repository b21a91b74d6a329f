"""``rmt convert`` for segmentation: an official (mmseg) RMT Semantic FPN / UperNet checkpoint, or a
segmentation run's ``best.pth``/``last.pth``, to our segmentation model file (what a run's
``model.safetensors`` is: the state dict, with the task, the resolved config and the class names in
its metadata) or to a model folder (that file, ``config.json`` and a ``README.md`` model card).

Importing :mod:`rmt.segmentation` registers the converter with :mod:`rmt.tools.convert`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from ..errors import RMTError
from ..models.hub import HUB_CONFIG
from ..models.weights import META_KEY, open_checkpoint, read_metadata, save_weights
from ..tools.convert import register_converter, save_model_folder
from .config import SegConfig
from .models import segmentor_from_checkpoint

__all__ = ["is_segmentation_checkpoint", "convert_segmentor"]

_ARCH_NAMES = {"upernet": "UperNet", "semantic_fpn": "Semantic FPN"}


def is_segmentation_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a segmentor: an official mmseg checkpoint (``state_dict`` with
    ``decode_head.conv_seg``), a segmentation run's file, or a model folder of one. False for files
    that cannot be read (the classification converter reports those)."""
    try:
        if path.is_dir():
            config = json.loads((path / HUB_CONFIG).read_text(encoding="utf-8"))
            return isinstance(config, dict) and config.get("task") == "segmentation"
        if path.suffix == ".safetensors":
            return read_metadata(path).get("task") == "segmentation"
        raw = open_checkpoint(path)
    except (RMTError, OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    meta = raw.get(META_KEY)
    if isinstance(meta, dict) and meta.get("task") == "segmentation":
        return True
    state = raw.get("state_dict")
    return isinstance(state, dict) and "model" not in raw and "decode_head.conv_seg.weight" in state


def _model_card(cfg: SegConfig, class_names: List[str], source: str) -> List[str]:
    names = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    return [
        "---", "tags:", "- image-segmentation", "- rmt", "---",
        f"# {_ARCH_NAMES[cfg.arch]} with {cfg.backbone} (semantic segmentation)", "",
        "RMT (\"RMT: Retentive Networks Meet Vision Transformers\", Fan et al., CVPR 2024, "
        "[arXiv:2309.11523](https://arxiv.org/abs/2309.11523)) semantic segmentor, written by the `rmt` package.",
        "",
        f"- {len(class_names)} classes: {names}",
        f"- test: resize to {cfg.scale[0]}x{cfg.scale[1]} (long x short side, keeping the aspect ratio), "
        f"{cfg.test_mode} inference",
        f"- weights converted from: `{source}`", "",
        "## Use", "",
        "```",
        "rmt seg eval --checkpoint FOLDER --data /path/to/ADEChallengeData2016",
        "rmt seg predict IMAGE --checkpoint FOLDER",
        "```", "",
        "or in Python: `model, cfg, class_names = rmt.segmentation.segmentor_from_checkpoint(FOLDER)`.",
    ]


def convert_segmentor(src: Path, dst: Path, hub: bool, overwrite: bool = False) -> Tuple[str, Path]:
    """Write the segmentor of ``src`` (anything :func:`segmentor_from_checkpoint` reads) as our model file
    ``dst`` (``hub=False``) or as a model folder; returns ``("<arch> <backbone>", written path)``. The
    weights are loaded into the model (every key and shape checked) and saved from it."""
    model, cfg, class_names = segmentor_from_checkpoint(src)
    metadata = dict(task="segmentation", model=cfg.backbone, num_classes=len(class_names), class_names=class_names,
                    config=cfg.to_dict(), source=src.name)
    description = f"{cfg.arch} {cfg.backbone}"
    if not hub:
        return description, save_weights(model, dst, metadata)
    config = dict(task="segmentation", arch=cfg.arch, backbone=cfg.backbone, num_classes=len(class_names),
                  label_names=class_names, config=cfg.to_dict())
    return description, save_model_folder(model, dst, metadata, config, _model_card(cfg, class_names, src.name),
                                          overwrite)


register_converter("segmentation", is_segmentation_checkpoint, convert_segmentor)
