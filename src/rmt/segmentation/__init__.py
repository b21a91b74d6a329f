"""Semantic segmentation with RMT backbones (UperNet, Semantic FPN).

``build_segmentor`` and friends load on first use (see :mod:`rmt.detection`); the jobs are in the
submodules ``train``, ``evaluate`` and ``predict``.
"""
from typing import Any

__all__ = ["build_segmentor", "segmentor_from_checkpoint", "slide_inference", "ARCHS"]

_WHERE = dict(build_segmentor="models", segmentor_from_checkpoint="models", slide_inference="models",
              ARCHS="models")


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
