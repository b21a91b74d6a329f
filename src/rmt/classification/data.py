"""Building the training and evaluation datasets a config asks for.

* no ``data``: the bundled digits (train / test split);
* ``data`` = ImageNet-style folder: ``DATA/<train_split>`` and ``DATA/<val_split>``, with timm's
  transforms for the recipe (RandAugment, random erasing, bicubic resize + centre crop for eval);
* ``token_label_data``: the training split with dense teacher labels (:mod:`rmt.data.token_label`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset, Subset

from ..data.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from ..data.folder import ImageFolderDataset, find_classes
from ..data.token_label import TokenLabelDataset
from ..data.transforms import eval_transform, final_grid
from ..errors import RMTError
from .config import ClassificationConfig

__all__ = ["DataBundle", "build_datasets"]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: List[str]
    # how images are prepared for the model at evaluation time (saved with checkpoints for `predict`)
    data_config: Dict[str, Any] = field(default_factory=dict)
    name: str = "digits"


def _limit(dataset: Dataset, n: Optional[int]) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    subset = Subset(dataset, range(n))
    subset.classes = dataset.classes  # type: ignore[attr-defined]
    subset.targets = [dataset.targets[i] for i in range(n)]  # type: ignore[attr-defined]
    return subset


def build_datasets(cfg: ClassificationConfig) -> DataBundle:
    """Datasets for a :class:`~rmt.classification.config.ClassificationConfig`."""
    if cfg.data is None:
        train = DigitsDataset("train", img_size=cfg.img_size, augment=True)
        val = DigitsDataset("test", img_size=cfg.img_size, augment=False)
        data_config = dict(input_size=[3, cfg.img_size, cfg.img_size], mean=list(DIGITS_MEAN),
                           std=list(DIGITS_STD), interpolation="bilinear", crop_pct=1.0, grayscale=True)
        return DataBundle(_limit(train, cfg.max_train_samples), _limit(val, cfg.max_val_samples),
                          list(DigitsDataset.classes), data_config, "digits")

    root = Path(cfg.data)
    if not root.is_dir():
        raise RMTError(f"--data: no such directory: {root}")
    for split in (cfg.train_split, cfg.val_split):
        if not (root / split).is_dir():
            raise RMTError(f"--data {root}: expected {root}/{cfg.train_split}/<class>/* and "
                           f"{root}/{cfg.val_split}/<class>/*, but {root / split} does not exist")
    data_config = dict(input_size=[3, cfg.img_size, cfg.img_size], mean=list(IMAGENET_DEFAULT_MEAN),
                       std=list(IMAGENET_DEFAULT_STD), interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    if cfg.token_label_data:
        train = TokenLabelDataset(
            root / cfg.train_split, cfg.token_label_data, num_classes=len(find_classes(root / cfg.train_split)),
            img_size=cfg.img_size, grid=final_grid(cfg.img_size), scale=cfg.scale, hflip=cfg.hflip, aa=cfg.aa,
            interpolation=cfg.train_interpolation, reprob=cfg.reprob, remode=cfg.remode)
        classes = train.classes
    else:
        train_tf = create_transform(
            input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.aa, interpolation=cfg.train_interpolation,
            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=1)
        train = ImageFolderDataset(root / cfg.train_split, transform=train_tf)
        classes = train.classes
    if len(classes) < 2:
        raise RMTError(f"{root / cfg.train_split} has {len(classes)} class folder ({', '.join(classes)}): a "
                       f"classifier needs at least two classes")
    val = ImageFolderDataset(root / cfg.val_split, transform=eval_transform(data_config), classes=classes)
    for name, dataset in (("training", train), ("validation", val)):
        if len(dataset) == 0:
            raise RMTError(f"the {name} split of {root} has no images")
    return DataBundle(_limit(train, cfg.max_train_samples), _limit(val, cfg.max_val_samples), list(classes),
                      data_config, "folder")
