"""Object detection and instance segmentation with RMT backbones (the official RMT COCO detectors on
torchvision's frame): the config, the models, training (``rmt det train``), evaluation and prediction, and
official (mmdet) checkpoints: read directly and converted by ``rmt convert`` (importing this package
registers the converter)."""
from . import convert as _convert  # noqa: F401  registers the detection converter with rmt.tools.convert
from .config import DetConfig
from .models import ARCHS, build_detector, detector_from_checkpoint
from .train import train

__all__ = ["DetConfig", "ARCHS", "build_detector", "detector_from_checkpoint", "train"]
