"""The classification training config: the shared run fields (rmt.training.config) plus the model,
the schedule, the recipe's regularisation and augmentation, and token labelling.

The defaults are the paper's ImageNet recipe (DeiT-style, as in the official training script);
``configs/classification/digits.yaml`` is the small default job that ``rmt train`` runs with no
dataset. Every field is also a command-line flag (``batch_size`` -> ``--batch-size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from timm.data import create_transform
from timm.optim import list_optimizers

from ..errors import RMTError, did_you_mean
from ..models.factory import split_name
from ..training.config import RunConfig, option

__all__ = ["ClassificationConfig"]


@dataclass
class ClassificationConfig(RunConfig):
    task = "classification"
    may_change_on_resume = RunConfig.may_change_on_resume + ("epochs", "channels_last")

    # model
    model: str = option("rmt_t", "model name (rmt_t, rmt_s, rmt_b, rmt_l)")
    drop_path: Optional[float] = option(None, "stochastic depth rate (default: the variant's, as in the paper)",
                                        check="below_one")
    finetune: Optional[str] = option(None, "initialise from these weights; keys that do not fit are re-initialised")
    # data
    data: Optional[str] = option(None, "ImageNet-style folder with train/ and val/ (default: the bundled digits)")
    img_size: int = option(224, "training and evaluation input size", check="positive")
    # schedule
    epochs: int = option(300, "number of epochs", check="positive")
    batch_size: int = option(128, "images per process per step", check="positive")
    eval_batch_size: Optional[int] = option(None, "evaluation batch size (default: 2 x batch size)", check="positive")
    # optimizer
    opt: str = option("adamw", "optimizer (any timm optimizer name)")
    lr: Optional[float] = option(None, "learning rate (default: lr_base x global batch / lr_base_size)",
                                 check="positive")
    lr_base: float = option(5e-4, "learning rate at the reference batch size", check="positive")
    lr_base_size: int = option(512, "reference batch size of lr_base", check="positive")
    weight_decay: float = option(0.05, "weight decay (not applied to norms, biases, decay/rotation tables)",
                                 check="non_negative")
    opt_eps: float = option(1e-8, "optimizer epsilon", check="positive")
    momentum: float = option(0.9, "momentum (SGD-type optimizers)", check="probability")
    # learning-rate schedule
    sched: str = option("cosine", "learning-rate schedule (timm's, stepped per update)",
                        choices=("cosine", "tanh", "step", "multistep", "poly"))
    warmup_epochs: float = option(5, "linear warm-up epochs", check="non_negative")
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up", check="non_negative")
    min_lr: float = option(1e-5, "floor of the cosine schedule", check="non_negative")
    # regularisation and augmentation
    smoothing: float = option(0.1, "label smoothing", check="probability")
    mixup: float = option(0.8, "mixup alpha (0 disables)", check="non_negative")
    cutmix: float = option(1.0, "cutmix alpha (0 disables)", check="non_negative")
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch", check="probability")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup", check="probability")
    aa: Optional[str] = option("rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment), or none")
    color_jitter: float = option(0.4, "colour jitter (used only without auto-augment)", check="non_negative")
    reprob: float = option(0.25, "random erasing probability", check="probability")
    remode: str = option("pixel", "random erasing mode", choices=("pixel", "rand", "const"))
    hflip: float = option(0.5, "horizontal flip probability", check="probability")
    scale: Tuple[float, float] = option((0.08, 1.0), "random-resized-crop area range", check="fraction")
    train_interpolation: str = option("bicubic", "interpolation for training crops",
                                      choices=("bicubic", "bilinear", "nearest", "random"))
    interpolation: str = option("bicubic", "interpolation for evaluation resizing",
                                choices=("bicubic", "bilinear", "nearest"))
    crop_pct: float = option(0.875, "evaluation centre-crop fraction (resize to img_size / crop_pct, then crop)",
                             check="fraction")
    repeated_aug: bool = option(True, "repeated augmentation (3 augmented copies of each image per epoch)")
    model_ema: bool = option(True, "keep an exponential moving average of the weights")
    model_ema_decay: float = option(0.99996, "EMA decay at batch 512 (scaled to the global batch as in the "
                                             "reference)", check="below_one")
    # token labelling
    token_label_data: Optional[str] = option(None, "directory of dense token labels; enables token-labelling "
                                                   "training")
    token_label_dense_weight: float = option(0.5, "weight of the dense (token) loss", check="non_negative")
    token_label_cls_weight: float = option(1.0, "weight of the class loss", check="non_negative")
    # execution
    channels_last: bool = option(False, "channels-last memory format for the input batches")
    workers: int = option(8, "data-loading worker processes per training process", check="non_negative")

    def check(self) -> None:
        super().check()
        if self.aa is not None and self.aa.lower() in ("none", ""):
            self.aa = None
        if self.scale[0] > self.scale[1]:
            raise RMTError(f"scale must be (low, high), got {list(self.scale)}")
        if self.batch_size == 1 and self.img_size <= 32:  # RMT's feature map is img_size / 32 (rounded up)
            raise RMTError(f"batch_size 1 with img_size {self.img_size}: the last feature map is 1x1, so its "
                           f"BatchNorm would see one value per channel in training; use --batch-size 2 or more, or "
                           f"--img-size 33 or more")
        if self.batch_size == 1 and not self.token_label_data and (self.mixup > 0 or self.cutmix > 0) \
                and self.mixup_prob > 0:
            raise RMTError("batch_size 1 with mixup/cutmix: they mix pairs of images of a batch; use --batch-size 2 "
                           "or more, or --mixup 0 --cutmix 0")
        if self.data is None and self.token_label_data:
            raise RMTError("token-labelling training needs an image folder: pass --data as well")
        optimizers = list_optimizers()
        if self.opt.lower().removeprefix("lookahead_") not in optimizers:
            raise RMTError(f"opt {self.opt!r} is not a timm optimizer{did_you_mean(self.opt.lower(), optimizers)} "
                           f"(adamw, sgd, lamb, ...: timm.optim.list_optimizers())")
        if self.aa is not None:
            try:  # timm parses the policy string as it builds the transform
                create_transform(input_size=32, is_training=True, auto_augment=self.aa)
            except (AssertionError, ValueError, KeyError, IndexError):
                raise RMTError(f"aa {self.aa!r} is not a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1, "
                               f"augmix-m5-w4-d2, original, v0, or none)") from None
        split_name(self.model)
