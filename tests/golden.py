"""Reference data from the official implementation (tests/fixtures/golden, see SOURCE.md there) and the helpers that
put weights into its key layout."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rmt.models import RMT
from rmt.models.reference import ReferenceRMT

GOLDEN = Path(__file__).parent / "fixtures" / "golden"

TINY_ARGS = dict(
    embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), init_values=(2, 2, 2, 2),
    heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), projection=64, num_classes=10, drop_path_rate=0.0,
)
TINY_CASES = {
    "official_tiny": dict(TINY_ARGS, decomposed=(True, True, False, False), layer_scale=(False, False, True, True)),
    "official_tiny_tl": dict(TINY_ARGS, decomposed=(True, True, True, False), token_label=True),
}


def load_golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def official_state_dict(keys) -> dict[str, torch.Tensor]:
    """Rebuild the seeded synthetic weights the golden outputs were produced with (SOURCE.md)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for name, shape, fixed in keys:
        if fixed is not None:
            t = torch.tensor(fixed, dtype=torch.float32)
        elif name.endswith("num_batches_tracked"):
            t = torch.tensor(0)
        elif name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "gamma" in name:
            t = 0.5 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
            small = (".pos.", ".lepe.", "dwconv")
            if name.endswith(("out_proj.weight", "fc2.weight")) or any(s in name for s in small):
                t = t * 0.2
        elif name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        out[name] = t
    return out


def official_layout(state_dict: dict) -> dict[str, torch.Tensor]:
    """Our state dict in the official key layout (what ``ReferenceRMT`` and the official code load): the fused
    ``qkv`` split into ``q_proj``/``k_proj``/``v_proj`` and ``relpos`` spelt ``Relpos``. The inverse of
    ``checkpoint_filter_fn``, written apart from it so that a test of one does not rely on the other."""
    out = {}
    for key, value in state_dict.items():
        if ".qkv." in key:
            prefix, kind = key.rsplit(".qkv.", 1)
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{part}_proj.{kind}"] = chunk
        else:
            out[key.replace(".relpos.", ".Relpos.")] = value
    return out


def oracle_pair(args: dict, seed: int = 0, token_label: bool = False) -> tuple[RMT, ReferenceRMT]:
    """The fast model and the oracle (``ReferenceRMT``) with the same random weights, BN statistics and layer
    scales moved off their initial values too."""
    torch.manual_seed(seed)
    fast = RMT(**args, token_label=token_label)
    with torch.no_grad():
        for name, buf in fast.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # move gammas/biases off their init values
    ref = ReferenceRMT(**{k: v for k, v in args.items() if k != "drop_path_rate"}, token_label=token_label)
    ref.load_state_dict(official_layout(fast.state_dict()))
    return fast, ref


def case_input(case: dict) -> torch.Tensor:
    return torch.randn(case["input_shape"], generator=torch.Generator().manual_seed(case["input_seed"]))


def save_official_checkpoint(path: Path, state_dict: dict, wrap: str = "model", prefix: str = "") -> Path:
    """Save weights the way the official training script does (with an argparse.Namespace in ``args``)."""
    weights = {prefix + k: v for k, v in state_dict.items()}
    payload = {wrap: weights, "epoch": 299, "args": argparse.Namespace(model="RMT_T3", lr=1e-3, input_size=224)}
    torch.save(payload, path)
    return path
