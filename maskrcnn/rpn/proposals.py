"""RPN proposals: score, decode, clip, drop small boxes and NMS, for all images at once."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..boxes import clip_boxes, first_k_per_image, is_large_enough, rpn_decode, split_by_image
from ..structures import Proposals


@torch.no_grad()
def make_proposals(anchors: Tensor, logits: Tensor, deltas: Tensor, image_sizes: list[tuple[int, int]], *,
                   score_threshold: float, nms_threshold: float, min_size: float, pre_nms_top_k: int,
                   post_nms_top_k: int) -> list[Proposals]:
    """anchors (N, 4), logits (B, N, 2), deltas (B, N, 2, 4), image_sizes [(H, W)] -> B Proposals.

    The ``pre_nms_top_k`` best-scoring anchors of each image above ``score_threshold`` are decoded,
    clipped to their image, filtered by ``min_size`` and suppressed at ``nms_threshold``; each image
    keeps its ``post_nms_top_k`` best, sorted by score.
    """
    batch, n = logits.shape[:2]
    scores = logits.softmax(dim=-1)[..., 1]                                        # (B, N)
    top_scores, top = scores.topk(min(pre_nms_top_k, n), dim=1)                    # (B, k)
    fg_deltas = deltas[:, :, 1].gather(1, top[..., None].expand(-1, -1, 4))
    boxes = rpn_decode(anchors[top], fg_deltas)                                    # (B, k, 4)
    sizes = torch.tensor(image_sizes, device=logits.device, dtype=boxes.dtype)     # (B, 2)
    boxes = clip_boxes(boxes, sizes[:, 0, None].expand_as(top_scores), sizes[:, 1, None].expand_as(top_scores))
    keep = (top_scores > score_threshold) & is_large_enough(boxes, min_size)
    image = torch.arange(batch, device=logits.device)[:, None].expand_as(top_scores)
    boxes, scores, image = boxes[keep], top_scores[keep], image[keep]
    kept = batched_nms(boxes, scores, image, nms_threshold)                         # score order
    kept = kept[first_k_per_image(image[kept], post_nms_top_k)]
    return [Proposals(b, s) for b, s in split_by_image(image[kept], batch, boxes[kept], scores[kept])]
