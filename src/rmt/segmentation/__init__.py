"""Semantic segmentation with RMT backbones (UperNet, Semantic FPN): the config, the models, training
(``rmt seg train``), evaluation and prediction."""
from .config import SegConfig
from .models import ARCHS, build_segmentor, segmentor_from_checkpoint, slide_inference
from .train import train

__all__ = ["SegConfig", "ARCHS", "build_segmentor", "segmentor_from_checkpoint", "slide_inference", "train"]
