"""Mask post-processing: keep each mask's largest component, mask-IoU NMS, paste into the image.

Shape shorthand: D detections of one image, M mask size, (H, W) the image.
Masks stay (D, M, M) in their boxes until pasted; pasting runs in chunks of bounded size, so no
step holds D full-image masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from ...components import component_labels

# Pixels a pasting chunk may cover (chunk instances x window area): about 64 MB of float32.
PASTE_CHUNK_PIXELS = 1 << 24
PAIR_CHUNK = 8192


def largest_component(binary: Tensor) -> Tensor:
    """(D, M, M) bool -> the same with only each mask's largest 8-connected component (of equal
    sizes, the one whose largest pixel index is smaller)."""
    d, m, _ = binary.shape
    if d == 0:
        return binary
    flat = component_labels(binary).reshape(d, -1)
    sizes = torch.zeros(d, m * m + 1, device=binary.device).scatter_add_(1, flat, binary.reshape(d, -1).float())
    sizes[:, 0] = 0
    return (flat == sizes.argmax(dim=1, keepdim=True)).reshape(d, m, m) & binary


def _cell_area(boxes: Tensor, m: int) -> Tensor:
    """Image area (D,) of one of the M x M mask cells of each box."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (m * m)


def mask_areas(binary: Tensor, boxes: Tensor) -> Tensor:
    """Areas in image pixels of (D, M, M) box-frame masks with boxes (D, 4) -> (D,)."""
    return binary.flatten(1).sum(dim=1) * _cell_area(boxes, binary.shape[-1])


def _cell_centres(boxes: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Image coordinates (P, M) of the x and y centres of each box's M x M mask cells."""
    steps = (torch.arange(m, device=boxes.device, dtype=boxes.dtype) + 0.5) / m
    xs = boxes[:, 0, None] + steps * (boxes[:, 2] - boxes[:, 0])[:, None]
    ys = boxes[:, 1, None] + steps * (boxes[:, 3] - boxes[:, 1])[:, None]
    return xs, ys


def _sample_in_box(masks: Tensor, boxes: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Values of (P, M, M) box-frame masks at image points xs (P, X), ys (P, Y) -> (P, Y, X).

    Points outside a mask's box read 0.
    """
    u = (xs - boxes[:, 0, None]) / (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)[:, None] * 2 - 1
    v = (ys - boxes[:, 1, None]) / (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)
    values = F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (u.abs() <= 1)[:, None, :] & (v.abs() <= 1)[:, :, None]
    return values[:, 0] * inside


def overlapping_mask_iou(binary: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mask IoU of every pair (i, j), j < i, whose boxes overlap.

    binary (D, M, M) bool in box frames, boxes (D, 4) -> (i (P,), j (P,), IoU (P,)). The
    intersection is counted on i's mask grid, with j's mask sampled there.
    """
    overlap = torch.tril(box_iou(boxes, boxes) > 0, diagonal=-1)
    i, j = torch.nonzero(overlap, as_tuple=True)
    areas = mask_areas(binary, boxes)
    masks = binary.float()
    m = binary.shape[-1]
    ious = []
    for start in range(0, i.numel(), PAIR_CHUNK):
        a, b = i[start:start + PAIR_CHUNK], j[start:start + PAIR_CHUNK]
        xs, ys = _cell_centres(boxes[a], m)
        other = _sample_in_box(masks[b], boxes[b], xs, ys) >= 0.5
        cells = (other & binary[a]).flatten(1).sum(dim=1)
        inter = cells * _cell_area(boxes[a], m)
        ious.append(inter / (areas[a] + areas[b] - inter).clamp(min=1e-6))
    iou = torch.cat(ious) if ious else boxes.new_zeros(0)
    return i, j, iou


def mask_nms(binary: Tensor, boxes: Tensor, threshold: float) -> Tensor:
    """Greedy mask-IoU NMS of masks sorted by descending score -> (D,) bool keep.

    Solved as a fixed point (Cluster-NMS): a mask is kept when no kept higher-scoring mask
    overlaps it by more than ``threshold``. Iterating from "all kept" reaches the greedy answer in
    as many rounds as the longest suppression chain, each round one vectorized step.
    """
    d = binary.shape[0]
    keep = torch.ones(d, dtype=torch.bool, device=binary.device)
    i, j, iou = overlapping_mask_iou(binary, boxes)
    i, j = i[iou > threshold], j[iou > threshold]
    for _ in range(d):
        suppressed = torch.zeros(d, dtype=torch.int32, device=binary.device)
        suppressed.scatter_reduce_(0, i, keep[j].int(), reduce="amax")
        new_keep = suppressed == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _pixel_windows(boxes: Tensor, height: int, width: int) -> Tensor:
    """Integer pixel windows (D, 4) x0, y0, x1, y1 covering each box, clipped to the image."""
    lo = boxes[:, :2].floor().clamp(min=0)
    hi = boxes[:, 2:].ceil()
    hi = torch.minimum(hi, torch.tensor([width, height], device=boxes.device, dtype=boxes.dtype))
    return torch.cat([lo, torch.maximum(hi, lo)], dim=1).long()


def paste_chunks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float):
    """Paste (D, M, M) box-frame probabilities into the image, a bounded chunk at a time.

    Yields (rows (n,), windows (n, 4), masks (n, h, w) bool) where masks[k] is row rows[k]'s mask
    over the image pixels windows[k, :2] + (0..h, 0..w), False beyond its own window.
    """
    windows = _pixel_windows(boxes, height, width)
    extent = (windows[:, 2:] - windows[:, :2]).amax(dim=1).clamp(min=1)
    order = torch.argsort(extent)
    # Size classes within a factor of two, so a chunk's window wastes at most 3/4 of its pixels.
    size_class = torch.log2(extent[order].float()).ceil().long()
    for cls in torch.unique(size_class).tolist():
        rows_of_class = order[size_class == cls]
        side = int(extent[rows_of_class[-1]])
        for rows in rows_of_class.split(max(1, PASTE_CHUNK_PIXELS // side**2)):
            win = windows[rows]
            steps = torch.arange(side, device=boxes.device, dtype=boxes.dtype) + 0.5
            xs, ys = win[:, 0, None] + steps, win[:, 1, None] + steps              # pixel centres
            values = _sample_in_box(probs[rows].float(), boxes[rows], xs, ys)
            within = ((steps[None] < (win[:, 2] - win[:, 0])[:, None])[:, None, :]
                      & (steps[None] < (win[:, 3] - win[:, 1])[:, None])[:, :, None])
            yield rows, win, (values > threshold) & within


def paste_label_image(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """(D, M, M) masks sorted by descending score -> (H, W) int32 label image, row d has id d + 1.

    Where masks overlap, the higher-scoring one owns the pixel.
    """
    d = probs.shape[0]
    owner = torch.zeros(height * width, dtype=torch.int64, device=probs.device)
    for rows, win, masks in paste_chunks(probs, boxes, height, width, threshold):
        k, y, x = torch.nonzero(masks, as_tuple=True)
        pixel = (win[k, 1] + y) * width + (win[k, 0] + x)
        owner.scatter_reduce_(0, pixel, d - rows[k], reduce="amax")  # higher score = larger priority
    labels = torch.where(owner > 0, d - owner + 1, 0)
    return labels.reshape(height, width).to(torch.int32)


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """Full-image masks (D, H, W) bool: for a few instances only (it holds D full masks)."""
    out = torch.zeros(probs.shape[0], height, width, dtype=torch.bool, device=probs.device)
    for rows, win, masks in paste_chunks(probs, boxes, height, width, threshold):
        for r, (x0, y0, x1, y1), mask in zip(rows.tolist(), win.tolist(), masks):
            out[r, y0:y1, x0:x1] = mask[: y1 - y0, : x1 - x0]
    return out
