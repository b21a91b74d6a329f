"""Detection and segmentation configs: flat dataclasses filled from defaults, a YAML file, then flags.

:class:`DetConfig` and :class:`SegConfig` share :class:`DenseConfig`'s fields (backbone, data,
optimizer, execution). Bundled files are ``configs/det_<name>.yaml`` and ``configs/seg_<name>.yaml``
(``load_config(DetConfig, "mask_rcnn_1x")``); a file may name another with ``base:``. Every field
is also a command-line flag (``batch_size`` -> ``--batch-size``). Unknown keys and bad values
raise :class:`rmt.errors.RMTError` with one clear line. The resolved config is saved with each run.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Type, TypeVar

import yaml

from ..errors import RMTError, did_you_mean

__all__ = ["DenseConfig", "DetConfig", "SegConfig", "load_config", "save_config", "config_from_dict",
           "bundled_configs", "add_config_flags", "flag_overrides", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
C = TypeVar("C", bound="DenseConfig")


def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help))
    return field(default=default, metadata=dict(help=help))


@dataclass
class DenseConfig:
    """Fields shared by detection and segmentation."""

    prefix: ClassVar[str] = ""
    choices: ClassVar[Dict[str, tuple]] = {"amp": ("auto", "none", "bf16", "fp16")}
    positive: ClassVar[tuple] = ("batch_size", "eval_batch_size", "lr", "eval_interval", "log_interval")
    non_negative: ClassVar[tuple] = ("weight_decay", "warmup_iters", "warmup_ratio", "workers")

    # backbone
    backbone: str = _f("rmt_t", "backbone variant (rmt_t, rmt_s, rmt_b, rmt_l)")
    backbone_weights: Optional[str] = _f(None, "ImageNet weights for the backbone (official .pth or ours)")
    drop_path: Optional[float] = _f(None, "backbone stochastic depth (default: the variant's)")
    decomposed: Optional[List[bool]] = _f(None, "per stage, decomposed MaSA (default: the variant's)")
    frozen_stages: int = _f(-1, "freeze the stem (0) and the first N stages (N >= 1); -1 trains all")
    norm_eval: bool = _f(False, "keep the backbone's BatchNorm layers frozen in eval mode")
    # data
    data: Optional[str] = _f(None, "dataset root (default: the bundled synthetic shapes, generated once)")
    train_split: str = _f("train2017", "training split")
    val_split: str = _f("val2017", "validation split")
    max_train_samples: Optional[int] = _f(None, "use only the first N training images (quick checks)")
    max_val_samples: Optional[int] = _f(None, "use only the first N validation images (quick checks)")
    # optimisation
    batch_size: int = _f(2, "images per process per step")
    eval_batch_size: int = _f(1, "images per process per evaluation step")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to norms and biases)")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    warmup_iters: int = _f(500, "linear warm-up iterations")
    warmup_ratio: float = _f(0.001, "learning-rate factor at the start of warm-up")
    eval_interval: int = _f(1, "evaluate and checkpoint every N epochs (detection) / iterations (segmentation)")
    # execution
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    amp: str = _f("auto", "autocast dtype: none, bf16, fp16 or auto (bf16 on CUDA, none on CPU)")
    sync_bn: bool = _f(True, "synchronise BatchNorm statistics across CUDA processes")
    grad_checkpointing: bool = _f(False, "recompute backbone blocks in backward to save memory")
    workers: int = _f(4, "data-loading worker processes per training process")
    seed: int = _f(0, "random seed")
    output: Optional[str] = _f(None, "run directory (default: runs/<task>-<arch>-<backbone>-<time>)")
    resume: Optional[str] = _f(None, "checkpoint to resume from, or 'auto' for OUTPUT/last.pth")
    log_interval: int = _f(50, "iterations between log lines when the output is not a terminal")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Range and choice checks; raises :class:`RMTError` naming the first bad value."""
        for name in self.positive:
            if getattr(self, name) <= 0:
                raise RMTError(f"{name} must be positive, got {getattr(self, name)}")
        for name in self.non_negative:
            if getattr(self, name) < 0:
                raise RMTError(f"{name} must not be negative, got {getattr(self, name)}")
        for name, options in self.choices.items():
            value = getattr(self, name)
            if value not in options:
                raise RMTError(f"{name} must be one of {', '.join(options)}, got {value!r}"
                               f"{did_you_mean(str(value), options)}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise RMTError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.decomposed is not None and len(self.decomposed) != 4:
            raise RMTError(f"decomposed needs 4 values (one per stage), got {len(self.decomposed)}")
        if not -1 <= self.frozen_stages <= 4:
            raise RMTError(f"frozen_stages must be in -1..4, got {self.frozen_stages}")
        if self.warmup_ratio > 1:
            raise RMTError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        from ..models.factory import split_name

        split_name(self.backbone)


@dataclass
class DetConfig(DenseConfig):
    """Object detection / instance segmentation (torchvision detectors), epoch-based."""

    prefix: ClassVar[str] = "det"
    choices: ClassVar[Dict[str, tuple]] = dict(
        DenseConfig.choices, arch=("mask_rcnn", "faster_rcnn", "retinanet", "cascade_mask_rcnn"),
        box_head=("auto", "2fc", "4conv1fc"), box_loss=("smooth_l1", "giou"))
    positive: ClassVar[tuple] = DenseConfig.positive + ("epochs", "max_size", "box_batch_size_per_image",
                                                        "detections_per_img", "neck_channels", "rpn_post_nms_train",
                                                        "rpn_post_nms_test")

    arch: str = _f("mask_rcnn", "detector: mask_rcnn, faster_rcnn, retinanet, cascade_mask_rcnn")
    epochs: int = _f(12, "training epochs")
    lr_steps: List[int] = _f([8, 11], "epochs after which the learning rate is multiplied by lr_gamma")
    lr_gamma: float = _f(0.1, "step decay factor")
    min_size: List[int] = _f([800], "short side(s) to resize to; training picks one per image, "
                                    "evaluation uses the last")
    max_size: int = _f(1333, "longest side after resizing")
    hflip: float = _f(0.5, "horizontal flip probability in training")
    anchor_sizes: List[int] = _f([32, 64, 128, 256, 512], "anchor size per pyramid level")
    box_head: str = _f("auto", "R-CNN box head: 2fc (two 1024-d FCs), 4conv1fc (4 convs + BN + 1 FC), or auto "
                               "(4conv1fc for the cascade, else 2fc)")
    box_loss: str = _f("smooth_l1", "cascade box loss: smooth_l1 on deltas, or giou on decoded boxes")
    neck_channels: int = _f(256, "FPN width; the RoI heads' widths follow it (256 in the paper's configs)")
    rpn_post_nms_train: int = _f(2000, "RPN proposals kept per image in training")
    rpn_post_nms_test: int = _f(1000, "RPN proposals kept per image in evaluation")
    box_batch_size_per_image: int = _f(512, "RoIs sampled per image for the R-CNN box head")
    score_thresh: float = _f(0.05, "minimum score of a returned detection")
    detections_per_img: int = _f(100, "detections kept per image")

    def validate(self) -> None:
        super().validate()
        if any(s <= 0 for s in self.min_size) or not self.min_size:
            raise RMTError(f"min_size must be positive sizes, got {self.min_size}")
        if any(s <= 0 for s in self.anchor_sizes) or not self.anchor_sizes:
            raise RMTError(f"anchor_sizes must be positive sizes, got {self.anchor_sizes}")
        if not 0 <= self.hflip <= 1:
            raise RMTError(f"hflip must be between 0 and 1, got {self.hflip}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise RMTError(f"lr_steps must be increasing, got {self.lr_steps}")


@dataclass
class SegConfig(DenseConfig):
    """Semantic segmentation (UperNet, Semantic FPN), iteration-based."""

    prefix: ClassVar[str] = "seg"
    choices: ClassVar[Dict[str, tuple]] = dict(DenseConfig.choices, arch=("upernet", "semantic_fpn"),
                                                test_mode=("whole", "slide"))
    positive: ClassVar[tuple] = DenseConfig.positive + ("max_iters",)
    non_negative: ClassVar[tuple] = DenseConfig.non_negative + ("aux_weight", "min_lr", "poly_power")

    arch: str = _f("upernet", "segmentor: upernet, semantic_fpn")
    train_split: str = _f("training", "training split (images/<split>, annotations/<split>)")
    val_split: str = _f("validation", "validation split")
    num_classes: Optional[int] = _f(None, "classes (default: the dataset's class list, else 150)")
    reduce_zero_label: bool = _f(True, "label 0 is 'other' and ignored; labels 1..K become 0..K-1")
    max_iters: int = _f(160000, "training iterations")
    eval_interval: int = _f(16000, "evaluate and checkpoint every N iterations")
    poly_power: float = _f(1.0, "power of the poly learning-rate decay")
    min_lr: float = _f(0.0, "learning rate at the end of the poly decay")
    scale: List[int] = _f([2048, 512], "base (long, short) size; training rescales it by ratio_range")
    ratio_range: List[float] = _f([0.5, 2.0], "random rescaling range of the training images")
    crop_size: List[int] = _f([512, 512], "training crop (height, width)")
    cat_max_ratio: float = _f(0.75, "re-draw a crop (up to 10 times) when one class covers more of it")
    hflip: float = _f(0.5, "horizontal flip probability in training")
    photometric: bool = _f(True, "photometric distortion (brightness, contrast, saturation, hue)")
    aux_weight: float = _f(0.4, "weight of the auxiliary FCN head's loss (UperNet; 0 disables it)")
    channels: Optional[int] = _f(None, "decode head width (default: 512 for UperNet, 128 for Semantic FPN)")
    dropout: float = _f(0.1, "dropout before the classifier")
    test_mode: str = _f("whole", "inference: whole image, or slide (sliding window of crop_size)")
    slide_stride: Optional[List[int]] = _f(None, "sliding-window stride (default: 2/3 of crop_size)")

    def validate(self) -> None:
        super().validate()
        for name in ("scale", "ratio_range", "crop_size"):
            values = getattr(self, name)
            if len(values) != 2 or min(values) <= 0:
                raise RMTError(f"{name} needs two positive values, got {values}")
        if self.ratio_range[0] > self.ratio_range[1]:
            raise RMTError(f"ratio_range must be (low, high), got {self.ratio_range}")
        if self.slide_stride is not None and (len(self.slide_stride) != 2 or min(self.slide_stride) <= 0):
            raise RMTError(f"slide_stride needs two positive values, got {self.slide_stride}")
        if self.num_classes is not None and self.num_classes < 1:
            raise RMTError(f"num_classes must be positive, got {self.num_classes}")
        for name in ("hflip", "cat_max_ratio", "dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise RMTError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------- values
def _fields(cls: Type[DenseConfig]) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _scalar(base: type, value: Any) -> Any:
    if base is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, (bool, int)):
            raise ValueError(value)
        return bool(value)
    if base is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if base is int and isinstance(value, str):
        return int(value)
    if base in (int, float) and isinstance(value, (list, dict, bool)):
        raise TypeError(value)
    return base(value)


def _coerce(cls: Type[DenseConfig], name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; raise RMTError naming the key."""
    hint = typing.get_type_hints(cls)[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise RMTError(f"config key {name!r} cannot be empty")
    try:
        if typing.get_origin(base) in (list, List):
            item = typing.get_args(base)[0]
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_scalar(item, v) for v in value]
        return _scalar(base, value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", None) or str(base).replace("typing.", "")
        raise RMTError(f"config key {name!r}: {value!r} is not a valid {kind}") from None


def _checked(cls: Type[DenseConfig], data: Dict[str, Any], source: str) -> Dict[str, Any]:
    known = _fields(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise RMTError(f"{source}: unknown config key {key!r}{did_you_mean(name, known)}")
        out[name] = _coerce(cls, name, value)
    return out


# ----------------------------------------------------------------------------------- files
def bundled_configs(cls: Type[DenseConfig]) -> List[str]:
    """Names of the bundled configs of a task (``mask_rcnn_1x``, ... for ``DetConfig``)."""
    return sorted(p.stem[len(cls.prefix) + 1:] for p in CONFIG_DIR.glob(f"{cls.prefix}_*.yaml"))


def _resolve(cls: Type[DenseConfig], name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    stem = name.removesuffix(".yaml").removeprefix(f"{cls.prefix}_")
    bundled = CONFIG_DIR / f"{cls.prefix}_{stem}.yaml"
    if bundled.is_file():
        return bundled
    known = bundled_configs(cls)
    raise RMTError(f"config {name!r} not found: not a file, nor a bundled {cls.prefix} config"
                   f"{did_you_mean(stem, known)} ({', '.join(known)})")


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RMTError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RMTError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def load_config(cls: Type[C], config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> C:
    """Defaults <- YAML file (a path or a bundled name; ``base:`` chains to another) <- overrides."""
    values: Dict[str, Any] = {}
    if config is not None:
        chain, path = [], _resolve(cls, config)
        while path is not None:
            data = _read_yaml(path)
            chain.append((path, data))
            parent = data.pop("base", None)
            path = _resolve(cls, str(parent)) if parent else None
            if len(chain) > 10:
                raise RMTError(f"{config}: config bases nest too deeply")
        for path, data in reversed(chain):
            values.update(_checked(cls, data, source=str(path)))
    values.update(_checked(cls, overrides or {}, source="flags"))
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_from_dict(cls: Type[C], data: Dict[str, Any]) -> C:
    """A config from a saved dict (a run's ``config.yaml`` or a checkpoint's copy)."""
    cfg = cls(**_checked(cls, data, source="saved config"))
    cfg.validate()
    return cfg


def save_config(cfg: DenseConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------ flags
def add_config_flags(parser: argparse.ArgumentParser, cls: Type[DenseConfig]) -> None:
    """One flag per field (``batch_size`` -> ``--batch-size``); unset flags keep the config's values."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("config values (override --config)")
    for name, f in _fields(cls).items():
        flag = "--" + name.replace("_", "-")
        kwargs = dict(dest=f"cfg_{name}", default=argparse.SUPPRESS, help=f.metadata.get("help"))
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) is typing.Union else hint
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is list:
            group.add_argument(flag, nargs="+", metavar="V", **kwargs)
        else:
            group.add_argument(flag, metavar=name.split("_")[-1].upper(), **kwargs)


def flag_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The config values given as flags."""
    return {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_")}
