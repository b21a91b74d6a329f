"""Image classification: the config, training (``rmt train``), evaluation of a checkpoint (``rmt eval``),
the demo page (``rmt demo``) and token labelling (``rmt token-labels``). ``rmt predict`` and
:func:`rmt.predict` run a classifier loaded by :mod:`rmt.runtime.classifier`."""
from .config import ClassificationConfig
from .evaluate import evaluate_checkpoint
from .train import train

__all__ = ["ClassificationConfig", "train", "evaluate_checkpoint"]
