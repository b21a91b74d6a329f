"""The dense golden data (tests/fixtures/dense_golden, see its README.md): reading the cases, comparing
tensors with their summaries, rebuilding the golden weights and writing official-format checkpoints."""
from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import torch

from golden import official_state_dict

DENSE = Path(__file__).parent / "fixtures" / "dense_golden"
REL = 1e-4  # relative tolerance on sums / values (float32 round-off)


def load_dense_golden(name: str) -> dict:
    with gzip.open(DENSE / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def assert_summary(t: torch.Tensor, ref: dict, what: str) -> None:
    """``t`` against a generator summary: shape, sum, abs-sum, first and evenly spaced values."""
    t = t.detach().double()
    assert list(t.shape) == ref["shape"], f"{what}: shape {list(t.shape)} != {ref['shape']}"
    flat = t.flatten()
    scale = ref["abs_sum"] / max(flat.numel(), 1)  # mean magnitude
    assert abs(flat.abs().sum().item() - ref["abs_sum"]) <= REL * ref["abs_sum"], what
    assert abs(flat.sum().item() - ref["sum"]) <= REL * ref["abs_sum"], what
    for name, got in (("first", flat[: len(ref["first"])]), ("sample", flat[ref["sample_index"]])):
        want = torch.tensor(ref[name], dtype=torch.float64)
        err = (got - want).abs().max().item()
        assert err <= REL * max(scale, want.abs().max().item()), f"{what} {name}: max abs diff {err:.3g}"


def dense_state_dict(keys) -> dict:
    """The golden weights of a detector/segmentor: the classification golden recipe plus the two
    class-score adjustments of README.md ("Weights")."""
    state = official_state_dict(keys)
    for key in state:
        if re.search(r"bbox_head\.\d+\.fc_cls\.weight$", key):  # cascade stages
            state[key] = state[key] * 3.5
        elif key.endswith("fc_cls.weight"):
            state[key] = state[key] * 0.5
        elif key.endswith("retina_cls.bias"):
            state[key] = state[key] + -math.log((1 - 0.01) / 0.01)
    return state



def save_official_dense_checkpoint(path: Path, state: dict, classes, config_text: str) -> Path:
    """A file as the official tools save it (mmcv ``save_checkpoint``; README.md of the golden data)."""
    meta = {"mmcv_version": "1.3.8", "time": "Sun Jan  1 00:00:00 2023", "CLASSES": tuple(classes),
            "config": config_text, "mmseg_version": "0.13.0+0000000", "epoch": 1, "iter": 160000}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path
