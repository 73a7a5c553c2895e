"""Loss functions shared by the heads (the spec's weighted focal CE and weighted smooth-L1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def weighted_focal_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor, gamma: float) -> Tensor:
    """Focal cross-entropy, sum(w * loss) / sum(w). logits (..., K), labels (...), weights (...)."""
    log_p = F.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    return (weights * loss).sum() / weights.sum().clamp(min=1e-12)


def weighted_smooth_l1(predicted: Tensor, target: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """Smooth-L1 summed over the last axis, sum(w * loss) / sum(w). The quadratic zone is |d| < 1/sigma^2."""
    # With beta = 1/sigma^2 torch's smooth-L1 is the spec's: 0.5 sigma^2 d^2, else |d| - 0.5/sigma^2.
    loss = F.smooth_l1_loss(predicted, target, beta=1.0 / sigma**2, reduction="none").sum(dim=-1)
    return (weights * loss).sum() / weights.sum().clamp(min=1e-12)


def zero_loss(*tensors: Tensor) -> Tensor:
    """A zero that stays connected to the graph (so every parameter gets a gradient, as DDP needs)."""
    return sum(t.sum() * 0.0 for t in tensors)
