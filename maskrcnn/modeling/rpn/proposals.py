"""RPN proposals: score, decode, clip, drop small boxes and NMS, for all images at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ...config import NmsSettings
from ...structures import BatchDetections
from ..boxes import batched_nms, clip_boxes, first_k_per_image, is_large_enough, rpn_decode, top_k


@torch.no_grad()
def make_proposals(anchors: Tensor, logits: Tensor, deltas: Tensor, image_sizes: Tensor,
                   settings: NmsSettings) -> BatchDetections:
    """anchors (N, 4), logits (B, N, 2), deltas (B, N, 2, 4), image_sizes (B, 2) (H, W) -> proposals.

    The ``settings.pre_top_k`` best-scoring anchors of each image above the score threshold are
    decoded, clipped to their image, filtered by size and suppressed per image; each image keeps
    its ``settings.max_per_image`` best, sorted by score (labels are all 1, foreground).
    """
    batch, n = logits.shape[0], logits.shape[1]
    scores = logits.softmax(dim=-1)[..., 1]                                        # (B, N)
    top_scores, top = scores.topk(top_k(n, settings.pre_top_k), dim=1)             # (B, k)
    fg_deltas = deltas[:, :, 1].gather(1, top[..., None].expand(-1, -1, 4))
    boxes = rpn_decode(anchors[top], fg_deltas)                                    # (B, k, 4)
    sizes = image_sizes.to(boxes.dtype)                                            # (B, 2)
    boxes = clip_boxes(boxes, sizes[:, 0, None].expand_as(top_scores), sizes[:, 1, None].expand_as(top_scores))
    keep = (top_scores > settings.score_threshold) & is_large_enough(boxes, settings.min_size)
    image = torch.arange(batch, device=logits.device)[:, None].expand_as(top_scores)
    boxes, scores, image = boxes[keep], top_scores[keep], image[keep]
    kept = batched_nms(boxes, scores, image, settings.overlap_threshold)          # score order
    kept = kept[first_k_per_image(image[kept], settings.max_per_image, batch)]
    return BatchDetections(boxes[kept], scores[kept], torch.ones_like(image[kept]), image[kept])
