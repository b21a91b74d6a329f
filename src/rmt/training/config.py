"""Run configs for every task: flat dataclasses filled from defaults, a YAML file, then flags.

One mechanism, parametrised by the task's dataclass:

* fields are declared with :func:`option` -- a default, a help line, and optionally the values it
  accepts (``choices``, or a ``check`` such as ``"positive"``), so that validation, the command-line
  flags and their help come from the same declaration;
* :func:`load_config` reads ``defaults <- YAML file <- overrides``; a file may name another with
  ``base:`` (a path, or a bundled name), and bundled files are found by name in
  ``configs/<task>/`` (``rmt_s``, ``mask_rcnn_1x``);
* :func:`add_config_flags` makes one flag per field (``batch_size`` -> ``--batch-size``; a list
  field's flag takes several values, separated by spaces or commas, and may be repeated) and
  :func:`flag_overrides` reads back the ones given;
* :meth:`RunConfig.check` is where a task adds checks that span several fields;
* :meth:`RunConfig.resume_changes` says which settings a resumed run changes: a resume is the same
  run, so every field changes the result and must keep its saved value, except those the class
  lists in ``may_change_on_resume`` (where the files go, how it loads data and logs, how long it runs).

Unknown keys and bad values raise :class:`rmt.errors.RMTError` naming the key, in one short line
(values are quoted shortened). Reading is bounded: YAML aliases may expand a file to at most
:data:`MAX_YAML_VALUES` values (an "alias bomb" of a few hundred bytes would otherwise expand to
billions), and a config must be a regular file (a FIFO is refused, not waited on). The resolved config
is saved with each run (``config.yaml``) and in its checkpoints.

:class:`RunConfig` holds the fields that every task's training has (data splits, the optimizer
step, the run directory, execution); :class:`DenseRunConfig` adds the backbone options that
detection and segmentation share.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from ..errors import RMTError, did_you_mean, shorten
from ..files import atomic_write_text
from .tracking import LOG_TO_CHOICES

__all__ = ["CONFIG_DIR", "RunConfig", "DenseRunConfig", "option", "load_config", "config_from_dict", "save_config",
           "bundled_configs", "resolve_config", "add_config_flags", "flag_overrides", "config_from_flags",
           "config_to_yaml", "describe_changes"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
C = TypeVar("C", bound="RunConfig")

_CHECKS = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must not be negative"),
    "probability": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "below_one": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
}


def _quoted(value) -> str:
    """A user's value in a message, quoted as Python writes it (``'ten'``, ``[1, 2]``) and shortened."""
    return shorten(repr(value) if isinstance(value, str) else value)


def option(default: Any, help: str, *, choices: Optional[Tuple[str, ...]] = None, check: Optional[str] = None) -> Any:
    """A config field: its default, a help line, and what values it accepts.

    ``choices``: the allowed strings. ``check``: ``"positive"``, ``"non_negative"``,
    ``"probability"`` (``[0, 1]``), ``"fraction"`` (``(0, 1]``) or ``"below_one"`` (``[0, 1)``),
    applied to the value, or to every item of a list (``None`` always passes).
    """
    if check is not None and check not in _CHECKS:
        raise ValueError(f"unknown check {check!r}")
    metadata = dict(help=help, choices=choices, check=check)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """What every task's training run has. Subclasses set ``task`` (the folder of their bundled
    configs under ``configs/``)."""

    task: ClassVar[str] = ""
    #: fields a resumed run may change (they do not change what the run computes); a task adds its length
    may_change_on_resume: ClassVar[Tuple[str, ...]] = (
        "output", "resume", "overwrite", "workers", "log_interval", "checkpoint_interval", "keep_checkpoints",
        "max_bad_steps", "device", "grad_checkpointing", "log_to")

    # data
    data: Optional[str] = option(None, "dataset root (default: the task's bundled demo data)")
    train_split: str = option("train", "split (sub-folder) to train on")
    val_split: str = option("val", "split (sub-folder) to evaluate on")
    max_train_samples: Optional[int] = option(None, "use only the first N training samples (quick checks)",
                                              check="positive")
    max_val_samples: Optional[int] = option(None, "use only the first N validation samples (quick checks)",
                                            check="positive")
    # the optimizer step
    batch_size: int = option(2, "images per process per step", check="positive")
    accum_steps: int = option(1, "batches per optimizer step (gradient accumulation)", check="positive")
    lr: Optional[float] = option(None, "learning rate", check="positive")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to norms and biases)", check="non_negative")
    clip_grad: Optional[float] = option(None, "clip the gradient norm to this value", check="positive")
    model_ema: bool = option(False, "keep an exponential moving average of the weights (evaluated and saved too)")
    model_ema_decay: float = option(0.9998, "EMA decay per optimizer step", check="below_one")
    max_bad_steps: int = option(0, "skip up to N steps whose loss is not finite before stopping",
                                check="non_negative")
    # execution
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")
    amp: str = option("auto", "autocast dtype: none, bf16, fp16 or auto (bf16 on CUDA, none on the CPU)",
                      choices=("auto", "none", "bf16", "fp16"))
    grad_checkpointing: bool = option(False, "recompute backbone blocks in backward to save memory")
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across CUDA processes")
    workers: int = option(4, "data-loading worker processes per training process", check="non_negative")
    seed: int = option(0, "random seed")
    # the run directory
    output: Optional[str] = option(None, "run directory (default: runs/<task>-<model>-<data>-<time>)")
    resume: Optional[str] = option(None, "checkpoint to resume from, or 'auto' for OUTPUT/last.pth if it exists")
    overwrite: bool = option(False, "start a new run in an OUTPUT that holds another run, replacing it")
    log_interval: int = option(50, "steps between log lines when the output is not a terminal", check="positive")
    checkpoint_interval: int = option(0, "also write last.pth every N optimizer steps (0: only when evaluating)",
                                      check="non_negative")
    keep_checkpoints: int = option(0, "also keep the N most recent checkpoints of evaluations (0: only last and "
                                      "best)", check="non_negative")
    log_to: List[str] = option(["auto"], "where to log the run (rmt.training.tracking): tensorboard, wandb, mlflow "
                                         "(several may be combined), none, or auto (TensorBoard when installed)",
                               choices=LOG_TO_CHOICES)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (tuples as lists), in field order: what ``config.yaml`` holds."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self: C) -> C:
        """Check every field against its declaration, then :meth:`check`; returns ``self``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            for v in values:
                if v is None:
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    raise RMTError(f"{f.name} must be a finite number, got {v}")
                if choices is not None and v not in choices:
                    raise RMTError(f"{f.name} must be one of {', '.join(choices)}, got {v!r}"
                                   f"{did_you_mean(str(v), choices)}")
                if check is not None:
                    ok, text = _CHECKS[check]
                    if not ok(v):
                        raise RMTError(f"{f.name} {text}, got {value}")
        self.check()
        return self

    def check(self) -> None:
        """Checks across fields (a task's subclass extends it). Raise :class:`RMTError`."""
        if "none" in self.log_to and len(set(self.log_to)) > 1:
            raise RMTError(f"log_to: none cannot be combined with other trackers, got {','.join(self.log_to)}")

    def resume_changes(self, saved: Dict[str, Any]) -> Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, Any, Any]]]:
        """How this config differs from ``saved`` (the config a checkpoint was written with):
        ``(refused, allowed)``, each a list of ``(field, saved value, value here)``; ``allowed`` holds the
        fields of ``may_change_on_resume``. Fields that ``saved`` lacks (an older version's) are skipped, and
        so are ``resume`` and ``overwrite``."""
        refused, allowed = [], []
        for name, value in self.to_dict().items():
            if name not in saved or name in ("resume", "overwrite"):  # how this start was asked for, not a setting
                continue
            before = list(saved[name]) if isinstance(saved[name], tuple) else saved[name]
            if before != value:
                (allowed if name in self.may_change_on_resume else refused).append((name, before, value))
        return refused, allowed


@dataclass
class DenseRunConfig(RunConfig):
    """The backbone options that detection and segmentation share."""

    backbone: str = option("rmt_t", "backbone variant (rmt_t, rmt_s, rmt_b, rmt_l)")
    backbone_weights: Optional[str] = option(None, "ImageNet weights for the backbone (official .pth or ours)")
    init_from: Optional[str] = option(None, "start from a whole model of the same arch and backbone (an official "
                                            "mmdet/mmseg .pth, a run's model.safetensors or best.pth): what fits is "
                                            "loaded, the class-specific layers are reinitialised for another class "
                                            "count")
    drop_path: Optional[float] = option(None, "backbone stochastic depth (default: the variant's)", check="below_one")
    decomposed: Optional[List[bool]] = option(None, "per stage, decomposed MaSA (default: the variant's)")
    frozen_stages: int = option(-1, "freeze the stem (0) and the first N stages (N >= 1); -1 trains all")
    norm_eval: bool = option(False, "keep the backbone's BatchNorm layers frozen in eval mode")
    lr: Optional[float] = option(1e-4, "AdamW learning rate", check="positive")
    eval_batch_size: int = option(1, "images per process per evaluation step", check="positive")
    warmup_iters: int = option(500, "linear warm-up iterations", check="non_negative")
    warmup_ratio: float = option(0.001, "learning-rate factor at the start of warm-up", check="probability")
    sync_bn: bool = option(True, "synchronise BatchNorm statistics across CUDA processes")

    def check(self) -> None:
        super().check()
        if self.lr is None:
            raise RMTError("lr must be given")
        if self.decomposed is not None and len(self.decomposed) != 4:
            raise RMTError(f"decomposed needs 4 values (one per stage), got {len(self.decomposed)}")
        if not -1 <= self.frozen_stages <= 4:
            raise RMTError(f"frozen_stages must be in -1..4, got {self.frozen_stages}")
        if self.init_from is not None and self.backbone_weights is not None:
            raise RMTError("give init_from (a whole model) or backbone_weights (ImageNet weights), not both")


# ----------------------------------------------------------------------------------- values
def _fields(cls: Type[RunConfig]) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unwrap_optional(hint: Any) -> Tuple[Any, bool]:
    if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, (bool, int)):
            raise ValueError(value)
        return bool(value)
    if isinstance(value, (list, dict)) or (kind in (int, float) and isinstance(value, bool)):
        raise TypeError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is int and isinstance(value, str):
        return int(value)
    return kind(value)


def _coerce(cls: Type[RunConfig], name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; raise RMTError naming the key."""
    kind, optional = _unwrap_optional(typing.get_type_hints(cls)[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise RMTError(f"config key {name!r} cannot be empty")
    try:
        origin = typing.get_origin(kind)
        if origin in (list, tuple):
            item = typing.get_args(kind)[0]
            if not isinstance(value, (list, tuple)):
                value = [value]
            # "a,b" and "a b" items are several values (--log-to tensorboard,mlflow)
            value = [part for v in value for part in (v.replace(",", " ").split() if isinstance(v, str) else [v])]
            items = [_scalar(item, v) for v in value]
            size = len(typing.get_args(kind)) if origin is tuple and ... not in typing.get_args(kind) else None
            if size is not None and len(items) != size:
                raise ValueError(value)
            return tuple(items) if origin is tuple else items
        return _scalar(kind, value)
    except (TypeError, ValueError, OverflowError):
        raise RMTError(f"config key {name!r}: {_quoted(value)} is not a valid {_describe_type(kind)}") from None


def _describe_type(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return f"sequence of {len(args)} {args[0].__name__} values"
    if typing.get_origin(kind) is list:
        return f"list of {args[0].__name__} values"
    return getattr(kind, "__name__", str(kind))


def _checked(cls: Type[RunConfig], data: Dict[str, Any], source: str) -> Dict[str, Any]:
    known = _fields(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise RMTError(f"{source}: unknown config key {_quoted(key)}{did_you_mean(name[:100], known)}")
        out[name] = _coerce(cls, name, value)
    return out


# ----------------------------------------------------------------------------------- files
def bundled_configs(cls: Type[RunConfig]) -> List[str]:
    """Names of the task's bundled configs (``digits``, ``rmt_s``, ... for classification)."""
    return sorted(p.stem for p in (CONFIG_DIR / cls.task).glob("*.yaml"))


def resolve_config(cls: Type[RunConfig], name: str, relative_to: Optional[Path] = None) -> Path:
    """A config file: ``name`` as a path (relative to ``relative_to``'s folder for ``base:``
    entries, else to the working directory), or the name of one of the task's bundled configs."""
    for candidate in ([relative_to.parent / name] if relative_to is not None else []) + [Path(name)]:
        if candidate.is_file():
            return candidate
        if candidate.exists() and not candidate.is_dir():  # a FIFO, a device: reading it could block
            raise RMTError(f"config {shorten(name, 200)}: not a regular file")
    stem = Path(name).name.removesuffix(".yaml")
    bundled = CONFIG_DIR / cls.task / f"{stem}.yaml"
    if bundled.is_file():
        return bundled
    known = bundled_configs(cls)
    raise RMTError(f"config {name!r} not found: not a file, nor a bundled {cls.task} config"
                   f"{did_you_mean(stem, known)} ({', '.join(known)})")


MAX_YAML_VALUES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand it past :data:`MAX_YAML_VALUES`
    values (nodes counted with every alias expanded) or refer to themselves."""

    def construct_document(self, node):
        _expanded_size(node)
        return super().construct_document(node)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of ``root`` with aliases expanded, counted without expanding them (each shared node once,
    times its uses); :class:`RMTError` past the limit or on a node that contains itself."""
    sizes: Dict[int, int] = {}
    stack: List[Tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise RMTError(f"more than {MAX_YAML_VALUES} values once its YAML aliases are expanded "
                               f"(an alias bomb?)")
            continue
        if id(node) in open_nodes:
            raise RMTError("a YAML alias refers to the node that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise RMTError("a YAML alias refers to the node that contains it")
            stack.append((child, False))
    return sizes[id(root)]


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_BoundedLoader) or {}
    except RMTError as e:
        raise RMTError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise RMTError(f"{path}: not valid YAML ({shorten(str(e).splitlines()[0], 200)})") from None
    except RecursionError:
        raise RMTError(f"{path}: not a config: YAML nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RMTError(f"{path}: cannot read it ({shorten(str(e), 200)})") from None
    if not isinstance(data, dict):
        raise RMTError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def load_config(cls: Type[C], config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> C:
    """``cls`` defaults <- YAML file (a path or a bundled name; ``base:`` chains) <- overrides, validated."""
    values: Dict[str, Any] = {}
    if config is not None:
        chain, path = [], resolve_config(cls, config)
        while path is not None:
            data = _read_yaml(path)
            chain.append((path, data))
            parent = data.pop("base", None)
            path = resolve_config(cls, str(parent), relative_to=path) if parent else None
            if len(chain) > 10:
                raise RMTError(f"{config}: config bases nest too deeply")
        for path, data in reversed(chain):
            values.update(_checked(cls, data, source=str(path)))
    values.update(_checked(cls, overrides or {}, source="flags"))
    return cls(**values).validate()


def config_from_dict(cls: Type[C], data: Dict[str, Any]) -> C:
    """A config from a saved dict (a run's ``config.yaml`` or a checkpoint's copy), validated."""
    return cls(**_checked(cls, data, source="saved config")).validate()


def describe_changes(changes: Sequence[Tuple[str, Any, Any]], limit: int = 8) -> str:
    """``lr 0.002 -> 0.5, batch_size 64 -> 8`` (saved -> given), at most ``limit`` entries, values shortened."""
    def short(value: Any) -> str:
        text = "none" if value is None else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    text = ", ".join(f"{name} {short(before)} -> {short(after)}" for name, before, after in changes[:limit])
    return text + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write ``cfg`` as YAML (atomically)."""
    atomic_write_text(path, config_to_yaml(cfg))


# ------------------------------------------------------------------------------------ flags
def add_config_flags(parser: argparse.ArgumentParser, cls: Type[RunConfig]) -> None:
    """One flag per field (``batch_size`` -> ``--batch-size``, booleans as ``--x/--no-x``); flags that
    are not given keep the config's values (see :func:`flag_overrides`)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("config values (override --config)")
    for name, f in _fields(cls).items():
        flag = "--" + name.replace("_", "-")
        kwargs: Dict[str, Any] = dict(dest=f"cfg_{name}", default=argparse.SUPPRESS, help=f.metadata.get("help"))
        kind, _ = _unwrap_optional(hints[name])
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple and ... not in typing.get_args(kind):
            group.add_argument(flag, nargs=len(typing.get_args(kind)), metavar="V", **kwargs)
        elif typing.get_origin(kind) is list:  # a repeated flag adds to the list
            group.add_argument(flag, nargs="+", action="extend", metavar="V", **kwargs)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, nargs="+", metavar="V", **kwargs)
        elif f.metadata.get("choices"):
            group.add_argument(flag, metavar="{" + ",".join(f.metadata["choices"]) + "}", **kwargs)
        else:
            group.add_argument(flag, metavar=name.split("_")[-1].upper(), **kwargs)


def flag_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The config values given as flags (see :func:`add_config_flags`)."""
    return {k[len("cfg_"):]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def config_from_flags(cls: Type[C], args: argparse.Namespace, demo: str) -> C:
    """The config a ``train`` command runs: ``--config`` (or, with neither ``--config`` nor ``--data``,
    the task's bundled ``demo`` job) with the flags given on top."""
    overrides = flag_overrides(args)
    config = args.config
    if config is None and overrides.get("data") is None:
        config = demo
    return load_config(cls, config, overrides)
