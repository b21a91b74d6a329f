"""Datasets: the bundled digits, ImageNet-style folders, token labels; robust image reading."""
from .digits import DigitsDataset
from .folder import BadSample, ImageFolderDataset, collate_skip_bad
from .image import BadImageError, load_rgb
from .transforms import eval_transform, final_grid

__all__ = ["DigitsDataset", "ImageFolderDataset",
           "BadSample", "collate_skip_bad", "BadImageError", "load_rgb",
           "eval_transform", "final_grid"]
