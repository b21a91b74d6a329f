"""Segmentation training (``rmt seg train``): ``train(cfg)`` is the whole job, a plain iteration loop.

The data are an ADE20K-layout folder (:class:`rmt.data.ade20k.ADE20KDataset`; the bundled shapes when
``cfg.data`` is None), the model :func:`rmt.segmentation.models.build_segmentor` (it returns its
losses in train mode; ``init_from`` starts it from a whole segmentor, e.g. an official file:
:func:`rmt.segmentation.models.init_segmentor_from`, reported in the log), AdamW with a linear
warm-up, then poly decay (UperNet: power 1.0 over 160k iterations; Semantic FPN: power 0.9 over
80k). Every ``eval_interval`` iterations: mIoU / mAcc / aAcc on the validation split and a round of
the run (``metrics.csv`` row, ``last.pth``, ``best.pth`` by mIoU). The run directory, resume and
signals are :class:`rmt.training.run.TrainingRun`'s; the optimizer step's pieces are
:class:`rmt.training.step.OptimizerStep`'s, called in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..data.ade20k import ADE20KDataset, SegEvalTransform, SegTrainTransform, collate_segmentation, read_class_names
from ..data.shapes import SPLITS, ensure_shapes
from ..errors import RMTError
from ..runtime.draw import draw_segmentation
from ..training.dense_checkpoints import describe_init
from ..training.optim import create_optimizer
from ..training.run import RoundSpec, RunResult, TrainingRun, default_output
from ..training.schedule import warmup_schedule
from .config import SegConfig
from .evaluate import evaluate
from .models import build_segmentor, init_segmentor_from, segmentor_kwargs

__all__ = ["train", "segmentation_data", "class_names_for", "describe_init", "METRIC_COLUMNS"]

DRAWN = 2  # validation images drawn with their segmentation for the run's trackers, at each evaluation

METRIC_COLUMNS = ["iteration", "epoch", "train_loss", "lr", "mIoU", "mAcc", "aAcc", "seconds"]
SPEC = RoundSpec(metric="mIoU", columns=METRIC_COLUMNS, plotted=("mIoU", "mAcc"), unit="iteration")


@dataclass
class SegmentationData:
    name: str
    train: Dataset
    val: ADE20KDataset
    class_names: List[str]


def class_names_for(found: Optional[List[str]], num_classes: Optional[int], where: str) -> List[str]:
    """The class list: the dataset's names, else ``num_classes`` numbered ones (150 by default)."""
    if found is not None:
        if num_classes is not None and num_classes != len(found):
            raise RMTError(f"num_classes is {num_classes}, but {where} names {len(found)} classes")
        return list(found)
    return [f"class_{i}" for i in range(num_classes or 150)]


def segmentation_data(cfg: SegConfig) -> SegmentationData:
    """Training and validation sets of ``cfg`` (generating the shapes set when ``cfg.data`` is None), their
    label maps checked against the class count."""
    root = ensure_shapes() if cfg.data is None else cfg.data
    train_split, val_split = SPLITS if cfg.data is None else (cfg.train_split, cfg.val_split)
    names = class_names_for(read_class_names(Path(root)), cfg.num_classes, str(root))
    train_tf = SegTrainTransform(cfg.scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio, cfg.hflip,
                                 cfg.photometric)
    train = ADE20KDataset(root, train_split, train_tf, cfg.reduce_zero_label, cfg.max_train_samples, len(names))
    val = ADE20KDataset(root, val_split, SegEvalTransform(cfg.scale), cfg.reduce_zero_label, cfg.max_val_samples,
                        len(names))
    return SegmentationData("shapes" if cfg.data is None else str(root), train, val, names)


@torch.no_grad()
def drawn_predictions(model: nn.Module, data: SegmentationData, cfg: SegConfig, run: TrainingRun,
                      count: int = DRAWN) -> Dict[str, Image.Image]:
    """The first ``count`` validation images blended with ``model``'s segmentation, as evaluated
    (``predictions/N`` -> picture)."""
    was_training = model.training
    model.eval()
    pictures = {}
    for index in range(min(count, len(data.val))):
        image, _ = data.val.load(index)
        with run.autocast():
            probs = model.inference(data.val.transform(image)[None].to(run.device), mode=cfg.test_mode,
                                    crop_size=cfg.crop_size, stride=cfg.slide_stride,
                                    output_size=(image.height, image.width))
        pictures[f"predictions/{index}"] = draw_segmentation(image, probs.argmax(1)[0], data.class_names)
    model.train(was_training)
    return pictures


def train(cfg: SegConfig) -> RunResult:
    """Train a segmentor as ``cfg`` says (one process, or DDP under torchrun); returns the main process's summary."""
    output = default_output("seg", cfg.arch, cfg.backbone, data=cfg.data, demo="shapes")
    data = segmentation_data(cfg)  # checked before the run directory is touched
    with TrainingRun(cfg, task="segmentation", spec=SPEC, default_output=output, command="rmt seg train") as run:
        arch, kwargs = segmentor_kwargs(cfg)
        model = build_segmentor(arch, num_classes=len(data.class_names), backbone_weights=cfg.backbone_weights,
                                **kwargs)
        init = init_segmentor_from(model, cfg.init_from, cfg) if cfg.init_from is not None else None
        model, ddp = run.prepare_model(model)
        optimizer = create_optimizer(model, "adamw", run.device, lr=cfg.lr, weight_decay=cfg.weight_decay)
        floor = cfg.min_lr / cfg.lr
        scheduler = warmup_schedule(
            optimizer, lambda update: (1 - floor) * (1 - update / cfg.max_iters) ** cfg.poly_power + floor,
            cfg.warmup_iters, cfg.warmup_ratio)
        workers = 0 if cfg.data is None else cfg.workers
        loader = run.train_loader(data.train, collate_segmentation, workers)
        step = run.begin(model, optimizer, scheduler, meta=dict(model=cfg.backbone, class_names=data.class_names,
                                                                num_classes=len(data.class_names)))
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log_start(f"{cfg.arch} with {cfg.backbone}: {params / 1e6:.2f}M trainable params, "
                      f"{len(data.class_names)} classes", f"{len(data.train)} train / {len(data.val)} val images "
                      f"({data.name})", f"{cfg.batch_size} images per process, {cfg.max_iters} iterations")
        if init is not None:
            run.log(describe_init(cfg.init_from, init, len(data.class_names)))

        def describe(row) -> str:
            return (f"iteration {row['iteration']}/{cfg.max_iters}: train loss {row['train_loss']:.4f}, mIoU "
                    f"{row['mIoU']:.2f}%, mAcc {row['mAcc']:.2f}%, aAcc {row['aAcc']:.2f}%, {row['seconds']:.0f}s")

        while run.iteration < cfg.max_iters:
            ddp.train()
            for images, labels in run.batches(loader):
                images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
                with step.accumulate(ddp):
                    with run.autocast():
                        losses = ddp(images, labels)
                    loss = sum(losses.values())
                    if not step.backward(loss):  # a non-finite loss, skipped (--max-bad-steps)
                        continue
                run.record_loss(loss, count=len(images))
                if not step.due:  # only the last batch of an accumulation updates (--accum-steps)
                    continue
                step.clip_gradients()
                step.optimizer_step()
                step.update_ema()
                step.schedule()
                run.log_update(loss)
                if run.iteration % cfg.eval_interval == 0 or run.iteration == cfg.max_iters:
                    metrics = evaluate(model, data.val, len(data.class_names), run.device, run.info, run.amp_dtype,
                                       mode=cfg.test_mode, crop_size=cfg.crop_size, stride=cfg.slide_stride,
                                       workers=workers, class_names=data.class_names)
                    if run.trackers.active:
                        run.trackers.images(drawn_predictions(model, data, cfg, run), run.iteration)
                    run.end_round({k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}, describe)
                    ddp.train()
                if run.iteration >= cfg.max_iters:
                    break
        return run.finish()
