"""Loss functions shared by the heads (the spec's weighted focal CE and weighted smooth-L1).

Every head's loss is a mean over images of a per-image loss, each image normalised by its own
weights (its own anchors, samples or pixels): loss = (1/B) * sum_i loss_i. The loss of a batch
is then the mean of the losses of any split of it into equal parts, which is what
DistributedDataParallel's gradient average computes: B images on one process and B/N images on
each of N processes train alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_cross_entropy(logits: Tensor, labels: Tensor, gamma: float) -> Tensor:
    """Per-element focal cross-entropy: logits (..., K), labels (...) -> (...)."""
    log_p = F.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return -((1.0 - log_p.exp()) ** gamma) * log_p


def smooth_l1(predicted: Tensor, target: Tensor, sigma: float) -> Tensor:
    """Smooth-L1 summed over the last axis: (..., 4) -> (...). The quadratic zone is |d| < 1/sigma^2."""
    # With beta = 1/sigma^2 torch's smooth-L1 is the spec's: 0.5 sigma^2 d^2, else |d| - 0.5/sigma^2.
    return F.smooth_l1_loss(predicted, target, beta=1.0 / sigma**2, reduction="none").sum(dim=-1)


def mean_over_images(loss: Tensor, weights: Tensor, image: Tensor | None = None,
                     num_images: int | None = None) -> Tensor:
    """(1/B) * sum_i [sum_{s in i} w_s loss_s / sum_{s in i} w_s]; an image of zero weight adds 0.

    Either loss and weights are (B, ...) with one image per row (``image`` None), or they are
    flat (S,) with ``image`` (S,) the image of each element and ``num_images`` = B.
    """
    if image is None:
        numerator = (weights * loss).flatten(1).sum(dim=1)
        denominator = weights.flatten(1).sum(dim=1)
    else:
        numerator = loss.new_zeros(num_images).index_add_(0, image, weights * loss)
        denominator = loss.new_zeros(num_images).index_add_(0, image, weights.to(loss.dtype))
    return (numerator / denominator.clamp(min=1e-12)).sum() / numerator.shape[0]


def image_index(per_image: list[Tensor], device: torch.device) -> Tensor:
    """The image of each row of ``torch.cat(per_image)``: (S,) int64 on ``device``."""
    counts = torch.tensor([len(t) for t in per_image], device=device)
    return torch.repeat_interleave(torch.arange(len(per_image), device=device), counts)


def zero_loss(*tensors: Tensor) -> Tensor:
    """A zero that stays connected to the graph (so every parameter gets a gradient, as DDP needs)."""
    return sum(t.sum() * 0.0 for t in tensors)
