"""The semantic segmentation config (UperNet, Semantic FPN; iteration-based): the shared dense fields
(rmt.training.config.DenseRunConfig) plus the segmentor, its schedule and its data.

Bundled files are ``configs/segmentation/<name>.yaml`` (``shapes``, ``upernet_160k``,
``semantic_fpn_80k``); a file may name another with ``base:``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..errors import RMTError
from ..models.factory import split_name
from ..training.config import DenseRunConfig, option

__all__ = ["SegConfig", "ARCHS"]

ARCHS = ("upernet", "semantic_fpn")


@dataclass
class SegConfig(DenseRunConfig):
    task = "segmentation"
    may_change_on_resume = DenseRunConfig.may_change_on_resume + ("max_iters",)

    train_split: str = option("training", "training split (images/<split>, annotations/<split>)")
    val_split: str = option("validation", "validation split")
    arch: str = option("upernet", "segmentor", choices=ARCHS)
    num_classes: Optional[int] = option(None, "classes (default: the dataset's class list, else 150)",
                                        check="positive")
    reduce_zero_label: bool = option(True, "label 0 is 'other' and ignored; labels 1..K become 0..K-1")
    max_iters: int = option(160000, "training iterations", check="positive")
    eval_interval: int = option(16000, "evaluate and checkpoint every N iterations", check="positive")
    poly_power: float = option(1.0, "power of the poly learning-rate decay", check="non_negative")
    min_lr: float = option(0.0, "learning rate at the end of the poly decay", check="non_negative")
    scale: List[int] = option([2048, 512], "base (long, short) size; training rescales it by ratio_range",
                              check="positive")
    ratio_range: List[float] = option([0.5, 2.0], "random rescaling range of the training images", check="positive")
    crop_size: List[int] = option([512, 512], "training crop (height, width)", check="positive")
    cat_max_ratio: float = option(0.75, "re-draw a crop (up to 10 times) when one class covers more of it",
                                  check="probability")
    hflip: float = option(0.5, "horizontal flip probability in training", check="probability")
    photometric: bool = option(True, "photometric distortion (brightness, contrast, saturation, hue)")
    aux_weight: float = option(0.4, "weight of the auxiliary FCN head's loss (UperNet; 0 disables it)",
                               check="non_negative")
    channels: Optional[int] = option(None, "decode head width (default: 512 for UperNet, 128 for Semantic FPN)",
                                     check="positive")
    dropout: float = option(0.1, "dropout before the classifier", check="probability")
    test_mode: str = option("whole", "inference: whole image, or slide (sliding window of crop_size)",
                            choices=("whole", "slide"))
    slide_stride: Optional[List[int]] = option(None, "sliding-window stride (default: 2/3 of crop_size)",
                                               check="positive")

    def check(self) -> None:
        super().check()
        for name in ("scale", "ratio_range", "crop_size") + (("slide_stride",) if self.slide_stride else ()):
            if len(getattr(self, name)) != 2:
                raise RMTError(f"{name} needs two values, got {getattr(self, name)}")
        if self.ratio_range[0] > self.ratio_range[1]:
            raise RMTError(f"ratio_range must be (low, high), got {self.ratio_range}")
        split_name(self.backbone)
