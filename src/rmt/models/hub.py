"""Model folders in timm's Hugging Face Hub layout: what ``timm.create_model("hf-hub:...")`` loads.

A folder holds three files::

    FOLDER/config.json         architecture, num_classes, label names, model args, pretrained_cfg
    FOLDER/model.safetensors   the state dict (our layout: fused qkv), with our metadata
    FOLDER/README.md           a short model card

It loads with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (after ``import rmt``, which
registers the architectures), and, once the folder is uploaded to a Hub repository, with
``timm.create_model("hf-hub:USER/REPO", pretrained=True)``. timm reads ``config.json``: it builds
``architecture`` with ``model_args`` and ``num_classes``, takes its preprocessing from
``pretrained_cfg`` (input size, mean/std, crop, interpolation) and loads ``model.safetensors``
through the variant's ``checkpoint_filter_fn``. ``custom_load`` is off, since the file holds a
plain state dict (the official ``.pth`` layouts are what the RMT loader is for).

The weights file also carries the metadata of our own ``.safetensors`` files (model name, class
names, the run's data config with e.g. ``grayscale``), so ``rmt predict/eval/export --checkpoint
FOLDER`` see everything a run checkpoint says.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import timm
from torch import nn

from ..errors import RMTError, shorten
from ..files import atomic_write_text, output_folder
from .rmt import MODEL_ARGS, RMT, default_cfgs
from .weights import read_metadata, save_weights

__all__ = ["HUB_CONFIG", "HUB_WEIGHTS", "HUB_CARD", "save_hub_folder", "is_hub_folder", "read_hub_config",
           "hub_weights_file", "hub_checkpoint_info"]

HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"
HUB_CARD = "README.md"
_WEIGHT_FILES = (HUB_WEIGHTS, "pytorch_model.bin")  # timm's preferred names, in its order
# pretrained_cfg entries that point at where weights came from: a folder's config must not carry them
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag")
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def _pretrained_cfg(model_name: str, token_label: bool, num_classes: int,
                    data_config: Mapping[str, Any]) -> Dict[str, Any]:
    """The registered cfg of ``model_name`` with the folder's preprocessing and class count."""
    tag = "tl_in1k" if token_label and "tl_in1k" in default_cfgs[model_name].tags else None
    cfg = timm.models.get_pretrained_cfg(f"{model_name}.{tag}" if tag else model_name)
    out = {k: v for k, v in cfg.to_dict().items() if k not in _SOURCE_KEYS and k != "notes"}
    if token_label:  # both heads hold class rows: timm drops both when a user asks for another class count
        out["classifier"] = ["head", "aux_head"]
    out.update({k: data_config[k] for k in _DATA_KEYS if data_config.get(k) is not None})
    out["input_size"] = [int(v) for v in out["input_size"]]
    h, w = out["input_size"][1:]
    out["pool_size"] = [math.ceil(h / 32), math.ceil(w / 32)]  # the last stage's token grid
    out.update(architecture=model_name, num_classes=num_classes, custom_load=False)
    return out


def _arch_overrides(model: nn.Module, model_name: str) -> Dict[str, Any]:
    """The architecture arguments of ``model`` that differ from the registered ``model_name``'s."""
    arch = getattr(model, "arch_args", None)
    if not arch:
        return {}
    defaults = {k: p.default for k, p in inspect.signature(RMT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    registered = {**defaults, **MODEL_ARGS[model_name]}

    def plain(value):
        return list(value) if isinstance(value, (tuple, list)) else value

    return {k: plain(v) for k, v in arch.items() if plain(registered.get(k)) != plain(v)}


def _model_card(model_name: str, model: nn.Module, config: Dict[str, Any], data_config: Mapping[str, Any],
                source: Optional[str], metrics: Optional[Mapping[str, float]],
                class_names: Optional[Sequence[str]]) -> str:
    cfg = config["pretrained_cfg"]
    c, h, w = cfg["input_size"]
    params = sum(p.numel() for p in model.parameters())
    classes = (f"{len(class_names)} classes: {', '.join(map(str, class_names[:12]))}"
               f"{', ...' if len(class_names) > 12 else ''}" if class_names else f"{config['num_classes']} classes")
    lines = [
        "---",
        "tags:",
        "- image-classification",
        "- timm",
        "- rmt",
        "library_name: timm",
        "---",
        f"# {model_name}" + (" (token labelling)" if config.get("model_args", {}).get("token_label") else ""),
        "",
        "RMT (\"RMT: Retentive Networks Meet Vision Transformers\", Fan et al., CVPR 2024, "
        "[arXiv:2309.11523](https://arxiv.org/abs/2309.11523)) image classifier, in timm's Hub layout, "
        "written by the `rmt` package.",
        "",
        f"- parameters: {params / 1e6:.2f}M",
        f"- input: {c}x{h}x{w}, {cfg['interpolation']} resize, crop_pct {cfg['crop_pct']}, "
        f"mean {list(cfg['mean'])}, std {list(cfg['std'])}",
        f"- outputs: {classes}",
    ]
    if data_config.get("grayscale"):
        lines.append("- images are read as grayscale, repeated to 3 channels")
    if source:
        lines.append(f"- weights converted from: `{source}`")
    for key, value in (metrics or {}).items():
        lines.append(f"- {key}: {value:.2f}" if isinstance(value, float) else f"- {key}: {value}")
    lines += [
        "",
        "## Use",
        "",
        "The architecture is registered by the `rmt` package, so import it before creating the model:",
        "",
        "```python",
        "import rmt  # registers rmt_t/s/b/l in timm",
        "import timm",
        "",
        "model = timm.create_model(\"hf-hub:USER/REPO\", pretrained=True).eval()  # or \"local-dir:FOLDER\"",
        "config = timm.data.resolve_data_config(model=model)",
        "transform = timm.data.create_transform(**config)",
        "```",
        "",
        "or from the command line: `rmt predict IMAGE --checkpoint FOLDER`.",
        "",
    ]
    return "\n".join(lines)


def save_hub_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    model_name: str,
    class_names: Optional[Sequence[str]] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    source: Optional[str] = None,
    metrics: Optional[Mapping[str, float]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``folder`` in timm's Hub layout (see the module docstring); returns ``folder``.

    Args:
        model: an :class:`rmt.models.RMT` (any class count; with or without the token-labelling head).
        folder: created if needed. A folder that holds files is refused unless ``overwrite``: then the
            three files replace those of the same names (other files are kept), as one replacement
            (:func:`rmt.files.output_folder`: the old files stay until the three new ones exist).
        model_name: the registered variant it is built as (``rmt_t``, ``rmt_s``, ...); architecture
            arguments of ``model`` that differ from the variant's go to ``model_args``.
        class_names: one per output (written as ``label_names``); ``None`` when unknown.
        data_config: evaluation preprocessing (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``; extra keys such as ``grayscale`` are kept in the weights' metadata);
            default: the variant's ``pretrained_cfg`` (ImageNet, 224 px).
        source: where the weights came from (a file name), for the model card.
        metrics: e.g. ``{"val_top1": 98.6}``, for the model card.
        overwrite: replace the model files of a folder that is not empty (``--overwrite``).
    """
    if model_name not in MODEL_ARGS:
        raise RMTError(f"unknown model {model_name!r}: choose from {', '.join(MODEL_ARGS)}")
    num_classes = int(getattr(model, "num_classes", 0))
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            raise RMTError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    token_label = getattr(model, "aux_head", None) is not None
    in_chans = int(getattr(model, "in_chans", 3))
    data_config = dict(data_config or {})
    pretrained_cfg = _pretrained_cfg(model_name, token_label, num_classes, data_config)
    if in_chans != pretrained_cfg["input_size"][0]:
        raise RMTError(f"data_config input_size has {pretrained_cfg['input_size'][0]} channels, "
                       f"the model {in_chans}")
    model_args: Dict[str, Any] = _arch_overrides(model, model_name)  # e.g. a narrower custom RMT
    if token_label:
        model_args["token_label"] = True
    if in_chans != 3:
        model_args["in_chans"] = in_chans
    config: Dict[str, Any] = dict(architecture=model_name, num_classes=num_classes,
                                  num_features=int(getattr(model, "num_features", 0)), global_pool="avg")
    if class_names is not None:
        config["label_names"] = class_names
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg

    folder = Path(folder)
    metadata = dict(model=model_name, num_classes=num_classes, token_label=token_label,
                    data_config={**{k: pretrained_cfg[k] for k in _DATA_KEYS}, **data_config})
    if class_names is not None:
        metadata["class_names"] = class_names
    if source:
        metadata["source"] = source
    with output_folder(folder, overwrite) as staging:  # config.json last: a folder that has it is complete
        save_weights(model, staging / HUB_WEIGHTS, metadata)
        atomic_write_text(staging / HUB_CARD, _model_card(model_name, model, config, data_config, source, metrics,
                                                          class_names))
        atomic_write_text(staging / HUB_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def is_hub_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a Hub-layout model folder)."""
    return (Path(path) / HUB_CONFIG).is_file()


def read_hub_config(folder: str | os.PathLike) -> Dict[str, Any]:
    """``config.json`` of a Hub-layout folder, checked for what loading needs."""
    path = Path(folder) / HUB_CONFIG
    if not path.is_file():
        raise RMTError(f"{folder} is not a model folder: it has no {HUB_CONFIG}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RMTError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise RMTError(f"{path} names no architecture: not a timm model config")
    if config["architecture"] not in MODEL_ARGS:
        raise RMTError(f"{path}: architecture {shorten(config['architecture'])} is not an RMT variant "
                       f"({', '.join(MODEL_ARGS)}); load it with timm.create_model('local-dir:{folder}')")
    problem = _hub_config_problem(config)
    if problem:
        raise RMTError(f"{path}: {problem}")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_arg_problem(key: str, value: Any, default: Any) -> Optional[str]:
    """What is wrong with one ``model_args`` entry, judged by the type of the argument's default."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
        ok = (isinstance(value, list) and len(value) == len(default)
              and all(isinstance(v, bool) if isinstance(d, bool) else _is_number(v) and v > 0
                      for v, d in zip(value, default)))
    elif isinstance(default, int):
        ok = _is_int(value) and value > 0
    elif isinstance(default, float):
        ok = _is_number(value) and value >= 0
    else:
        ok = isinstance(value, str)
    like = json.dumps(list(default) if isinstance(default, tuple) else default)
    return None if ok else f"model_args {key} must be like {like}, got {shorten(value)}"


def _hub_config_problem(config: Dict[str, Any]) -> Optional[str]:
    """What in a hand-edited ``config.json`` would fail later, or ``None``: types and ranges of
    ``num_classes``, ``label_names``, ``model_args`` and ``pretrained_cfg``'s preprocessing."""
    num_classes = config.get("num_classes", 1000)
    if not _is_int(num_classes) or num_classes < 1:
        return f"num_classes must be a positive integer, got {shorten(num_classes)}"
    labels = config.get("label_names")
    names_ok = isinstance(labels, list) and len(labels) == num_classes and all(isinstance(n, (str, int))
                                                                               for n in labels)
    if labels is not None and not (isinstance(labels, dict) or names_ok):
        return f"label_names must be a list of {num_classes} names, got {shorten(labels)}"
    model_args = config.get("model_args", {})
    if not isinstance(model_args, dict):
        return f"model_args must be an object, got {shorten(model_args)}"
    defaults = {k: p.default for k, p in inspect.signature(RMT.__init__).parameters.items()
                if k not in ("self", "num_classes", "global_pool", "device", "dtype")}
    for key, value in model_args.items():
        if key not in defaults:
            return f"unknown model_args key {shorten(key)} (RMT takes {', '.join(defaults)})"
        problem = _model_arg_problem(key, value, defaults[key])
        if problem:
            return problem
    cfg = config.get("pretrained_cfg", {})
    if not isinstance(cfg, dict):
        return f"pretrained_cfg must be an object, got {shorten(cfg)}"
    size = cfg.get("input_size", [model_args.get("in_chans", 3), 224, 224])
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v) and v > 0 for v in size)):
        return f"pretrained_cfg input_size must be [channels, height, width], got {shorten(size)}"
    if size[0] != model_args.get("in_chans", 3):
        return f"pretrained_cfg input_size has {size[0]} channels, the model {model_args.get('in_chans', 3)}"
    for key in ("mean", "std"):
        value = cfg.get(key, [1.0] * size[0])
        if not (isinstance(value, list) and len(value) == size[0] and all(_is_number(v) for v in value)):
            return f"pretrained_cfg {key} must be {size[0]} numbers (one per channel), got {shorten(value)}"
    if not all(v > 0 for v in cfg.get("std", [1.0])):
        return f"pretrained_cfg std must be positive, got {shorten(cfg['std'])}"
    crop_pct = cfg.get("crop_pct", 1.0)
    if not _is_number(crop_pct) or crop_pct <= 0:
        return f"pretrained_cfg crop_pct must be a positive number, got {shorten(crop_pct)}"
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random"):
        return f"pretrained_cfg interpolation {shorten(interpolation)} is not one of bilinear, bicubic, nearest, ..."
    return None


def hub_weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of a Hub-layout folder (``model.safetensors``, else ``pytorch_model.bin``)."""
    for name in _WEIGHT_FILES:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise RMTError(f"{folder} has no weights file ({' or '.join(_WEIGHT_FILES)})")


def hub_checkpoint_info(folder: str | os.PathLike) -> Dict[str, Any]:
    """What a Hub-layout folder says about its model, as :func:`rmt.models.factory.checkpoint_info`
    reports it: ``model``, ``num_classes``, ``token_label``, ``class_names``, ``data_config``, and the
    other ``model_args`` of its config (architecture arguments to build it with).

    ``config.json`` decides; the weights' metadata (ours) adds what timm's config has no field for
    (e.g. ``grayscale`` in the data config).
    """
    config = read_hub_config(folder)
    cfg = config.get("pretrained_cfg") or {}
    metadata = read_metadata(hub_weights_file(folder))
    data_config = {k: (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in _DATA_KEYS if k in cfg}
    extra = metadata.get("data_config") or {}
    data_config.update({k: v for k, v in extra.items() if k not in data_config})
    num_classes = int(config.get("num_classes", cfg.get("num_classes", 1000)))
    labels = config.get("label_names", cfg.get("label_names"))
    if isinstance(labels, dict):  # timm allows {index: name} when indices have gaps
        labels = [labels.get(str(i), labels.get(i, f"class_{i}")) for i in range(num_classes)]
    model_args = dict(config.get("model_args") or {})
    info: Dict[str, Any] = dict(model=config["architecture"], num_classes=num_classes,
                                token_label=bool(model_args.pop("token_label", False)), data_config=data_config,
                                model_args=model_args)
    if labels is not None:
        info["class_names"] = [str(n) for n in labels]
    return info
