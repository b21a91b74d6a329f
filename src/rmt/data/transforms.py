"""Transforms shared by the tasks' data code: the evaluation transform of a data config."""
from __future__ import annotations

import math
from typing import Any, Dict

from timm.data import create_transform

__all__ = ["eval_transform", "final_grid"]


def final_grid(img_size: int) -> int:
    """Token grid of RMT's last stage for a square input: stem /4 then three stride-2 convs."""
    return math.ceil(img_size / 32)


def eval_transform(data_config: Dict[str, Any]):
    """Resize + centre crop + normalise, as timm's eval transform (ImageNet-style data)."""
    return create_transform(input_size=tuple(data_config["input_size"]), is_training=False,
                            interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
                            mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))
