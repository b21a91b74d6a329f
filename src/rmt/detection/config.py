"""The detection / instance segmentation config (the official detectors on torchvision's frame, epoch-based):
the shared dense fields (rmt.training.config.DenseRunConfig) plus the detector, its schedule and its data.

Bundled files are ``configs/detection/<name>.yaml`` (``shapes``, ``mask_rcnn_1x``, ...); a file may
name another with ``base:``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ..errors import RMTError
from ..models.factory import split_name
from ..training.config import DenseRunConfig, option

__all__ = ["DetConfig", "ARCHS"]

ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet", "cascade_mask_rcnn")


@dataclass
class DetConfig(DenseRunConfig):
    task = "detection"
    may_change_on_resume = DenseRunConfig.may_change_on_resume + ("epochs",)

    train_split: str = option("train2017", "training split")
    val_split: str = option("val2017", "validation split")
    arch: str = option("mask_rcnn", "detector", choices=ARCHS)
    epochs: int = option(12, "training epochs", check="positive")
    eval_interval: int = option(1, "evaluate and checkpoint every N epochs", check="positive")
    lr_steps: List[int] = option([8, 11], "epochs after which the learning rate is multiplied by lr_gamma",
                                 check="positive")
    lr_gamma: float = option(0.1, "step decay factor", check="fraction")
    min_size: List[int] = option([800], "short side(s) to resize to; training picks one per image, evaluation "
                                        "uses the last", check="positive")
    max_size: int = option(1333, "longest side after resizing", check="positive")
    hflip: float = option(0.5, "horizontal flip probability in training", check="probability")
    anchor_sizes: List[int] = option([32, 64, 128, 256, 512], "anchor size per pyramid level (R-CNN: one scale times "
                                     "the strides 4-64)", check="positive")
    neck_channels: int = option(256, "FPN width; the RoI heads' widths follow it (256 in the paper's configs)",
                                check="positive")
    rpn_post_nms_train: int = option(2000, "RPN proposals kept per image in training", check="positive")
    rpn_post_nms_test: int = option(1000, "RPN proposals kept per image in evaluation", check="positive")
    box_batch_size_per_image: int = option(512, "RoIs sampled per image for the R-CNN box head", check="positive")
    score_thresh: float = option(0.05, "minimum score of a returned detection", check="probability")
    detections_per_img: int = option(100, "detections kept per image", check="positive")

    def check(self) -> None:
        super().check()
        for name in ("min_size", "anchor_sizes"):
            if not getattr(self, name):
                raise RMTError(f"{name} needs at least one size")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise RMTError(f"lr_steps must be increasing, got {self.lr_steps}")
        split_name(self.backbone)
