"""Classification training and evaluation."""
from .config import TrainConfig, load_config
from .evaluate import evaluate
from .train import TrainResult, train

__all__ = ["TrainConfig", "load_config", "evaluate", "train", "TrainResult"]
