"""Box primitives shared by the stages: the two box codings, clipping, filtering, matching, sampling.

Boxes are ``xyxy`` float tensors in input pixels, shape (..., 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

# exp() of a log-size delta is clamped so that an untrained head cannot overflow the decode.
_LOG_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def rpn_encode(anchors: Tensor, boxes: Tensor) -> Tensor:
    """The spec's RPN coding: each edge relative to the anchor centre, over the anchor size.

    anchors, boxes: (..., 4) -> (..., 4) deltas. The left/top edges are negated, so a box equal to
    its anchor encodes as (0.5, 0.5, 0.5, 0.5).
    """
    cx, cy, w, h = _centre_size(anchors)
    centre = torch.stack([cx, cy, cx, cy], dim=-1)
    size = torch.stack([w, h, w, h], dim=-1)
    sign = boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])
    return (boxes - centre) / size * sign


def rpn_decode(anchors: Tensor, deltas: Tensor) -> Tensor:
    """Inverse of :func:`rpn_encode`: (..., 4) anchors and deltas -> (..., 4) boxes."""
    cx, cy, w, h = _centre_size(anchors)
    centre = torch.stack([cx, cy, cx, cy], dim=-1)
    size = torch.stack([w, h, w, h], dim=-1)
    sign = deltas.new_tensor([-1.0, -1.0, 1.0, 1.0])
    return deltas * sign * size + centre


def rcnn_encode(proposals: Tensor, boxes: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """(dx, dy, log dw, log dh) of ``boxes`` relative to ``proposals``, scaled by ``weights``."""
    pcx, pcy, pw, ph = _centre_size(proposals)
    bcx, bcy, bw, bh = _centre_size(boxes)
    wx, wy, ww, wh = weights
    return torch.stack([
        wx * (bcx - pcx) / pw,
        wy * (bcy - pcy) / ph,
        ww * torch.log(bw / pw),
        wh * torch.log(bh / ph),
    ], dim=-1)


def rcnn_decode(proposals: Tensor, deltas: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Inverse of :func:`rcnn_encode`, with the log sizes clamped. proposals (..., 4), deltas (..., 4)."""
    pcx, pcy, pw, ph = _centre_size(proposals)
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=_LOG_SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=_LOG_SCALE_CLAMP)
    cx, cy = pcx + dx * pw, pcy + dy * ph
    w, h = pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, height: Tensor | int, width: Tensor | int) -> Tensor:
    """Clip (..., 4) boxes to [0, width] x [0, height]; sizes may be per-box tensors (...,)."""
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    if isinstance(width, Tensor):
        x = torch.minimum(x, width.to(x.dtype).unsqueeze(-1))
        y = torch.minimum(y, height.to(y.dtype).unsqueeze(-1))
    else:
        x = x.clamp(max=width)
        y = y.clamp(max=height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def is_large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """(..., 4) -> (...,) bool: both sides at least ``min_size`` pixels."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


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


def first_k_per_image(image_index: Tensor, k: int) -> Tensor:
    """Indices that keep at most the first ``k`` entries of each image, order otherwise preserved.

    image_index (R,) is the image of each entry, entries already in priority order (e.g. by score)
    -> (R',) indices into it, grouped by image.
    """
    order = torch.argsort(image_index, stable=True)
    grouped = image_index[order]
    counts = torch.bincount(grouped)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(grouped.numel(), device=grouped.device) - starts[grouped]
    return order[rank < k]


def split_by_image(image_index: Tensor, num_images: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Split tensors grouped by ``image_index`` (sorted) into one tuple per image."""
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    parts = [t.split(counts) for t in tensors]
    return [tuple(p[i] for p in parts) for i in range(num_images)]


def candidates_with_truth(proposals: Tensor, truth: Tensor, min_size: float) -> Tensor:
    """Proposals (R, 4) plus the truth boxes (G, 4), boxes smaller than ``min_size`` dropped.

    Adding the truth boxes gives the heads perfect positives from the first step on, before the
    RPN proposes anything.
    """
    boxes = torch.cat([proposals, truth.to(proposals)])
    return boxes[is_large_enough(boxes, min_size)]
