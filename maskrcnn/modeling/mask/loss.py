"""Mask loss: binary cross-entropy on the mask of each box's true class only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import image_index, mean_over_images, zero_loss
from .targets import MaskTargets


def mask_loss(logits: Tensor, targets: MaskTargets) -> Tensor:
    """logits (S, K, M, M) -> per-pixel BCE of the true class's channel against (S, M, M),
    averaged over each image's boxes and pixels, then over the images (see ``maskrcnn.modeling.losses``)."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    picked = logits[torch.arange(logits.shape[0], device=logits.device), targets.labels]
    per_box = F.binary_cross_entropy_with_logits(picked.float(), targets.masks, reduction="none").mean(dim=(1, 2))
    image = image_index(targets.proposals, per_box.device)
    return mean_over_images(per_box, torch.ones_like(per_box), image, len(targets.proposals))
