"""What detection and segmentation share in reading whole-model checkpoints: the official (mmcv) files of
the paper's COCO and ADE20K models, loading a state dict exactly or as far as it fits (fine-tuning), and
checking a dataset's classes against a model's.

An official file is what mmcv's ``save_checkpoint`` writes: ``{"meta", "state_dict", "optimizer"}``, the
state dict under mmdet / mmseg module names (``backbone.``, ``neck.``, the heads), ``meta["CLASSES"]``
and, when present, ``meta["config"]``: the config as mmcv's ``pretty_text`` prints it (Python assignments
of ``dict(...)`` literals), which :func:`parse_official_config` reads without executing. The task
packages map the keys onto their models and read their heads; the backbone's variant is recognised here
(:func:`official_backbone_variant`), with one :class:`RMTError` line for anything unexpected.
"""
from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ..errors import RMTError
from ..models.hub import hub_weights_file
from ..models.rmt import MODEL_ARGS
from ..models.weights import META_KEY, infer_arch, open_checkpoint, read_weights, unwrap_state_dict
from .config import config_from_dict

__all__ = ["OfficialFile", "read_official_file", "read_dense_checkpoint", "official_class_names",
           "official_backbone_variant",
           "official_backbone_settings", "config_disagrees", "parse_official_config", "load_exactly",
           "load_fitting", "describe_init", "check_class_names"]


# ------------------------------------------------------------------------------ official files
class OfficialFile(NamedTuple):
    """An official checkpoint's parts: the state dict (mmdet / mmseg keys), ``meta`` and its config text."""

    state: Dict[str, torch.Tensor]
    meta: Dict[str, Any]
    config_text: Optional[str]


def read_official_file(path: str | os.PathLike) -> Optional[OfficialFile]:
    """The parts of an official (mmcv ``save_checkpoint``) file; ``None`` for a file of another layout
    (ours: a safetensors file, or a run's ``.pth`` with ``model``)."""
    path = Path(path)
    raw = open_checkpoint(path) if path.is_file() and path.suffix != ".safetensors" else None
    if not (isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict) and "model" not in raw):
        return None
    meta = raw.get(META_KEY) if isinstance(raw.get(META_KEY), dict) else {}
    text = meta.get("config") if isinstance(meta.get("config"), str) else None
    return OfficialFile(unwrap_state_dict({"state_dict": raw["state_dict"]}), meta, text)


def read_dense_checkpoint(path: str | os.PathLike, task: str, config_class: Type,
                          read_official: Callable[[Path], Optional[Tuple[Dict[str, torch.Tensor], Any, List[str]]]]
                          ) -> Tuple[Dict[str, torch.Tensor], Any, List[str]]:
    """``(state dict in our layout, run config, class names)`` of a dense task's model: a run's
    ``model.safetensors``, ``best.pth`` or ``last.pth``, a model folder written by ``rmt convert`` (its
    ``model.safetensors``), or an official file, which ``read_official`` reads (``None``: not one)."""
    path = Path(path)
    if path.is_dir():
        path = hub_weights_file(path)
    official = read_official(path)
    if official is not None:
        return official
    state, meta = read_weights(path, task=task)
    return state, config_from_dict(config_class, meta["config"]), list(meta["class_names"])


def official_class_names(meta: Dict[str, Any], count: int) -> List[str]:
    """``meta["CLASSES"]`` (stripped: mmseg's ADE20K names carry spaces) when it names ``count`` classes,
    else ``class_<i>``."""
    classes = meta.get("CLASSES")
    if isinstance(classes, (list, tuple)) and len(classes) == count:
        return [str(c).strip() for c in classes]
    return [f"class_{i}" for i in range(count)]


def _variant_table() -> str:
    return ", ".join(f"{name} (widths {'-'.join(map(str, a['embed_dims']))}, depths {'-'.join(map(str, a['depths']))})"
                     for name, a in MODEL_ARGS.items())


def _stages(flags: Sequence[bool]) -> str:
    return ", ".join(str(i) for i, f in enumerate(flags) if f) or "none"


def official_backbone_variant(state: Dict[str, torch.Tensor], where: str) -> Tuple[str, Dict[str, Any]]:
    """``(variant, what the weights show)`` of the RMT backbone in an official state dict (its
    ``backbone.`` keys): the widths and depths of ``backbone.layers``, and which stages have layer scale,
    must be those of a released variant (:data:`rmt.models.rmt.MODEL_ARGS`); else one :class:`RMTError`
    line with what was found and what was expected."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    found = infer_arch(backbone)
    variant = next((name for name, a in MODEL_ARGS.items() if found is not None
                    and (a["embed_dims"], a["depths"]) == (found["embed_dims"], found["depths"])), None)
    if variant is None:
        seen = (f"widths {'-'.join(map(str, found['embed_dims']))}, depths {'-'.join(map(str, found['depths']))}"
                if found is not None else "no backbone.layers.<i>.blocks")
        raise RMTError(f"{where}: RMT backbone not recognised (found {seen}); expected one of {_variant_table()}")
    scaled = tuple(f"layers.{i}.blocks.0.gamma_1" in backbone for i in range(4))
    expected = tuple(MODEL_ARGS[variant].get("layer_scale", (False,) * 4))
    if scaled != expected:
        raise RMTError(f"{where}: an {variant} backbone with layer scale in stages {_stages(scaled)}; the released "
                       f"{variant} has it in stages {_stages(expected)}")
    return variant, found


def config_disagrees(where: str, what: str, config_value: Any, weights_value: Any) -> RMTError:
    """The error of a config that says otherwise than the weights (or than what this package computes)."""
    return RMTError(f"{where}: its config says {what} {config_value}, its weights {weights_value}")


def official_backbone_settings(model_cfg: Dict[str, Any], found: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The dense-config fields an official ``model`` config's ``backbone`` adds (``decomposed`` from its
    ``chunkwise_recurrents``, ``drop_path`` from its ``drop_path_rate``), after checking that its widths
    and depths are the weights' (``found``, from :func:`official_backbone_variant`)."""
    body = model_cfg.get("backbone") if isinstance(model_cfg.get("backbone"), dict) else {}
    for key in ("embed_dims", "depths"):
        value = body.get(key)
        if isinstance(value, list) and tuple(value) != tuple(found[key]):
            raise config_disagrees(where, f"backbone {key}", value, list(found[key]))
    out: Dict[str, Any] = {}
    decomposed = body.get("chunkwise_recurrents")
    if isinstance(decomposed, list) and len(decomposed) == 4 and all(isinstance(d, bool) for d in decomposed):
        out["decomposed"] = decomposed
    if isinstance(body.get("drop_path_rate"), (int, float)) and not isinstance(body["drop_path_rate"], bool):
        out["drop_path"] = float(body["drop_path_rate"])
    return out


def parse_official_config(text: str) -> Tuple[Optional[Dict], Optional[Tuple[int, int]]]:
    """``(model dict, test img_scale)`` from an official config's text (mmcv ``pretty_text``), read without
    executing it; ``(None, None)`` when it does not parse. Values other than literals (e.g. ``1500 //
    gpu_multipliers``) read as ``None``.

    The test scale is the ``img_scale`` of the ``MultiScaleFlipAug`` step of ``test_pipeline`` (else of
    ``data.test.pipeline``): mmseg's ``(2048, 512)``, mmdet's ``(1333, 800)``, or a list of one such pair."""
    try:
        with warnings.catch_warnings():  # configs hold strings like 'path\/x' (an invalid escape, kept as is)
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None, None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = _literal(node.value)
    model = found.get("model") if isinstance(found.get("model"), dict) else None
    data = found.get("data") if isinstance(found.get("data"), dict) else {}
    test = data.get("test") if isinstance(data.get("test"), dict) else {}
    scale = _test_scale(found.get("test_pipeline"))
    return model, scale if scale is not None else _test_scale(test.get("pipeline"))


def _test_scale(pipeline: Any) -> Optional[Tuple[int, int]]:
    for step in pipeline if isinstance(pipeline, list) else []:
        if isinstance(step, dict) and step.get("type") == "MultiScaleFlipAug":
            value = step.get("img_scale")
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
                value = value[0]  # one scale given as a list of scales
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
                return value[0], value[1]
    return None


def _literal(node: ast.AST):
    """A config value: ``dict(k=v)``, ``{...}``, lists, tuples (as lists) and constants; else ``None``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    return None


# ----------------------------------------------------------------------------------- loading
def load_exactly(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model``, every key and shape checked; one line naming the first misfits."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in target if k in state and state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise RMTError(f"{what}: the weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state)


def load_fitting(model: nn.Module, state: Dict[str, torch.Tensor], source_classes: int) -> Dict[str, List]:
    """Load every tensor of ``state`` with the name and shape of one of ``model``'s (fine-tuning from a
    whole model: with another class count the class-specific layers keep their fresh initialisation).

    Returns ``{"loaded", "reinitialised", "unused"}`` key lists (``unused``: ``state``'s keys the model
    lacks) and ``{"classes": [source_classes]}``, for :func:`describe_init`."""
    target = model.state_dict()
    fits = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(fits, strict=False)
    return dict(loaded=sorted(fits), reinitialised=sorted(k for k in target if k not in fits),
                unused=sorted(k for k in state if k not in target), classes=[source_classes])


def describe_init(path: str, report: Dict[str, List], num_classes: int) -> str:
    """The log line of a run started from a whole model (:func:`load_fitting`'s report)."""
    line = f"started from {path}: {len(report['loaded'])} tensors loaded"
    if report["reinitialised"]:
        keys = report["reinitialised"]
        line += (f"; reinitialised ({report['classes'][0]} -> {num_classes} classes): "
                 f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    if report["unused"]:
        line += f"; not used: {len(report['unused'])} tensors ({', '.join(report['unused'][:3])} ...)"
    return line


def _plain(name: str) -> str:
    return name.strip().lower()


def check_class_names(found: Optional[Sequence[str]], class_names: Sequence[str], root, fine_tune: str) -> None:
    """Raise one :class:`RMTError` line when a dataset's class list (``found``; ``None``: unnamed, nothing
    to compare) is not the model's ``class_names`` (compared without case and surrounding spaces);
    ``fine_tune`` is the command that would adapt the model to the data."""
    if found is None or [_plain(n) for n in found] == [_plain(n) for n in class_names]:
        return
    if len(found) != len(class_names):
        problem = f"names {len(found)} classes ({', '.join(found[:4])}...), the model predicts {len(class_names)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(found, class_names)) if _plain(a) != _plain(b))
        problem = f"names class {i} {found[i]!r}, the model {class_names[i]!r}"
    raise RMTError(f"{root} {problem} ({', '.join(class_names[:4])}...): evaluate on data with the model's classes, "
                   f"or fine-tune it on these first ({fine_tune})")
