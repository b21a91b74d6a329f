"""Image classification: the config, training (``rmt train``), evaluation (``rmt eval``), prediction
(``rmt predict``, :func:`rmt.predict`) and token labelling (``rmt token-labels``)."""
from .config import ClassificationConfig
from .evaluate import evaluate, evaluate_checkpoint
from .predict import Classifier, Prediction, load_classifier
from .train import train

# `predict` (the function) is rmt.predict; rmt.classification.predict stays the module
__all__ = ["ClassificationConfig", "train", "evaluate", "evaluate_checkpoint", "Classifier", "Prediction",
           "load_classifier"]
