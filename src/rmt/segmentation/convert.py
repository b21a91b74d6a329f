"""``rmt convert`` for segmentation: an official (mmseg) RMT Semantic FPN / UperNet checkpoint, or a
segmentation run's ``best.pth``/``last.pth``, to our segmentation model file (what a run's
``model.safetensors`` is: the state dict, with the task, the resolved config and the class names in
its metadata) or to a model folder (that file, ``config.json`` and a ``README.md`` model card).

Importing :mod:`rmt.segmentation` registers the converter with :mod:`rmt.tools.convert`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from ..tools.convert import holds_task, model_card, register_converter, write_dense_model
from .config import SegConfig
from .models import segmentor_from_checkpoint

__all__ = ["is_segmentation_checkpoint", "convert_segmentor"]

_ARCH_NAMES = {"upernet": "UperNet", "semantic_fpn": "Semantic FPN"}


def is_segmentation_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a segmentor: an official mmseg checkpoint (``state_dict`` with
    ``decode_head.conv_seg``), a segmentation run's file, or a model folder of one."""
    return holds_task(path, "segmentation", lambda state: "decode_head.conv_seg.weight" in state)


def _model_card(cfg: SegConfig, class_names: List[str], source: str) -> List[str]:
    names = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    return model_card(
        "image-segmentation", f"{_ARCH_NAMES[cfg.arch]} with {cfg.backbone} (semantic segmentation)",
        "semantic segmentor",
        [f"{len(class_names)} classes: {names}",
         f"test: resize to {cfg.scale[0]}x{cfg.scale[1]} (long x short side, keeping the aspect ratio), "
         f"{cfg.test_mode} inference",
         f"weights converted from: `{source}`"],
        ["rmt seg eval --checkpoint FOLDER --data /path/to/ADEChallengeData2016",
         "rmt seg predict IMAGE --checkpoint FOLDER"],
        "model, cfg, class_names = rmt.segmentation.segmentor_from_checkpoint(FOLDER)")


def convert_segmentor(src: Path, dst: Path, hub: bool, overwrite: bool = False) -> Tuple[str, Path]:
    """Write the segmentor of ``src`` (anything :func:`segmentor_from_checkpoint` reads) as our model file
    ``dst`` (``hub=False``) or as a model folder; returns ``("<arch> <backbone>", written path)``. The
    weights are loaded into the model (every key and shape checked) and saved from it."""
    model, cfg, class_names = segmentor_from_checkpoint(src)
    return write_dense_model("segmentation", model, cfg, class_names, src.name, dst, hub, overwrite,
                             _model_card(cfg, class_names, src.name))


register_converter("segmentation", is_segmentation_checkpoint, convert_segmentor)
