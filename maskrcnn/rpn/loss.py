"""RPN loss: weighted focal cross-entropy on objectness, weighted smooth-L1 on foreground deltas."""

from __future__ import annotations

from torch import Tensor

from ..losses import weighted_focal_cross_entropy, weighted_smooth_l1
from .targets import RpnTargets


def rpn_loss(logits: Tensor, deltas: Tensor, targets: RpnTargets, gamma: float,
             sigma: float) -> tuple[Tensor, Tensor]:
    """logits (B, N, 2), deltas (B, N, 2, 4) -> (classification loss, regression loss).

    Only the foreground slot of the deltas is trained; background anchors have no box.
    """
    # float32 whatever the autocast dtype: 65k-term sums lose too much in half precision.
    cls = weighted_focal_cross_entropy(logits.float(), targets.labels, targets.label_weights, gamma)
    reg = weighted_smooth_l1(deltas[:, :, 1].float(), targets.deltas, targets.delta_weights, sigma)
    return cls, reg
