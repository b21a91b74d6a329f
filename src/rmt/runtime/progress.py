"""Progress reporting: one bar style for training epochs, evaluations and inference over folders."""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable, enabled: bool = True, **kwargs):
    """A tqdm bar when ``enabled`` (the main process) and stderr is a terminal; else the plain iterable."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True, **kwargs)
