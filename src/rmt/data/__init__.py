"""Datasets: the bundled digits, ImageNet-style folders, token labels; robust image reading."""
from .datasets import DataBundle, build_datasets, eval_transform, final_grid
from .digits import DigitsDataset
from .folder import BadSample, ImageFolderDataset, collate_skip_bad
from .image import BadImageError, load_rgb

__all__ = ["DataBundle", "build_datasets", "eval_transform", "final_grid", "DigitsDataset", "ImageFolderDataset",
           "BadSample", "collate_skip_bad", "BadImageError", "load_rgb"]
