"""RMT as a backbone for dense prediction: feature maps at strides 4/8/16/32, one LayerNorm each.

:class:`RMTBackbone` wraps the classification network (:class:`rmt.models.RMT`, without its
classifier) and returns an ``OrderedDict`` of the requested stage outputs, named ``"0"``, ``"1"``,
... in the torchvision convention, so that torchvision's ``FeaturePyramidNetwork`` and
``MultiScaleRoIAlign`` take it as is. Like the reference's dense backbones (``extra_norms`` in
``detect/mmdet/models/backbones/RMT.py``), each output level goes through its own LayerNorm
(``nn.LayerNorm``'s default ``eps=1e-5``, over channels) that the ImageNet checkpoints do not
have: those norms, and nothing else, are reported as missing when ImageNet weights are loaded.
:func:`official_backbone_state` maps the backbone of an official detection/segmentation
checkpoint onto this module; with it the features equal the official code's (eval and train mode,
tests/models/test_dense_golden.py).

Options the reference's detection and segmentation configs use: stochastic depth, which stages
run decomposed MaSA (the variant's own choice unless ``decomposed`` overrides it), BatchNorm
layers frozen in eval mode (``norm_eval``), and frozen early stages (``frozen_stages``). The
official dense configs set ``norm_eval=True``, but there it only calls ``.eval()`` on
``nn.BatchNorm2d`` instances while the official backbone's norms are ``nn.SyncBatchNorm`` (not a
subclass): they train with batch statistics. ``norm_eval=False`` (our default) is what the official
models actually did.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import RMTError
from .factory import create_model
from .weights import load_matching_weights, read_state_dict, remap_official_keys

__all__ = ["RMTBackbone", "load_backbone_weights", "official_backbone_state"]

_logger = logging.getLogger(__name__)


class RMTBackbone(nn.Module):
    """RMT feature extractor for dense tasks.

    Args:
        name: variant, ``rmt_t`` / ``rmt_s`` / ``rmt_b`` / ``rmt_l``.
        out_indices: stages to return (0-3, strides 4, 8, 16, 32).
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``k >= 1`` also freezes
            stages ``0..k-1`` (with the downsampling that follows each).
        norm_eval: keep every BatchNorm layer (stem, downsampling) in eval mode with frozen
            affine parameters, as the reference does when fine-tuning from ImageNet weights.
        drop_path_rate: stochastic depth (default: the variant's, which the reference's dense
            configs use too).
        decomposed: per stage, decomposed MaSA (default: the variant's).
        weights: ImageNet weights (an official ``.pth`` or one of our ``.safetensors``) to load;
            the report is kept in ``self.load_report``.

    ``forward(images (B, 3, H, W))`` -> ``OrderedDict`` of ``(B, C_i, H/s_i, W/s_i)`` maps (NCHW
    views in channels-last memory). ``out_channels`` and ``strides`` list the returned levels.
    """

    def __init__(
        self,
        name: str = "rmt_t",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        drop_path_rate: Optional[float] = None,
        decomposed: Optional[Sequence[bool]] = None,
        weights: Optional[str | os.PathLike] = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not 0 <= out_indices[0] \
                or out_indices[-1] > 3:
            raise RMTError(f"out_indices must be increasing stage indices in 0..3, got {list(out_indices)}")
        if not -1 <= frozen_stages <= 4:
            raise RMTError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        kwargs = {}
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        if decomposed is not None:
            kwargs["decomposed"] = tuple(bool(d) for d in decomposed)
            if len(kwargs["decomposed"]) != 4:
                raise RMTError(f"decomposed needs one value per stage (4), got {list(decomposed)}")
        self.name = name
        body = create_model(name, num_classes=0, **kwargs)
        # the classifier's projection, norm and head, and stages after the last requested one, go
        self.body = body
        self.body.prune_intermediate_layers(list(out_indices), prune_head=True)
        if grad_checkpointing:
            self.body.set_grad_checkpointing(True)
        self.out_indices = out_indices
        dims = [info["num_chs"] for info in body.feature_info]
        self.out_channels: List[int] = [dims[i] for i in out_indices]
        self.strides: List[int] = [body.feature_info[i]["reduction"] for i in out_indices]
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-5) for c in self.out_channels)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.load_report: Optional[Dict[str, List[str]]] = None
        if weights is not None:
            self.load_report = load_backbone_weights(self, weights)
        self._freeze()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.body.patch_embed] + list(self.body.layers[: self.frozen_stages])

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> RMTBackbone:
        """Train mode, except for frozen stages and (with ``norm_eval``) BatchNorm layers."""
        super().train(mode)
        if mode:
            self._freeze()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=list(self.out_indices), output_fmt="NHWC",
                                                intermediates_only=True)
        out = OrderedDict()
        for i, (f, norm) in enumerate(zip(feats, self.norms)):
            out[str(i)] = norm(f).permute(0, 3, 1, 2)
        return out


def load_backbone_weights(backbone: RMTBackbone, path: str | os.PathLike, prefix: str = "") -> Dict[str, List[str]]:
    """Load ImageNet weights (an official ``.pth`` or our ``.safetensors``) into ``backbone``; returns
    and logs ``{"loaded", "missing", "unexpected"}`` key lists.

    ``loaded``/``missing`` are the backbone's own keys (``body.layers.0...``, ``norms.0...``):
    ``missing`` are those the file lacks or holds in another shape, kept as initialised -- for
    ImageNet weights, only the per-level LayerNorms. ``unexpected`` are the file's keys the backbone
    has no use for (the classifier: ``proj``, ``norm``, ``head``). ``prefix`` selects a sub-tree of
    the file (e.g. ``"backbone."``) and strips it; by default the weights of a detection or
    segmentation run (``model.safetensors``, ``best.pth``) are recognised and their backbone,
    level norms included, is taken.
    """
    if not os.path.isfile(path):
        raise RMTError(f"backbone weights not found: {path}")
    if not prefix:
        prefix = _dense_run_prefix(read_state_dict(path))
    if prefix:  # a detection or segmentation run's weights: the whole backbone, level norms included
        report = load_matching_weights(backbone, path, prefix=prefix)
        loaded = set(report["loaded"])
    else:  # ImageNet weights: the classification network
        report = load_matching_weights(backbone.body, path)
        loaded = {f"body.{k}" for k in report["loaded"]}
    own = list(backbone.state_dict())
    result = dict(loaded=sorted(loaded), missing=[k for k in own if k not in loaded],
                  unexpected=sorted(report["unexpected"]))
    _logger.info("backbone weights %s: loaded %d tensors; missing %d%s; unexpected %d%s", path,
                 len(result["loaded"]), len(result["missing"]), _few(result["missing"]), len(result["unexpected"]),
                 _few(result["unexpected"]))
    return result


def official_backbone_state(state_dict: Dict[str, torch.Tensor], out_indices: Sequence[int] = (0, 1, 2, 3),
                            prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """The ``prefix`` sub-tree of an official mmdet/mmseg state dict (the dense ``RMT`` backbone: the
    classification layout plus ``extra_norms.i``) as :class:`RMTBackbone` keys: ``body.`` + our
    classification keys (:func:`rmt.models.weights.remap_official_keys`), and ``norms.k`` from
    ``extra_norms[out_indices[k]]`` (RetinaNet's backbone returns levels 1-3: its ``extra_norms.0``
    is unused by the official model too and is dropped here)."""
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not any(k.startswith("layers.") for k in sub):
        raise RMTError(f"no official RMT backbone under {prefix!r} (expected keys like {prefix}layers.0.blocks.0...)")
    norms = {}
    body = {}
    for key, value in sub.items():
        if key.startswith("extra_norms."):
            level, rest = key[len("extra_norms."):].split(".", 1)
            if int(level) in out_indices:
                norms[f"norms.{list(out_indices).index(int(level))}.{rest}"] = value
        else:
            body[key] = value
    out = {"body." + k: v for k, v in remap_official_keys(body).items()}
    out.update(norms)
    return out


def _dense_run_prefix(state_dict: Dict[str, torch.Tensor]) -> str:
    """Where an :class:`RMTBackbone` sits in a dense run's weights: ``backbone.body.`` in a detector
    (backbone = FPN wrapper), ``backbone.`` in a segmentor; ``""`` for anything else."""
    for prefix in ("backbone.body.", "backbone."):
        if any(k.startswith(prefix + "body.layers.") for k in state_dict):
            return prefix
    return ""


def _few(keys: Sequence[str], n: int = 4) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + ")"
