"""Mask loss: binary cross-entropy on the mask of each box's true class only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import zero_loss
from .targets import MaskTargets


def mask_loss(logits: Tensor, targets: MaskTargets) -> Tensor:
    """logits (S, K, M, M) -> mean per-pixel BCE of the true class's channel against (S, M, M)."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    picked = logits[torch.arange(logits.shape[0], device=logits.device), targets.labels]
    return F.binary_cross_entropy_with_logits(picked.float(), targets.masks)
