"""The token-labelling loss (the other losses come from timm)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.token_label import token_targets

__all__ = ["TokenLabelLoss", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class TokenLabelLoss(nn.Module):
    """``cls_weight * CE(logits, class target) + dense_weight * CE(aux logits, token targets)``.

    Inputs are the model's training output ``(logits, aux_logits (B, N, K), box)`` and the batch's
    dense teacher logits ``(B, K, g, g)``. MixToken replaced the box's tokens with those of the
    flipped batch, so the class target is mixed by the box's area; the aux logits were flipped
    back inside the model, so the token targets need no mixing.
    """

    def __init__(self, dense_weight: float = 0.5, cls_weight: float = 1.0, smoothing: float = 0.0):
        super().__init__()
        self.dense_weight, self.cls_weight, self.smoothing = dense_weight, cls_weight, smoothing

    def forward(self, outputs: Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int, int]],
                dense: torch.Tensor) -> torch.Tensor:
        logits, aux, (r0, c0, r1, c1) = outputs
        cls_target, token_target = token_targets(dense, self.smoothing)
        if token_target.shape[1] != aux.shape[1]:
            raise ValueError(f"token labels have {token_target.shape[1]} positions, the model {aux.shape[1]}")
        lam = 1.0 - (r1 - r0) * (c1 - c0) / aux.shape[1]
        if lam < 1.0:
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        cls_loss = soft_cross_entropy(logits, cls_target)
        dense_loss = soft_cross_entropy(aux.reshape(-1, aux.shape[-1]), token_target.reshape(-1, aux.shape[-1]))
        return self.cls_weight * cls_loss + self.dense_weight * dense_loss
