"""Training configuration: one flat dataclass, filled from defaults, a YAML file, then flags.

The defaults are the paper's ImageNet recipe (DeiT-style, as in the official training script);
``configs/digits.yaml`` is the small default job that ``rmt train`` runs with no dataset.
Every field is also a command-line flag (``batch_size`` -> ``--batch-size``). The resolved
config is saved with each run as ``config.yaml``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from ..errors import RMTError, did_you_mean

__all__ = ["TrainConfig", "load_config", "save_config", "resolve_config_path", "CONFIG_DIR", "config_fields"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _f(default, help: str, **kwargs):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, **kwargs))
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class TrainConfig:
    # model
    model: str = _f("rmt_t", "model name (rmt_t, rmt_s, rmt_b, rmt_l)")
    drop_path: Optional[float] = _f(None, "stochastic depth rate (default: the variant's, as in the paper)")
    finetune: Optional[str] = _f(None, "initialise from these weights; keys that do not fit are re-initialised")
    # data
    data: Optional[str] = _f(None, "ImageNet-style folder with train/ and val/ (default: the bundled digits)")
    train_split: str = _f("train", "sub-folder of --data to train on")
    val_split: str = _f("val", "sub-folder of --data to evaluate on")
    img_size: int = _f(224, "training and evaluation input size")
    max_train_samples: Optional[int] = _f(None, "use only the first N training samples (for quick checks)")
    max_val_samples: Optional[int] = _f(None, "use only the first N validation samples (for quick checks)")
    # schedule
    epochs: int = _f(300, "number of epochs")
    batch_size: int = _f(128, "images per process per step")
    eval_batch_size: Optional[int] = _f(None, "evaluation batch size (default: 2 x batch size)")
    accum_steps: int = _f(1, "gradient accumulation steps per optimizer step")
    # optimizer
    opt: str = _f("adamw", "optimizer (any timm optimizer name)")
    lr: Optional[float] = _f(None, "learning rate (default: lr_base x global batch / lr_base_size)")
    lr_base: float = _f(5e-4, "learning rate at the reference batch size")
    lr_base_size: int = _f(512, "reference batch size of lr_base")
    weight_decay: float = _f(0.05, "weight decay (not applied to norms, biases, decay/rotation tables)")
    opt_eps: float = _f(1e-8, "optimizer epsilon")
    momentum: float = _f(0.9, "momentum (SGD-type optimizers)")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    # learning-rate schedule
    sched: str = _f("cosine", "learning-rate schedule (cosine, step, ...: timm schedulers)")
    warmup_epochs: float = _f(5, "linear warm-up epochs")
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up")
    min_lr: float = _f(1e-5, "floor of the cosine schedule")
    # regularisation and augmentation
    smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.8, "mixup alpha (0 disables)")
    cutmix: float = _f(1.0, "cutmix alpha (0 disables)")
    mixup_prob: float = _f(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup")
    aa: Optional[str] = _f("rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment), or none")
    color_jitter: float = _f(0.4, "colour jitter (used only without auto-augment)")
    reprob: float = _f(0.25, "random erasing probability")
    remode: str = _f("pixel", "random erasing mode")
    hflip: float = _f(0.5, "horizontal flip probability")
    scale: Tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range")
    train_interpolation: str = _f("bicubic", "interpolation for training crops (bicubic, bilinear, random)")
    interpolation: str = _f("bicubic", "interpolation for evaluation resizing")
    crop_pct: float = _f(0.875, "evaluation centre-crop fraction (resize to img_size / crop_pct, then crop)")
    repeated_aug: bool = _f(True, "repeated augmentation (3 augmented copies of each image per epoch)")
    model_ema: bool = _f(True, "keep an exponential moving average of the weights")
    model_ema_decay: float = _f(0.99996, "EMA decay at batch 512 (scaled to the global batch as in the reference)")
    # token labelling
    token_label_data: Optional[str] = _f(None, "directory of dense token labels; enables token-labelling training")
    token_label_dense_weight: float = _f(0.5, "weight of the dense (token) loss")
    token_label_cls_weight: float = _f(1.0, "weight of the class loss")
    # execution
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    amp: str = _f("auto", "autocast dtype: none, bf16, fp16 or auto (bf16 on CUDA, none on CPU)")
    channels_last: bool = _f(False, "channels-last memory format for the input batches")
    grad_checkpointing: bool = _f(False, "recompute blocks in backward to save memory")
    sync_bn: bool = _f(False, "synchronise batch norm statistics across processes")
    workers: int = _f(8, "data-loading worker processes per training process")
    seed: int = _f(0, "random seed")
    output: Optional[str] = _f(None, "run directory (default: runs/<model>-<time>)")
    resume: Optional[str] = _f(None, "checkpoint to resume from, or 'auto' for OUTPUT/last.pth")
    log_interval: int = _f(50, "steps between log lines when the output is not a terminal")
    keep_checkpoints: int = _f(0, "also keep the N most recent per-epoch checkpoints (0: only last and best)")
    checkpoint_interval: int = _f(0, "also write last.pth every N steps within an epoch (0: at epoch ends only)")
    max_bad_steps: int = _f(0, "skip up to N steps with a non-finite loss before stopping")

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_CHOICES = {
    "amp": ("auto", "none", "bf16", "fp16"),
    "train_interpolation": ("bicubic", "bilinear", "nearest", "random"),
    "interpolation": ("bicubic", "bilinear", "nearest"),
    "remode": ("pixel", "rand", "const"),
}
_PROBABILITIES = ("smoothing", "mixup_prob", "mixup_switch_prob", "reprob", "hflip")
_POSITIVE = ("epochs", "batch_size", "accum_steps", "img_size", "lr_base", "lr_base_size", "log_interval")
_NON_NEGATIVE = ("weight_decay", "mixup", "cutmix", "warmup_epochs", "warmup_lr", "min_lr", "color_jitter",
                 "workers", "keep_checkpoints", "checkpoint_interval", "max_bad_steps", "token_label_dense_weight",
                 "token_label_cls_weight")


def config_fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; raise RMTError naming the key."""
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise RMTError(f"config key {name!r} cannot be empty")
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise RMTError(f"config key {name!r}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and choice checks, with one clear message for the first bad value."""
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            raise RMTError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise RMTError(f"{name} must not be negative, got {getattr(cfg, name)}")
    for name in _PROBABILITIES:
        if not 0 <= getattr(cfg, name) <= 1:
            raise RMTError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise RMTError(f"{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}"
                           f"{did_you_mean(str(getattr(cfg, name)), choices)}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise RMTError(f"lr must be positive, got {cfg.lr}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise RMTError(f"drop_path must be in [0, 1), got {cfg.drop_path}")
    if not 0 < cfg.crop_pct <= 1:
        raise RMTError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    if not 0 <= cfg.model_ema_decay < 1:
        raise RMTError(f"model_ema_decay must be in [0, 1), got {cfg.model_ema_decay}")
    if cfg.aa is not None and cfg.aa.lower() in ("none", ""):
        cfg.aa = None
    from ..models.factory import split_name

    split_name(cfg.model)
    return cfg


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a bundled config (``rmt_s``, ``digits``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise RMTError(f"config {name!r} not found: not a file, nor a bundled config{did_you_mean(name, known)} "
                   f"({', '.join(known)})")


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RMTError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RMTError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def load_config(config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults <- YAML file (a path or a bundled name; ``base:`` chains to another) <- overrides."""
    values: Dict[str, Any] = {}
    if config is not None:
        chain, path = [], resolve_config_path(config)
        while path is not None:
            data = _read_yaml(path)
            chain.append((path, data))
            parent = data.pop("base", None)
            path = resolve_config_path(parent) if parent else None
            if len(chain) > 10:
                raise RMTError(f"{config}: config bases nest too deeply")
        for path, data in reversed(chain):
            values.update(_checked(data, source=str(path)))
    values.update(_checked(overrides or {}, source="flags"))
    cfg = TrainConfig(**values)
    return validate(cfg)


def _checked(data: Dict[str, Any], source: str) -> Dict[str, Any]:
    known = config_fields()
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise RMTError(f"{source}: unknown config key {key!r}{did_you_mean(name, known)}")
        out[name] = _coerce(name, value)
    return out


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
