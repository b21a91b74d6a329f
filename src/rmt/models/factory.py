"""Building models by name, with weights from a file: what the CLI and the task code call.

``timm.create_model`` works as well (``import rmt`` registers the variants); this adds checked
names with suggestions, class counts read off the checkpoint, and one-line errors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
from torch import nn

from ..errors import RMTError, did_you_mean, shorten
from .hub import HUB_CONFIG, hub_checkpoint_info, hub_weights_file, is_hub_folder, save_hub_folder
from .rmt import MODEL_ARGS, checkpoint_filter_fn, default_cfgs, guess_variant
from .weights import (
    CheckpointMismatchError,
    open_checkpoint,
    read_metadata,
    read_state_dict,
    save_weights,
    unwrap_state_dict,
)

__all__ = ["list_models", "split_name", "create_model", "checkpoint_info", "convert_checkpoint", "hub_output",
           "find_checkpoint"]


def list_models(pretrained_tags: bool = False) -> List[str]:
    """Registered RMT variants (``rmt_t`` ...), or with ``pretrained_tags`` every ``name.tag``."""
    if not pretrained_tags:
        return list(MODEL_ARGS)
    return [f"{name}.{tag}" for name in MODEL_ARGS for tag in default_cfgs[name].tags]


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """``"rmt_s.tl_in1k"`` -> ``("rmt_s", "tl_in1k")``, checking both parts."""
    base, _, tag = name.partition(".")
    if base not in MODEL_ARGS:
        raise RMTError(f"unknown model {name!r}{did_you_mean(name, list_models() + list_models(True))}; "
                       f"choose from {', '.join(list_models())}")
    tags = list(default_cfgs[base].tags)
    if tag and tag not in tags:
        raise RMTError(f"{base} has no weights tagged {tag!r}{did_you_mean(tag, tags)}; tags: {', '.join(tags)}")
    return base, tag or None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a checkpoint file or a Hub-layout model folder (see :mod:`rmt.models.hub`)."""
    path = Path(path)
    if path.is_file() or is_hub_folder(path):
        return path
    if path.is_dir():
        raise RMTError(f"checkpoint {path} is a folder without config.json: pass a weights file, "
                       f"or a model folder written by `rmt convert SRC FOLDER`")
    raise RMTError(f"checkpoint {'is not a regular file' if path.exists() else 'not found'}: {path}")


def checkpoint_info(path: str | os.PathLike) -> Dict[str, Any]:
    """What a checkpoint says about its model without building one: ``num_classes``,
    ``token_label`` and ``model`` (read off the weights when the file does not say, as for official
    checkpoints and other tools' files; ``model`` is then the variant whose widths and depths fit,
    if any), and, for the files this package writes, ``class_names``, ``data_config``, ... (see
    :data:`rmt.models.weights.METADATA_KEYS`).

    ``path`` is a weights file or a Hub-layout model folder.
    """
    path = Path(path)
    if is_hub_folder(path):
        return hub_checkpoint_info(path)
    info = read_metadata(path)
    if not {"num_classes", "token_label", "model"} <= set(info):
        state_dict = unwrap_state_dict(open_checkpoint(path))
        head = state_dict.get("head.weight")
        info.setdefault("num_classes", int(head.shape[0]) if head is not None else 0)
        info.setdefault("token_label", "aux_head.weight" in state_dict)
        variant = guess_variant(state_dict)
        if variant is not None:
            info.setdefault("model", variant.removesuffix("_tl"))
    return info


def create_model(
    name: str,
    checkpoint: Optional[str | os.PathLike] = None,
    num_classes: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` (``rmt_s``, ``rmt_s.tl_in1k``), with the weights of ``checkpoint`` if given.

    ``checkpoint`` is an official ``.pth``, one of our ``.safetensors``, a run checkpoint or a
    Hub-layout model folder; the class count and the token-labelling head are taken from it unless
    given. Without a checkpoint the model is randomly initialised. Other keyword arguments go to the
    model (``drop_path_rate``, ``in_chans``, ...).
    """
    base, tag = split_name(name)
    if checkpoint is None:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(base, pretrained=False, pretrained_cfg=tag, **kwargs)
    checkpoint = find_checkpoint(checkpoint)
    info = checkpoint_info(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else None
    if folder is not None:
        checkpoint = hub_weights_file(folder)
        for key, value in info.get("model_args", {}).items():
            kwargs.setdefault(key, value)
    ckpt_classes = int(info["num_classes"])
    kwargs.setdefault("token_label", bool(info["token_label"]))
    kwargs["num_classes"] = ckpt_classes if num_classes is None else num_classes
    overlay = dict(file=str(checkpoint), num_classes=ckpt_classes)
    if folder is not None:  # the model's pretrained_cfg describes the folder's preprocessing, as timm's loader does
        overlay.update({k: tuple(v) if isinstance(v, list) else v for k, v in info["data_config"].items()
                        if k in ("input_size", "interpolation", "mean", "std", "crop_pct")})
    try:
        return timm.create_model(base, pretrained=True, pretrained_cfg=tag, pretrained_cfg_overlay=overlay, **kwargs)
    except RMTError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        if folder is None:
            raise
        # a hand-edited config.json whose model_args pass the type checks but do not build together
        raise RMTError(f"{folder / HUB_CONFIG}: cannot build {base} from it ({type(e).__name__}: "
                       f"{shorten(str(e), 200)})") from None


def hub_output(dst: str | os.PathLike, hub: Optional[bool] = None) -> bool:
    """Whether a conversion writes a Hub-layout folder (True) or one ``.safetensors`` file: ``hub`` when
    given, else a ``dst`` without a suffix (or an existing folder) is a folder. Checks that ``dst`` fits."""
    dst = Path(dst)
    if hub is None:
        if dst.suffix not in ("", ".safetensors") and not dst.is_dir():
            raise RMTError(f"{dst}: the output is a .safetensors file, or a folder (a path without a suffix, "
                           f"or --hub) for the Hub layout")
        return dst.suffix != ".safetensors"
    if hub and dst.suffix == ".safetensors":
        raise RMTError(f"{dst}: a Hub-layout output is a folder; drop the .safetensors suffix")
    return hub


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_name: Optional[str] = None,
    use_ema: bool = False,
    hub: Optional[bool] = None,
    overwrite: bool = False,
) -> Tuple[str, Path]:
    """Convert a checkpoint (official, a run's, or ours) to our safetensors file or a Hub-layout folder.

    ``dst`` ending in ``.safetensors`` is written as one file; a path without a suffix (or any path
    with ``hub=True``) as a folder in timm's Hub layout (:func:`rmt.models.hub.save_hub_folder`).
    The variant is read off the weights unless ``model_name`` is given; the weights are loaded into
    that model (which checks every key and shape) and saved from it, with the class names and data
    config of a run checkpoint when the source has them. A folder that already holds files is refused
    unless ``overwrite`` (then its model files are replaced, see ``save_hub_folder``). Returns
    ``(model_name, dst)``.
    """
    dst = Path(dst)
    hub = hub_output(dst, hub)
    src = find_checkpoint(src)
    info = checkpoint_info(src)
    state_dict = read_state_dict(hub_weights_file(src) if src.is_dir() else src, use_ema=use_ema)
    name = model_name or guess_variant(state_dict)
    if name is None:
        raise CheckpointMismatchError(f"{src}: the weights match no RMT variant; pass the model name")
    token_label = name.endswith("_tl")
    base = name[: -len("_tl")] if token_label else name
    split_name(base)
    token_label = token_label or "aux_head.weight" in state_dict
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 1000
    model = timm.create_model(base, pretrained=False, num_classes=num_classes, token_label=token_label)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    class_names, data_config = info.get("class_names"), info.get("data_config")
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # names of another head: the weights decide
    if hub:
        folder = save_hub_folder(model, dst, model_name=base, class_names=class_names, data_config=data_config,
                                 source=src.name, overwrite=overwrite)
        return base, folder
    metadata = dict(model=base, token_label=token_label, num_classes=num_classes, source=src.name)
    if class_names is not None:
        metadata["class_names"] = class_names
    if data_config is not None:
        metadata["data_config"] = data_config
    return base, save_weights(model, dst, metadata)
