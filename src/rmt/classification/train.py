"""Classification training (``rmt train``): the paper's recipe on timm's components, on one process
or many (torchrun + DDP), with token labelling as an option.

``train(cfg)`` is the whole job, a plain loop: data, model, optimizer, schedule, then per epoch the
training batches and an evaluation (of the EMA weights too, when kept). The run directory,
checkpoints, resume and signals are :class:`rmt.training.run.TrainingRun`'s (see its module doc for
the files a run writes); the optimizer step's pieces (accumulation, fp16 scaling, clipping, EMA,
schedule, the non-finite-loss policy) are :class:`rmt.training.step.OptimizerStep`'s, called in the
loop. ``metrics.csv`` columns: :data:`METRIC_COLUMNS`. At the end, ``OUTPUT/hub/``
holds the best weights in timm's Hugging Face layout (rmt.models.hub): ready to upload, and
loadable with ``timm.create_model("local-dir:OUTPUT/hub", pretrained=True)``.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..data import collate_skip_bad
from ..models.factory import create_model
from ..models.hub import save_hub_folder
from ..models.weights import load_matching_weights, read_state_dict
from ..runtime.accuracy import eval_loader, evaluate, report_bad_files
from ..training.optim import create_optimizer
from ..training.run import RoundSpec, RunResult, TrainingRun, default_output
from .config import ClassificationConfig
from .data import build_datasets
from .losses import TokenLabelLoss

__all__ = ["train", "METRIC_COLUMNS"]

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds"]
SPEC = RoundSpec(metric="val_top1", columns=METRIC_COLUMNS, plotted=("val_top1", "val_top5"),
                 losses=("train_loss", "val_loss"), time_column="epoch_seconds")


def _criterion(cfg: ClassificationConfig, mixup: Mixup | None) -> nn.Module:
    if cfg.token_label_data:
        return TokenLabelLoss(cfg.token_label_dense_weight, cfg.token_label_cls_weight, cfg.smoothing)
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup makes soft targets, label smoothing included
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing)
    return nn.CrossEntropyLoss()


def train(cfg: ClassificationConfig) -> RunResult:
    """Train a classifier as ``cfg`` says; returns the run's summary (the main process's view).

    Raises :class:`rmt.errors.RunInterrupted` after saving when SIGTERM/SIGINT stop the run, and
    :class:`rmt.errors.NonFiniteLossError` when the loss goes NaN (see rmt.training.run).
    """
    token_label = bool(cfg.token_label_data)
    output = default_output(cfg.model, data=cfg.data, demo="digits")
    data = build_datasets(cfg)  # checked before the run directory is touched
    with TrainingRun(cfg, task="classification", spec=SPEC, default_output=output, command="rmt train") as run:
        model_kwargs = dict(num_classes=len(data.classes), token_label=token_label)
        if cfg.drop_path is not None:
            model_kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **model_kwargs)
        finetuned = load_matching_weights(model, cfg.finetune) if cfg.finetune else None
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model, ddp = run.prepare_model(model)

        global_batch = cfg.batch_size * cfg.accum_steps * run.info.world_size
        lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
        optimizer = create_optimizer(model, cfg.opt, run.device, lr=lr, weight_decay=cfg.weight_decay,
                                     momentum=cfg.momentum, eps=cfg.opt_eps)
        workers = 0 if data.name == "digits" else cfg.workers
        loader = run.train_loader(data.train, collate_skip_bad, workers, repeats=3 if cfg.repeated_aug else 1)
        val_loader = eval_loader(data.val, cfg.eval_batch_size or 2 * cfg.batch_size, workers, run.info,
                                 pin_memory=run.device.type == "cuda")
        updates_per_epoch = max(1, -(-len(loader) // cfg.accum_steps))
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                           min_lr=cfg.min_lr, step_on_epochs=False,
                                           updates_per_epoch=updates_per_epoch)
        mixup = None
        if not token_label and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                          num_classes=len(data.classes))
        criterion = _criterion(cfg, mixup)
        meta = dict(model=cfg.model, class_names=list(data.classes), num_classes=len(data.classes),
                    token_label=token_label, data_config=data.data_config)
        # the reference scales the EMA decay to the global batch (0.99996 is its value at 512)
        step = run.begin(model, optimizer, scheduler, meta=meta,
                         ema_decay=cfg.model_ema_decay ** (global_batch / 512.0))

        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log_start(f"{cfg.model}: {params / 1e6:.2f}M params, {len(data.classes)} classes",
                      f"{len(data.train)} train / {len(data.val)} val images ({data.name})",
                      f"global batch {global_batch}, lr {lr:.3g}")
        if finetuned:
            fresh = finetuned["reinitialised"]
            run.log(f"finetune: loaded {len(finetuned['loaded'])} tensors from {cfg.finetune}; re-initialised "
                    f"{len(fresh)}: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}")

        for epoch in run.epochs(cfg.epochs):
            ddp.train()
            bad = []
            for batch, skipped in run.batches(loader):
                bad.extend(skipped)
                if batch is None:  # every image of the batch was unreadable
                    continue
                images, targets = batch[0].to(run.device, non_blocking=True), batch[1].to(run.device)
                dense = batch[2].to(run.device, non_blocking=True) if token_label else None
                if mixup is not None:
                    if len(images) % 2:  # mixup pairs the batch with its reverse: drop one odd image
                        images, targets = images[:-1], targets[:-1]
                    images, targets = mixup(images, targets)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with step.accumulate(ddp):
                    with run.autocast():
                        outputs = ddp(images)
                        loss = criterion(outputs, dense) if token_label else criterion(outputs, targets)
                    if not step.backward(loss):  # a non-finite loss, skipped (--max-bad-steps)
                        continue
                run.record_loss(loss, count=len(images))
                if step.due:  # the last batch of an accumulation (--accum-steps)
                    step.clip_gradients()
                    step.optimizer_step()
                    step.update_ema()
                    step.schedule()
                    run.log_update(loss)
            report_bad_files(bad, f"epoch {epoch + 1}")

            val = evaluate(model, val_loader, run.device, run.info, run.amp_dtype, channels_last=cfg.channels_last)
            ema = None
            if run.ema is not None:
                ema = evaluate(run.ema.module, val_loader, run.device, run.info, run.amp_dtype, desc="eval ema",
                               channels_last=cfg.channels_last)

            def describe(row, ema=ema) -> str:
                return (f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
                        f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%, "
                        f"{row['epoch_seconds']:.1f}s ({row['images_per_second']:.0f} img/s)"
                        + (f", EMA top-1 {ema['top1']:.2f}%" if ema is not None else ""))

            run.end_round(dict(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"]), describe)
        result = run.finish()
        if run.info.is_main and result.best_value is not None:  # the best weights, ready to share (timm's Hub layout)
            model.load_state_dict(read_state_dict(run.output / "model.safetensors"))
            save_hub_folder(model, run.output / "hub", model_name=cfg.model, class_names=data.classes,
                            data_config=data.data_config, metrics={"val_top1": result.best_value,
                                                                   "epoch": result.best_at},
                            overwrite=True)  # hub/ is the run's own (a resumed run rewrites it)
        return result
