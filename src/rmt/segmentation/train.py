"""Segmentation training: ``train(cfg)`` is the whole job behind ``rmt seg train``.

The data are an ADE20K-layout folder (:class:`rmt.data.ade20k.ADE20KDataset`; the bundled shapes
when ``cfg.data`` is None), the model :func:`rmt.segmentation.build_segmentor`, the loop
:class:`rmt.dense.engine.DenseTrainer` counted in iterations: linear warm-up, then poly decay
(UperNet: power 1.0 over 160k iterations; Semantic FPN: power 0.9 over 80k). Every
``eval_interval`` iterations: mIoU / mAcc / aAcc on the validation split, a row of
``metrics.csv``, ``last.pth``, and ``best.pth`` by mIoU.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from ..data.ade20k import ADE20KDataset, SegEvalTransform, SegTrainTransform, collate_segmentation
from ..dense.config import SegConfig
from ..dense.engine import DenseData, DenseTrainer, DenseTrainResult, run_training
from ..errors import RMTError
from .evaluate import evaluate
from .models import build_segmentor, segmentor_kwargs

__all__ = ["train", "SegTrainer", "segmentation_data", "class_names_for", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["iteration", "epoch", "train_loss", "lr", "mIoU", "mAcc", "aAcc", "seconds"]


def class_names_for(found: Optional[List[str]], num_classes: Optional[int], where: str) -> List[str]:
    """The class list: the dataset's names, else ``num_classes`` numbered ones (150 by default)."""
    if found is not None:
        if num_classes is not None and num_classes != len(found):
            raise RMTError(f"num_classes is {num_classes}, but {where} names {len(found)} classes")
        return list(found)
    return [f"class_{i}" for i in range(num_classes or 150)]


def segmentation_data(cfg: SegConfig) -> DenseData:
    """Training and validation sets of ``cfg`` (generating the shapes set when ``cfg.data`` is None)."""
    from ..data.shapes import SPLITS, ensure_shapes

    root = ensure_shapes() if cfg.data is None else cfg.data
    train_split, val_split = SPLITS if cfg.data is None else (cfg.train_split, cfg.val_split)
    train_tf = SegTrainTransform(cfg.scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio, cfg.hflip,
                                 cfg.photometric)
    train = ADE20KDataset(root, train_split, train_tf, cfg.reduce_zero_label, cfg.max_train_samples)
    val = ADE20KDataset(root, val_split, SegEvalTransform(cfg.scale), cfg.reduce_zero_label, cfg.max_val_samples)
    names = class_names_for(train.class_names, cfg.num_classes, str(root))
    return DenseData("shapes" if cfg.data is None else str(root), train, val, names, collate_segmentation, None)


class SegTrainer(DenseTrainer):
    task = "seg"
    metric = "mIoU"
    columns = METRIC_COLUMNS

    def build_data(self) -> DenseData:
        return segmentation_data(self.cfg)

    def build_model(self, num_classes: int) -> nn.Module:
        arch, kwargs = segmentor_kwargs(self.cfg)
        return build_segmentor(arch, num_classes=num_classes, backbone_weights=self.cfg.backbone_weights, **kwargs)

    def to_device(self, batch):
        images, labels = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def total_iters(self) -> int:
        return self.cfg.max_iters

    def eval_iters(self) -> int:
        return self.cfg.eval_interval

    def decay(self, iteration: int) -> float:
        floor = self.cfg.min_lr / self.cfg.lr
        return (1 - floor) * (1 - iteration / self.max_iters) ** self.cfg.poly_power + floor

    def evaluate_model(self) -> Dict[str, float]:
        cfg = self.cfg
        result = evaluate(self.model, self.data.val, len(self.class_names), self.device, self.info, self.amp_dtype,
                          mode=cfg.test_mode, crop_size=cfg.crop_size, stride=cfg.slide_stride,
                          workers=self._workers(), class_names=self.class_names)
        return {k: result[k] for k in ("mIoU", "mAcc", "aAcc")}

    def describe_row(self, row) -> str:
        return (f"iteration {row['iteration']}/{self.max_iters}: train loss {row['train_loss']:.4f}, mIoU "
                f"{row['mIoU']:.2f}%, mAcc {row['mAcc']:.2f}%, aAcc {row['aAcc']:.2f}%, {row['seconds']:.0f}s")


def train(cfg: SegConfig) -> DenseTrainResult:
    """Train a segmentor as ``cfg`` says (one process, or DDP under torchrun); returns rank 0's summary."""
    return run_training(SegTrainer, cfg)
