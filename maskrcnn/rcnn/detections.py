"""RCNN detections: per-class decode, clip, threshold and NMS, all images at once."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..boxes import clip_boxes, first_k_per_image, is_large_enough, rcnn_decode, split_by_image
from ..structures import Detections


@torch.no_grad()
def make_detections(proposals: list[Tensor], logits: Tensor, deltas: Tensor,
                    image_sizes: list[tuple[int, int]], *, box_weights: tuple[float, float, float, float],
                    score_threshold: float, nms_threshold: float, min_size: float,
                    max_detections: int) -> list[Detections]:
    """proposals: B tensors (R_b, 4); logits (R, K); deltas (R, K, 4) -> B Detections.

    Each proposal gives one candidate per foreground class (its class-specific box); candidates
    above ``score_threshold`` are suppressed per image and class at ``nms_threshold``.
    """
    batch, num_classes = len(proposals), logits.shape[1]
    device = logits.device
    counts = torch.tensor([p.shape[0] for p in proposals], device=device)
    image = torch.repeat_interleave(torch.arange(batch, device=device), counts)        # (R,)
    boxes = rcnn_decode(torch.cat(proposals)[:, None], deltas, box_weights)[:, 1:]     # (R, K-1, 4)
    sizes = torch.tensor(image_sizes, device=device, dtype=boxes.dtype)[image]          # (R, 2)
    boxes = clip_boxes(boxes, sizes[:, None, 0].expand(-1, num_classes - 1),
                       sizes[:, None, 1].expand(-1, num_classes - 1))
    scores = logits.softmax(dim=1)[:, 1:]
    labels = torch.arange(1, num_classes, device=device).expand_as(scores)
    image = image[:, None].expand_as(scores)
    keep = (scores > score_threshold) & is_large_enough(boxes, min_size)
    boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
    kept = batched_nms(boxes, scores, image * num_classes + labels, nms_threshold)
    kept = kept[first_k_per_image(image[kept], max_detections)]
    return [Detections(*parts) for parts in
            split_by_image(image[kept], batch, boxes[kept], scores[kept], labels[kept])]
