"""Matching boxes to truth and sampling training boxes: what the RCNN and mask targets draw from.

Boxes are ``xyxy`` float tensors in input pixels, shape (..., 4).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .boxes import is_large_enough


def match_boxes(boxes: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Best truth box of each box. boxes (R, 4), truth (G, 4), G >= 1 -> IoU (R,), index (R,)."""
    iou = box_iou(boxes, truth)
    return iou.max(dim=1)


def sample_indices(candidates: Tensor, count: int, generator: torch.Generator | None = None,
                   weights: Tensor | None = None) -> Tensor:
    """``count`` entries of the 1-D ``candidates``: without replacement when there are enough, with
    replacement when there are too few (so a head always trains on a fixed-size batch).

    ``weights`` (same length, > 0) makes the draw proportional to them instead of uniform.
    """
    n = candidates.numel()
    if count <= 0 or n == 0:
        return candidates[:0]
    device = candidates.device
    if weights is not None:
        pick = torch.multinomial(weights.detach().to("cpu", torch.float64), count, replacement=n < count,
                                 generator=generator).to(device)
    elif n >= count:
        pick = torch.randperm(n, generator=generator, device="cpu")[:count].to(device)
    else:
        pick = torch.randint(n, (count,), generator=generator, device="cpu").to(device)
    return candidates[pick]


def per_instance_weights(assign: Tensor) -> Tensor:
    """(F,) truth index of each foreground candidate -> (F,) weights 1 / (candidates of that truth).

    Drawing with these weights picks every instance about equally often: a large nucleus covered
    by dozens of overlapping proposals no longer crowds the small ones (one or two) out of the sample.
    """
    return 1.0 / torch.bincount(assign)[assign].float()


def sample_balanced(fg: Tensor, bg: Tensor, batch_size: int, fg_fraction: float,
                    generator: torch.Generator | None = None, fg_weights: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """The spec's balanced sampling of foreground/background indices to exactly ``batch_size``.

    With both kinds present: up to ``round(fg_fraction * batch_size)`` foregrounds (no repeats) and
    backgrounds for the rest (repeated when too few). With one kind only, all ``batch_size`` come
    from it. With neither, both are empty. ``fg_weights`` weighs the foreground draw.
    """
    if fg.numel() and bg.numel():
        num_fg = min(int(round(fg_fraction * batch_size)), fg.numel())
        return (sample_indices(fg, num_fg, generator, fg_weights),
                sample_indices(bg, batch_size - num_fg, generator))
    if fg.numel():
        return sample_indices(fg, batch_size, generator, fg_weights), bg
    return fg, sample_indices(bg, batch_size, generator)


def candidates_with_truth(proposals: Tensor, truth: Tensor, min_size: float) -> Tensor:
    """Proposals (R, 4) plus the truth boxes (G, 4), boxes smaller than ``min_size`` dropped.

    Adding the truth boxes gives the heads perfect positives from the first step on, before the
    RPN proposes anything.
    """
    boxes = torch.cat([proposals, truth.to(proposals)])
    return boxes[is_large_enough(boxes, min_size)]
