import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/golden.py and friends

import rmt  # noqa: E402,F401  registers the models

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def golden_checkpoint(tmp_path):
    """Save a golden case's weights as an official checkpoint file; returns (path, golden data, model args)."""
    from golden import TINY_CASES, load_golden, official_state_dict, save_official_checkpoint

    def make(name: str, **save_kwargs):
        data = load_golden(name)
        path = save_official_checkpoint(tmp_path / f"{name}.pth", official_state_dict(data["keys"]), **save_kwargs)
        return path, data, dict(TINY_CASES[name])

    return make
