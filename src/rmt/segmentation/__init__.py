"""Semantic segmentation with RMT backbones (UperNet, Semantic FPN): the config, the models, training
(``rmt seg train``), evaluation and prediction, and official (mmseg) checkpoints: read directly and
converted by ``rmt convert`` (importing this package registers the converter)."""
from . import convert as _convert  # noqa: F401  registers the segmentation converter with rmt.tools.convert
from .config import SegConfig
from .models import ARCHS, build_segmentor, segmentor_from_checkpoint, slide_inference
from .train import train

__all__ = ["SegConfig", "ARCHS", "build_segmentor", "segmentor_from_checkpoint", "slide_inference", "train"]
