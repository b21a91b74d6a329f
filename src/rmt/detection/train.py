"""Detection training (``rmt det train``): ``train(cfg)`` is the whole job, a plain epoch loop.

The data are COCO-format (:class:`rmt.data.coco.CocoDetection`; the bundled shapes when ``cfg.data``
is None), the model :func:`rmt.detection.models.build_detector` (it returns its losses in train
mode; ``init_from`` starts it from a whole detector, e.g. an official file:
:func:`rmt.detection.models.init_detector_from`, reported in the log), AdamW with a linear
warm-up, then the learning rate multiplied by ``lr_gamma`` after each epoch in ``lr_steps`` (1x: 12
epochs, steps at 8 and 11; 3x: 36 epochs, steps at 27 and 33). Every
``eval_interval`` epochs: COCO box (and mask) AP on the validation split and a round of the run
(``metrics.csv`` row, ``last.pth``, ``best.pth`` by box AP). The run directory, resume and signals
are :class:`rmt.training.run.TrainingRun`'s; the optimizer step's pieces are
:class:`rmt.training.step.OptimizerStep`'s, called in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from ..data.coco import CocoDetection, coco_split_paths, collate_detection, detection_transforms
from ..data.shapes import SPLITS, ensure_shapes
from ..runtime.draw import draw_detections
from ..training.dense_checkpoints import describe_init
from ..training.optim import create_optimizer
from ..training.run import RoundSpec, RunResult, TrainingRun, default_output
from ..training.schedule import warmup_schedule
from .config import DetConfig
from .evaluate import evaluate
from .models import build_detector, detector_kwargs, init_detector_from

__all__ = ["train", "detection_data", "METRIC_COLUMNS"]

DRAWN = 2  # validation images drawn with their detections for the run's trackers, at each evaluation

METRIC_COLUMNS = ["epoch", "iteration", "train_loss", "lr", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP",
                  "segm_AP50", "segm_AP75", "seconds"]
SPEC = RoundSpec(metric="bbox_AP", columns=METRIC_COLUMNS, plotted=("bbox_AP", "bbox_AP50", "segm_AP"))


@dataclass
class DetectionData:
    name: str
    train: Dataset
    val: CocoDetection
    class_names: List[str]


def detection_data(cfg: DetConfig) -> DetectionData:
    """Training and validation sets of ``cfg`` (generating the shapes set when ``cfg.data`` is None)."""
    root = ensure_shapes() if cfg.data is None else cfg.data
    train_split, val_split = SPLITS if cfg.data is None else (cfg.train_split, cfg.val_split)
    masks = cfg.arch in ("mask_rcnn", "cascade_mask_rcnn")
    train = CocoDetection(*coco_split_paths(root, train_split), transforms=detection_transforms(True, cfg.hflip),
                          masks=masks, skip_empty=True, max_samples=cfg.max_train_samples)
    val = CocoDetection(*coco_split_paths(root, val_split), masks=False, max_samples=cfg.max_val_samples)
    return DetectionData("shapes" if cfg.data is None else str(root), train, val, train.class_names)


@torch.no_grad()
def drawn_predictions(model: nn.Module, dataset: CocoDetection, run: TrainingRun, count: int = DRAWN,
                      score_thresh: float = 0.3) -> Dict[str, Image.Image]:
    """The first ``count`` images of ``dataset`` with ``model``'s detections scoring ``score_thresh`` or more
    drawn on them (``predictions/N`` -> picture)."""
    was_training = model.training
    model.eval()
    pictures = {}
    for index in range(min(count, len(dataset))):
        image = dataset[index][0]
        with run.autocast():
            found = model([image.to(run.device)])[0]
        detections = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in found.items()}
        keep = detections["scores"] >= score_thresh
        pictures[f"predictions/{index}"] = draw_detections(to_pil_image(image), {k: v[keep] for k, v in
                                                                                 detections.items()},
                                                           dataset.class_names)
    model.train(was_training)
    return pictures


def train(cfg: DetConfig) -> RunResult:
    """Train a detector as ``cfg`` says (one process, or DDP under torchrun); returns the main process's summary."""
    output = default_output("det", cfg.arch, cfg.backbone, data=cfg.data, demo="shapes")
    data = detection_data(cfg)  # checked before the run directory is touched
    with TrainingRun(cfg, task="detection", spec=SPEC, default_output=output, command="rmt det train") as run:
        model = build_detector(cfg.arch, num_classes=len(data.class_names), backbone_weights=cfg.backbone_weights,
                               **detector_kwargs(cfg))
        init = init_detector_from(model, cfg.init_from, cfg) if cfg.init_from is not None else None
        # e.g. the mask head is unused when a batch has no positive RoI
        model, ddp = run.prepare_model(model, find_unused_parameters=True)
        optimizer = create_optimizer(model, "adamw", run.device, lr=cfg.lr, weight_decay=cfg.weight_decay)
        workers = 0 if cfg.data is None else cfg.workers
        loader = run.train_loader(data.train, collate_detection, workers)
        updates_per_epoch = -(-len(loader) // cfg.accum_steps)
        scheduler = warmup_schedule(
            optimizer, lambda update: cfg.lr_gamma ** sum(update >= s * updates_per_epoch for s in cfg.lr_steps),
            cfg.warmup_iters, cfg.warmup_ratio)
        step = run.begin(model, optimizer, scheduler, meta=dict(model=cfg.backbone, class_names=data.class_names,
                                                                num_classes=len(data.class_names)))
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log_start(f"{cfg.arch} with {cfg.backbone}: {params / 1e6:.2f}M trainable params, "
                      f"{len(data.class_names)} classes", f"{len(data.train)} train / {len(data.val)} val images "
                      f"({data.name})", f"{cfg.batch_size} images per process, {cfg.epochs} epochs of "
                      f"{updates_per_epoch} iterations")
        if init is not None:
            run.log(describe_init(cfg.init_from, init, len(data.class_names)))

        for epoch in run.epochs(cfg.epochs):
            ddp.train()
            for images, targets in run.batches(loader):
                images = [im.to(run.device, non_blocking=True) for im in images]
                targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in targets]
                with step.accumulate(ddp):
                    with run.autocast():
                        losses = ddp(images, targets)
                    loss = sum(losses.values())
                    if not step.backward(loss):  # a non-finite loss, skipped (--max-bad-steps)
                        continue
                run.record_loss(loss, count=len(images))
                if step.due:  # the last batch of an accumulation (--accum-steps)
                    step.clip_gradients()
                    step.optimizer_step()
                    step.update_ema()
                    step.schedule()
                    run.log_update(loss)
            if (epoch + 1) % cfg.eval_interval and epoch + 1 < cfg.epochs:
                continue
            metrics = evaluate(model, data.val, run.device, run.info, run.amp_dtype, batch_size=cfg.eval_batch_size,
                               workers=workers)
            if run.trackers.active:
                run.trackers.images(drawn_predictions(model, data.val, run), run.iteration)

            def describe(row) -> str:
                text = (f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f}, box AP "
                        f"{row['bbox_AP']:.3f} / AP50 {row['bbox_AP50']:.3f}")
                if "segm_AP" in row:
                    text += f", mask AP {row['segm_AP']:.3f} / AP50 {row['segm_AP50']:.3f}"
                return text + f", {row['seconds']:.0f}s"

            run.end_round({k: v for k, v in metrics.items() if k in METRIC_COLUMNS}, describe)
        return run.finish()
