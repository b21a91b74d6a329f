"""Detection training: ``train(cfg)`` is the whole job behind ``rmt det train``.

The data are COCO-format (:class:`rmt.data.coco.CocoDetection`; the bundled shapes when
``cfg.data`` is None), the model :func:`rmt.detection.build_detector`, the loop
:class:`rmt.dense.engine.DenseTrainer` counted in epochs: linear warm-up, then the learning rate
multiplied by ``lr_gamma`` after each epoch in ``lr_steps`` (1x: 12 epochs, steps at 8 and 11;
3x: 36 epochs, steps at 27 and 33). Every ``eval_interval`` epochs: COCO box (and mask) AP on the
validation split, a row of ``metrics.csv``, ``last.pth``, and ``best.pth`` by box AP.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from ..data.coco import CocoDetection, coco_split_paths, collate_detection, detection_transforms
from ..dense.config import DetConfig
from ..dense.engine import DenseData, DenseTrainer, DenseTrainResult, run_training
from .evaluate import evaluate
from .models import build_detector, detector_kwargs

__all__ = ["train", "DetTrainer", "detection_data", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["epoch", "iteration", "train_loss", "lr", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP",
                  "segm_AP50", "segm_AP75", "seconds"]


def detection_data(cfg: DetConfig) -> DenseData:
    """Training and validation sets of ``cfg`` (generating the shapes set when ``cfg.data`` is None)."""
    from ..data.shapes import SPLITS, ensure_shapes

    root = ensure_shapes() if cfg.data is None else cfg.data
    train_split, val_split = SPLITS if cfg.data is None else (cfg.train_split, cfg.val_split)
    masks = cfg.arch in ("mask_rcnn", "cascade_mask_rcnn")
    train = CocoDetection(*coco_split_paths(root, train_split), transforms=detection_transforms(True, cfg.hflip),
                          masks=masks, skip_empty=True, max_samples=cfg.max_train_samples)
    val = CocoDetection(*coco_split_paths(root, val_split), masks=False, max_samples=cfg.max_val_samples)
    return DenseData("shapes" if cfg.data is None else str(root), train, val, train.class_names,
                     collate_detection, collate_detection)


class DetTrainer(DenseTrainer):
    task = "det"
    metric = "bbox_AP"
    columns = METRIC_COLUMNS
    find_unused_parameters = True  # e.g. the mask head when a batch has no positive RoI

    def build_data(self) -> DenseData:
        return detection_data(self.cfg)

    def build_model(self, num_classes: int) -> nn.Module:
        return build_detector(self.cfg.arch, num_classes=num_classes, backbone_weights=self.cfg.backbone_weights,
                              **detector_kwargs(self.cfg))

    def to_device(self, batch):
        images, targets = batch
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images, targets

    def total_iters(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    def eval_iters(self) -> int:
        return self.cfg.eval_interval * self.iters_per_epoch

    def decay(self, iteration: int) -> float:
        passed = sum(iteration >= step * self.iters_per_epoch for step in self.cfg.lr_steps)
        return self.cfg.lr_gamma ** passed

    def evaluate_model(self) -> Dict[str, float]:
        result = evaluate(self.model, self.data.val, self.device, self.info, self.amp_dtype,
                          batch_size=self.cfg.eval_batch_size, workers=self._workers())
        return {k: v for k, v in result.items() if k in self.columns}

    def describe_row(self, row) -> str:
        text = (f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}, box AP "
                f"{row['bbox_AP']:.3f} / AP50 {row['bbox_AP50']:.3f}")
        if "segm_AP" in row:
            text += f", mask AP {row['segm_AP']:.3f} / AP50 {row['segm_AP50']:.3f}"
        return text + f", {row['seconds']:.0f}s"


def train(cfg: DetConfig) -> DenseTrainResult:
    """Train a detector as ``cfg`` says (one process, or DDP under torchrun); returns rank 0's summary."""
    return run_training(DetTrainer, cfg)
