"""Semantic segmentation with RMT backbones (UperNet, Semantic FPN)."""
