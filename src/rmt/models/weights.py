"""Reading and writing RMT weights: official ``.pth`` checkpoints and our ``.safetensors``.

Official checkpoints are ``torch.save`` dicts with the weights under ``model`` (and ``model_ema``,
``optimizer``, ``args`` -- an ``argparse.Namespace`` --, ...), sometimes under ``state_dict``, some
with a ``module.`` prefix from DDP. They are read with ``weights_only=True``: the Namespace is
allowed explicitly (it only holds plain values), nothing else is unpickled.

Our own format is safetensors: the model's state dict (fused ``qkv``), with the variant name and
any class names in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import RMTError
from ..files import atomic_write

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "read_checkpoint", "open_checkpoint", "read_state_dict",
    "unwrap_state_dict", "read_metadata", "read_weights", "save_weights", "load_matching_weights",
    "remap_official_keys", "infer_arch", "METADATA_KEYS", "META_KEY",
]

METADATA_KEYS = {
    "task": "classification, detection or segmentation",
    "model": "the RMT variant (the backbone's, for dense tasks)",
    "num_classes": "outputs of the classifier",
    "class_names": "one name per class",
    "token_label": "whether the model has the token-labelling head",
    "data_config": "how images are prepared: input_size, mean, std, interpolation, crop_pct (classification)",
    "config": "the resolved training config of the run that wrote the file",
    "metrics": "the evaluation the weights were saved at (epoch/iteration and metric values)",
    "source": "the file a converted checkpoint came from",
}
"""The metadata our weight files carry, as JSON values: in a ``.safetensors`` file's metadata, and in a
run checkpoint under :data:`META_KEY`. Files that lack a key do not know it."""

META_KEY = "meta"
"""The entry of a torch checkpoint dict of ours that holds the same metadata (run checkpoints)."""

WEIGHT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
"""Where a checkpoint dict may keep its weights, in order of preference (EMA weights last: the
reference evaluates ``model``)."""


class CheckpointError(RMTError, ValueError):
    """A file that cannot be read as RMT weights."""


class CheckpointMismatchError(RMTError, ValueError):
    """A checkpoint's weights do not fit the model they are loaded into."""


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _unreadable_reason(e: Exception) -> str:
    """A short, accurate reason for a failed load (torch's own messages suggest unsafe loading)."""
    text = str(e)
    if isinstance(e, EOFError) or "Ran out of input" in text:
        return "the file is empty or truncated"
    if "failed finding central directory" in text or "not a ZIP archive" in text or "PytorchStreamReader" in text:
        return "the file is truncated or corrupt (not a complete torch checkpoint archive)"
    if "HeaderTooLarge" in text or "header" in text.lower():
        return "not a valid safetensors file (bad header: truncated, corrupt, or another format)"
    if "Weights only load failed" in text or "weights_only" in text:
        return ("not a weights-only torch checkpoint: it is not a checkpoint, or it stores objects other than "
                "tensors and plain data")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{type(e).__name__}: {first}"


def _require_file(path: Path) -> None:
    if not path.is_file():  # a FIFO or a device is refused too: reading one could block
        raise CheckpointError(f"checkpoint {'is not a regular file' if path.exists() else 'not found'}: {path}")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file safely: safetensors, or a ``torch.save`` file with ``weights_only=True``."""
    path = Path(path)
    _require_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return _torch_load(path)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise CheckpointError(f"cannot read {path} as a checkpoint: {_unreadable_reason(e)}") from e


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint: picks ``model``/``state_dict``/``model_ema`` and strips
    ``module.`` prefixes. ``use_ema`` prefers the EMA weights when the file has them."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict of weights, found {type(checkpoint).__name__}")
    order = WEIGHT_KEYS[2:] + WEIGHT_KEYS[:2] if use_ema else WEIGHT_KEYS
    for key in order:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor: not a weights file")
        state_dict[key[len("module."):] if key.startswith("module.") else key] = value
    if not state_dict:
        raise CheckpointError("the checkpoint holds no weights")
    return state_dict


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`read_checkpoint` + :func:`unwrap_state_dict`."""
    checkpoint = read_checkpoint(path)
    try:
        return unwrap_state_dict(checkpoint, use_ema=use_ema)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def open_checkpoint(path: str | os.PathLike) -> Any:
    """:func:`read_checkpoint`, but a torch file's tensors are memory-mapped rather than read (for
    looking at a few entries of a large file)."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.is_file():
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not mappable (an old, non-zip file): read_checkpoint reports or reads it
            pass
    return read_checkpoint(path)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:  # metadata written by another tool ({"format": "pt"}): plain strings
        return value


def _with_defaults(meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` with ``task`` filled in: a file that names a model but no task holds a classifier."""
    meta = dict(meta)
    if "task" not in meta and "model" in meta:
        meta["task"] = "classification"
    return meta


def read_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """What one of our weight files says about its model (see :data:`METADATA_KEYS`): the metadata of a
    ``.safetensors`` file, or the ``meta`` entry of a run checkpoint (``last.pth``/``best.pth``).
    ``{}`` for files that carry none (official checkpoints, other tools' files)."""
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
        except Exception as e:  # not a safetensors file, truncated, ...
            raise CheckpointError(f"cannot read {path} as a checkpoint: {_unreadable_reason(e)}") from None
        return _with_defaults({k: _json_or_text(v) for k, v in raw.items()})
    raw = open_checkpoint(path)
    meta = raw.get(META_KEY) if isinstance(raw, dict) and isinstance(raw.get(META_KEY), dict) else {}
    return _with_defaults(meta)


def read_weights(path: str | os.PathLike, task: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state_dict, metadata)`` of one of our weight files (``model.safetensors``, or a run's
    ``last.pth``/``best.pth``), checking with ``task`` that it is one of that task's and that it
    carries the config and class names needed to rebuild its model."""
    meta = read_metadata(path)
    if task is not None and (meta.get("task") != task or "config" not in meta or "class_names" not in meta):
        found = f"a {meta['task']} checkpoint" if meta.get("task") else "not a checkpoint written by an rmt run"
        raise CheckpointError(f"{path}: {found}; expected a {task} run's model.safetensors, best.pth or last.pth")
    return read_state_dict(path), meta


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model``'s state dict as safetensors, atomically (rmt.files); ``metadata`` values are
    stored as JSON (see :data:`METADATA_KEYS`)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    text = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=text),
                        size=lambda: sum(v.numel() * v.element_size() for v in state.values()))


def load_matching_weights(model: torch.nn.Module, path: str | os.PathLike, prefix: str = "",
                          use_ema: bool = False) -> Dict[str, list]:
    """Load what fits of a checkpoint (official or ours) into ``model``: for fine-tuning with another
    head or class count, and for dense-prediction backbones.

    ``prefix`` selects a sub-tree of the checkpoint (e.g. ``"backbone."``) and strips it. Keys
    whose shapes differ, or that the checkpoint lacks, keep the model's fresh initialisation.
    Returns ``{"loaded", "reinitialised", "unexpected"}`` key lists; raises when nothing fits.
    """
    source = read_state_dict(path, use_ema=use_ema)
    if prefix:
        source = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    source = remap_official_keys(source)
    target = model.state_dict()
    fits = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    if not fits:
        raise CheckpointError(f"{path}: none of its weights fit {type(model).__name__}; wrong model?")
    model.load_state_dict(fits, strict=False)
    return dict(loaded=sorted(fits), reinitialised=sorted(k for k in target if k not in fits),
                unexpected=sorted(k for k in source if k not in target))


_OFFICIAL_QKV = re.compile(r"^(.*\.retention\.)([qkv])_proj\.(weight|bias)$")


def remap_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official key layout -> ours: fuse q/k/v projections, ``Relpos`` -> ``relpos``."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _OFFICIAL_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        out[re.sub(r"\.Relpos\.", ".relpos.", key)] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointMismatchError(f"checkpoint has no {prefix}{missing[0]}_proj.{kind}")
        out[f"{prefix}qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    """Widths, depths and token-labelling of the network a state dict (official or ours) belongs to."""
    depths: Dict[int, int] = {}
    dims: Dict[int, int] = {}
    for key, value in state_dict.items():
        m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.retention_layer_norm\.weight$", key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            dims[stage] = value.shape[0]
    if not depths or sorted(depths) != list(range(len(depths))):
        return None
    n = len(depths)
    return dict(embed_dims=tuple(dims[i] for i in range(n)), depths=tuple(depths[i] for i in range(n)),
                token_label="aux_head.weight" in state_dict)
