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

from ..errors import RMTError, did_you_mean
from .rmt import MODEL_ARGS, checkpoint_filter_fn, default_cfgs, guess_variant
from .weights import (
    CheckpointMismatchError,
    open_checkpoint,
    read_metadata,
    read_state_dict,
    save_weights,
    unwrap_state_dict,
)

__all__ = ["list_models", "split_name", "create_model", "checkpoint_info", "convert_checkpoint"]


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


def checkpoint_info(path: str | os.PathLike) -> Dict[str, Any]:
    """What a weights file says about its model without building one: ``num_classes``,
    ``token_label`` and ``model`` (read off the weights when the file does not say, as for official
    checkpoints and other tools' files; ``model`` is then the variant whose widths and depths fit,
    if any), and, for the files this package writes, ``class_names``, ``data_config``, ... (see
    :data:`rmt.models.weights.METADATA_KEYS`)."""
    path = Path(path)
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

    ``checkpoint`` is an official ``.pth`` or one of our ``.safetensors``; the class count and the
    token-labelling head are taken from it unless given. Without a checkpoint the model is randomly
    initialised. Other keyword arguments go to the model (``drop_path_rate``, ``in_chans``, ...).
    """
    base, tag = split_name(name)
    if checkpoint is None:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(base, pretrained=False, pretrained_cfg=tag, **kwargs)
    if not Path(checkpoint).is_file():
        raise RMTError(f"checkpoint not found: {checkpoint}")
    info = checkpoint_info(checkpoint)
    ckpt_classes = int(info["num_classes"])
    kwargs.setdefault("token_label", bool(info["token_label"]))
    kwargs["num_classes"] = ckpt_classes if num_classes is None else num_classes
    overlay = dict(file=str(checkpoint), num_classes=ckpt_classes)
    return timm.create_model(base, pretrained=True, pretrained_cfg=tag, pretrained_cfg_overlay=overlay, **kwargs)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_name: Optional[str] = None,
    use_ema: bool = False,
) -> Tuple[str, Path]:
    """Convert an official checkpoint to our safetensors format.

    The variant is read off the weights unless ``model_name`` is given; the weights are loaded into
    that model (which checks every key and shape) and saved from it. Returns ``(model_name, dst)``.
    """
    state_dict = read_state_dict(src, use_ema=use_ema)
    name = model_name or guess_variant(state_dict)
    if name is None:
        raise CheckpointMismatchError(f"{src}: the weights match no RMT variant; pass the model name")
    token_label = name.endswith("_tl")
    base = name[: -len("_tl")] if token_label else name
    token_label = token_label or "aux_head.weight" in state_dict
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 1000
    model = timm.create_model(base, pretrained=False, num_classes=num_classes, token_label=token_label)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    metadata = dict(model=base, token_label=token_label, num_classes=num_classes, source=Path(src).name)
    return base, save_weights(model, dst, metadata)
