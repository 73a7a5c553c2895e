"""RCNN detections: per-class decode, clip, threshold and NMS, all images at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ...config import NmsSettings
from ...structures import BatchDetections
from ..boxes import batched_nms, clip_boxes, first_k_per_image, is_large_enough, rcnn_decode


@torch.no_grad()
def make_detections(proposals: BatchDetections, logits: Tensor, deltas: Tensor, image_sizes: Tensor,
                    box_weights: tuple[float, float, float, float], settings: NmsSettings) -> BatchDetections:
    """proposals (R rows), logits (R, K), deltas (R, K, 4), image_sizes (B, 2) (H, W) -> detections.

    Each proposal gives one candidate per foreground class (its class-specific box); candidates
    above the score threshold are suppressed per image and class, and each image keeps its
    ``settings.max_per_image`` best, sorted by score.
    """
    num_images, num_classes = image_sizes.shape[0], logits.shape[1]
    boxes = rcnn_decode(proposals.boxes[:, None], deltas, box_weights)[:, 1:]       # (R, K-1, 4)
    scores = logits.softmax(dim=1)[:, 1:]                                           # (R, K-1)
    sizes = image_sizes.to(boxes.dtype)[proposals.image]                            # (R, 2)
    boxes = clip_boxes(boxes, sizes[:, None, 0].expand_as(scores), sizes[:, None, 1].expand_as(scores))
    labels = torch.arange(1, num_classes, device=logits.device).expand_as(scores)
    image = proposals.image[:, None].expand_as(scores)
    keep = (scores > settings.score_threshold) & is_large_enough(boxes, settings.min_size)
    boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
    kept = batched_nms(boxes, scores, image * num_classes + labels, settings.overlap_threshold)
    kept = kept[first_k_per_image(image[kept], settings.max_per_image, num_images)]
    return BatchDetections(boxes[kept], scores[kept], labels[kept], image[kept])
