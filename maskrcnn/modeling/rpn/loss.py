"""RPN loss: weighted focal cross-entropy on objectness, weighted smooth-L1 on foreground deltas."""

from __future__ import annotations

from torch import Tensor

from ..losses import focal_cross_entropy, mean_over_images, smooth_l1
from .targets import RpnTargets


def rpn_loss(logits: Tensor, deltas: Tensor, targets: RpnTargets, gamma: float,
             sigma: float) -> tuple[Tensor, Tensor]:
    """logits (B, N, 2), deltas (B, N, 2, 4) -> (classification loss, regression loss).

    Each image's loss is normalised by its own weights (the sum of its anchors' weights; its
    foreground count for the deltas), then averaged over the images (see ``maskrcnn.modeling.losses``).
    Only the foreground slot of the deltas is trained; background anchors have no box.
    """
    # float32 whatever the autocast dtype: 65k-term sums lose too much in half precision.
    cls = mean_over_images(focal_cross_entropy(logits.float(), targets.labels, gamma), targets.label_weights)
    reg = mean_over_images(smooth_l1(deltas[:, :, 1].float(), targets.deltas, sigma), targets.delta_weights)
    return cls, reg
