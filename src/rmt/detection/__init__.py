"""Object detection and instance segmentation with RMT backbones (torchvision detectors): the config,
the models, training (``rmt det train``), evaluation and prediction."""
from .config import DetConfig
from .models import ARCHS, build_detector, detector_from_checkpoint
from .train import train

__all__ = ["DetConfig", "ARCHS", "build_detector", "detector_from_checkpoint", "train"]
