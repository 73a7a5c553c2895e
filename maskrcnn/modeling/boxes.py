"""Box operations shared by the stages: the two box codings, clipping and filtering, and the
per-image selection over a flat batch (NMS grouped by image, top-k per image, splitting).

Boxes are ``xyxy`` float tensors in input pixels, shape (..., 4). Inference keeps a batch flat:
(R, 4) boxes with an (R,) image index, grouped by image; see docs/design.md. Everything on that
path traces for any image size (no Python decisions on tensor values), so the exported graph runs
this very code.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor
from torchvision.ops import nms

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


def top_k(n: Tensor | int, k: int) -> Tensor | int:
    """min(n, k) for ``topk``; while tracing ``n`` is a shape value and must stay one (not a constant)."""
    return torch.clamp(n, max=k) if isinstance(n, Tensor) else min(n, k)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
    """NMS within each group: boxes (R, 4), scores (R,), groups (R,) int -> kept indices by score.

    Eagerly this is torchvision's ``batched_nms``. While tracing it is its coordinate trick (what
    torchvision runs for up to 4000 boxes) without torchvision's empty-input branch, which a trace
    would freeze: the largest coordinate is taken with a 0 beside the boxes, so no boxes is not a
    special case (boxes are clipped, so >= 0).
    """
    if not torch.jit.is_tracing():
        return torchvision.ops.batched_nms(boxes, scores, groups, threshold)
    largest = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = groups.to(boxes) * (largest + 1)
    return nms(boxes + offsets[:, None], scores, threshold)


def first_k_per_image(image_index: Tensor, k: int, num_images: Tensor | int | None = None) -> Tensor:
    """Indices that keep at most the first ``k`` entries of each image, order otherwise preserved.

    image_index (R,) is the image of each entry, entries already in priority order (e.g. by score)
    -> (R',) indices into it, grouped by image. ``num_images`` defaults to the largest index + 1.
    Written with ops that trace and export to ONNX (cumsum and sort, no bincount).
    """
    if num_images is None:
        num_images = int(image_index.max()) + 1 if image_index.numel() else 0
    same = (image_index[:, None] == torch.arange(num_images, device=image_index.device)[None]).long()  # (R, B)
    rank = (same.cumsum(dim=0) * same).sum(dim=1) - 1          # earlier entries of the same image
    keep = torch.nonzero(rank < k).squeeze(1)
    # grouped by image, priority order within each: the keys are unique, so any sort is stable
    return keep[torch.argsort(image_index[keep] * image_index.shape[0] + keep)]


def split_by_image(image_index: Tensor, num_images: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Split tensors grouped by ``image_index`` (sorted) into one tuple per image."""
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    parts = [t.split(counts) for t in tensors]
    return [tuple(p[i] for p in parts) for i in range(num_images)]


