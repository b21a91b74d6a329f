"""Shared pieces of the dense-prediction tasks: the RMT backbone, configs and the training loop."""
from .backbone import RMTBackbone, load_backbone_weights

__all__ = ["RMTBackbone", "load_backbone_weights"]
