"""Parameter and compute counts, and the table of variants (``rmt models`` / ``rmt flops``).

Compute is counted by PyTorch's own ``FlopCounterMode`` and reported in multiply-adds (GMACs,
called "GFLOPs" in the paper, as fvcore counts them). The counter knows matmuls, convolutions and
the GPU attention kernels; the fused CPU attention kernel is registered here so that MaSA's
attention matmuls are counted wherever the model runs. Elementwise work and norms are not counted
(fvcore counts norms too, which is why the spec's figures are ~0.4% higher).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter

__all__ = ["count_params", "count_macs", "model_facts", "variants_table", "PAPER_TOP1"]

PAPER_TOP1: Dict[str, Dict[str, float]] = {
    "rmt_t": {"in1k": 82.4},
    "rmt_s": {"in1k": 84.1, "tl_in1k": 84.8},
    "rmt_b": {"in1k": 85.0, "tl_in1k": 85.6},
    "rmt_l": {"in1k": 85.5, "tl_in1k": 86.1},
}
"""ImageNet-1k top-1 (%) reported by the paper and the official repository, per weight tag."""


def _register_cpu_attention() -> None:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    if op in flop_counter.flop_registry or torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in \
            flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention()


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (trainable ones only by default, as the paper counts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: Sequence[int] = (224, 224), batch_size: int = 1,
               in_chans: Optional[int] = None) -> int:
    """Multiply-accumulates of one eval forward pass over ``batch_size`` images of ``img_size``."""
    in_chans = in_chans or getattr(model, "in_chans", 3)
    param = next(model.parameters())
    x = torch.zeros(batch_size, in_chans, *img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with flop_counter.FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_facts(name: str, img_size: Sequence[int] = (224, 224), **kwargs) -> Dict[str, object]:
    """``{"model", "params", "gflops", "img_size"}`` for a variant name (``rmt_s``, ``rmt_s.tl_in1k``).

    ``gflops`` is GMACs (the paper's convention). The model is built on the meta device, so this is
    fast and allocates nothing, whatever the size.
    """
    from ..models.factory import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return dict(model=name, params=count_params(model), gflops=count_macs(model, img_size) / 1e9,
                img_size=list(img_size))


def variants_table() -> list[dict]:
    """One row per registered weight tag: params, GFLOPs at 224 and the paper's top-1."""
    from ..models.factory import list_models

    rows = []
    for name in list_models(pretrained_tags=True):
        base, tag = name.split(".")
        facts = model_facts(name)
        rows.append(dict(model=name, params=facts["params"], gflops=facts["gflops"],
                         top1=PAPER_TOP1.get(base, {}).get(tag)))
    return rows
