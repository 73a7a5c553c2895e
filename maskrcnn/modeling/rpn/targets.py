"""RPN targets: which anchors are foreground, their weights and their regression targets.

Shape shorthand: B images, N anchors, G truth boxes (the most of any image in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from ..boxes import rpn_encode


@dataclass
class RpnTargets:
    labels: Tensor          # (B, N) int64: 1 foreground, 0 background
    label_weights: Tensor   # (B, N) float: 0 for "don't care" anchors, bg weights balance the classes
    deltas: Tensor          # (B, N, 4) spec-coded regression targets (zero where not foreground)
    delta_weights: Tensor   # (B, N) float: 1 on foreground anchors


@torch.no_grad()
def make_rpn_targets(anchors: Tensor, truth_boxes: list[Tensor], fg_thresh_low: float,
                     bg_thresh_high: float) -> RpnTargets:
    """Label anchors against each image's truth boxes, all images at once.

    An anchor is foreground when its best IoU is >= ``fg_thresh_low``, or when it is (one of, ties
    included) the best anchors of some truth box, however low that IoU; background when its best
    IoU is < ``bg_thresh_high``; ignored otherwise. Background weights are num_fg / num_bg per image,
    so both classes weigh the same in the loss.

    anchors (N, 4); truth_boxes: B tensors (G_b, 4).
    """
    batch, n = len(truth_boxes), anchors.shape[0]
    device = anchors.device
    truth = pad_sequence([t.to(anchors) for t in truth_boxes], batch_first=True)  # (B, G, 4)
    g = truth.shape[1]
    if g == 0:
        fg = torch.zeros(batch, n, dtype=torch.bool, device=device)
        max_iou = torch.zeros(batch, n, device=device)
        matched = torch.zeros(batch, n, 4, device=device)
    else:
        valid = torch.arange(g, device=device)[None] < torch.tensor(
            [len(t) for t in truth_boxes], device=device)[:, None]                 # (B, G)
        iou = box_iou(anchors, truth.reshape(-1, 4)).reshape(n, batch, g).permute(1, 0, 2)
        iou = iou.masked_fill(~valid[:, None, :], -1.0)                           # (B, N, G)
        max_iou, assign = iou.max(dim=2)
        best_of_truth = iou.amax(dim=1, keepdim=True)                              # (B, 1, G)
        claims = (iou == best_of_truth) & (best_of_truth > 0)                      # (B, N, G)
        claimed = claims.any(dim=2)
        assign = torch.where(claimed, claims.to(torch.uint8).argmax(dim=2), assign)
        fg = (max_iou >= fg_thresh_low) | claimed
        matched = truth.gather(1, assign[..., None].expand(-1, -1, 4))
    bg = (max_iou < bg_thresh_high) & ~fg
    num_fg = fg.sum(dim=1, keepdim=True).clamp(min=1)
    num_bg = bg.sum(dim=1, keepdim=True).clamp(min=1)
    label_weights = fg.float() + bg.float() * (num_fg / num_bg)
    deltas = torch.where(fg[..., None], rpn_encode(anchors.expand(batch, -1, -1), matched), 0.0)
    return RpnTargets(labels=fg.long(), label_weights=label_weights, deltas=deltas,
                      delta_weights=fg.float())
