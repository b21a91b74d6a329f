"""rmt: RMT (Retentive Networks Meet Vision Transformers) models, training and tools.

``import rmt`` registers ``rmt_t``, ``rmt_s``, ``rmt_b`` and ``rmt_l`` in timm.
"""
from . import models
from .models import RMT
from .runtime.classifier import predict

__version__ = "0.1.0"
__all__ = ["RMT", "__version__", "models", "predict"]
