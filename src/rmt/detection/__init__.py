"""Object detection and instance segmentation with RMT backbones (torchvision detectors).

``build_detector`` and friends load on first use, so that ``rmt`` commands which do not detect
anything do not import torchvision's detection models. The jobs are in the submodules ``train``,
``evaluate`` and ``predict``.
"""
from typing import Any

__all__ = ["build_detector", "detector_from_checkpoint", "ARCHS"]

_WHERE = dict(build_detector="models", detector_from_checkpoint="models", ARCHS="models")


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
