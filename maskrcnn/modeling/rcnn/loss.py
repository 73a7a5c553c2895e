"""RCNN loss: cross-entropy over classes, smooth-L1 on the true class's deltas of foregrounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import image_index, mean_over_images, smooth_l1, zero_loss
from .targets import RcnnTargets


def rcnn_loss(logits: Tensor, deltas: Tensor, targets: RcnnTargets, sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits (S, K), deltas (S, K, 4) -> (classification loss, regression loss).

    Per image: cross-entropy averaged over its sampled boxes, smooth-L1 over its foregrounds;
    then the mean over the images (see ``maskrcnn.modeling.losses``).
    """
    if logits.shape[0] == 0:
        zero = zero_loss(logits, deltas)
        return zero, zero
    logits, deltas = logits.float(), deltas.float()
    image, num_images = image_index(targets.proposals, logits.device), len(targets.proposals)
    cls = mean_over_images(F.cross_entropy(logits, targets.labels, reduction="none"),
                           torch.ones_like(logits[:, 0]), image, num_images)
    class_deltas = deltas[torch.arange(deltas.shape[0], device=deltas.device), targets.labels]
    reg = mean_over_images(smooth_l1(class_deltas, targets.deltas, sigma), (targets.labels > 0).float(),
                           image, num_images)
    return cls, reg
