"""The mask stage's last step: detections and their mask probabilities -> one InstanceResult.

Runs per image, outside the exported graph (its connected-component loop iterates until stable),
so eager, tiled and exported models all finish here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...config import Config
from ...structures import Detections, InstanceResult
from .paste import largest_component, mask_areas, mask_nms, paste_label_image


def make_instance_result(detections: Detections, probs: Tensor, image_size: tuple[int, int],
                         cfg: Config) -> InstanceResult:
    """Finish one image: detections (D) with their class's mask probabilities (D, M, M).

    Keeps detections above ``mask_test_nms_pre_score_threshold``, reduces each mask to its
    largest component, drops masks under ``mask_test_mask_min_area`` pixels, then
    :func:`assemble_result` suppresses overlapping masks and paints the label image.
    """
    order = torch.argsort(detections.scores, descending=True)
    order = order[detections.scores[order] > cfg.mask_test_nms_pre_score_threshold]
    boxes, scores, labels = detections.boxes[order], detections.scores[order], detections.labels[order]
    probs = probs[order]
    binary = largest_component(probs > cfg.mask_test_mask_threshold)
    areas = mask_areas(binary, boxes)
    keep = (areas > 0) & (areas >= cfg.mask_test_mask_min_area)
    return assemble_result(boxes[keep], scores[keep], labels[keep], probs[keep], binary[keep], image_size, cfg)


def assemble_result(boxes: Tensor, scores: Tensor, labels: Tensor, probs: Tensor, binary: Tensor,
                    image_size: tuple[int, int], cfg: Config) -> InstanceResult:
    """Mask-IoU NMS over instances sorted by descending score, then the label image.

    boxes (D, 4), scores (D,), labels (D,), probs (D, M, M) and their binary masks (D, M, M).
    """
    keep = mask_nms(binary, boxes, cfg.mask_test_nms_overlap_threshold)
    boxes, scores, labels, binary = boxes[keep], scores[keep], labels[keep], binary[keep]
    probs = probs[keep] * binary  # the discarded components must not reappear when pasting
    label_image = paste_label_image(probs, boxes, *image_size, cfg.mask_test_mask_threshold)
    # An instance hidden entirely behind better ones is dropped, so that ids run 1..K without gaps.
    visible = torch.bincount(label_image.flatten().long(), minlength=len(boxes) + 1)[1:] > 0
    new_ids = torch.cat([visible.new_zeros(1, dtype=torch.int32), torch.cumsum(visible, 0, dtype=torch.int32)])
    label_image = new_ids[label_image.long()]
    return InstanceResult(boxes[visible], scores[visible], labels[visible], probs[visible], label_image,
                          cfg.mask_test_mask_threshold)
