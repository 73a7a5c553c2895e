"""RCNN loss: cross-entropy over classes, smooth-L1 on the true class's deltas of foregrounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import weighted_smooth_l1, zero_loss
from .targets import RcnnTargets


def rcnn_loss(logits: Tensor, deltas: Tensor, targets: RcnnTargets) -> tuple[Tensor, Tensor]:
    """logits (S, K), deltas (S, K, 4) -> (classification loss, regression loss averaged over fg)."""
    if logits.shape[0] == 0:
        zero = zero_loss(logits, deltas)
        return zero, zero
    logits, deltas = logits.float(), deltas.float()
    cls = F.cross_entropy(logits, targets.labels)
    class_deltas = deltas[torch.arange(deltas.shape[0], device=deltas.device), targets.labels]
    reg = weighted_smooth_l1(class_deltas, targets.deltas, (targets.labels > 0).float(), sigma=1.0)
    return cls, reg
