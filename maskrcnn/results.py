"""What the model returns: named losses in training, one InstanceResult per image in eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Config
from .mask.paste import largest_component, mask_areas, mask_nms, paste_label_image, paste_masks
from .rcnn.detections import Detections


@dataclass
class Losses:
    rpn_cls: Tensor
    rpn_reg: Tensor
    rcnn_cls: Tensor
    rcnn_reg: Tensor
    mask: Tensor

    @property
    def total(self) -> Tensor:
        return self.rpn_cls + self.rpn_reg + self.rcnn_cls + self.rcnn_reg + self.mask

    def as_floats(self) -> dict[str, float]:
        """Plain numbers for logs and progress bars (one device sync)."""
        names = ["rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask"]
        values = torch.stack([getattr(self, n).detach().float() for n in names]).tolist()
        return dict(zip(names, values))


@dataclass
class InstanceResult:
    """Instances found in one image, sorted by descending score.

    boxes (K, 4) xyxy, scores (K,), labels (K,) int64, mask_probs (K, M, M): each instance's mask
    probabilities in its box frame (the memory-bounded form; ``mask(i)`` pastes one), and
    label_image (H, W) int32 where instance i has id i + 1 and the higher score wins overlaps.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_probs: Tensor
    label_image: Tensor
    mask_threshold: float = 0.5

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.label_image.shape)

    def mask(self, i: int) -> Tensor:
        """Instance i's full-image mask (H, W) bool."""
        h, w = self.image_size
        return paste_masks(self.mask_probs[i:i + 1], self.boxes[i:i + 1], h, w, self.mask_threshold)[0]

    def to(self, device: torch.device | str) -> "InstanceResult":
        return InstanceResult(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                              self.mask_probs.to(device), self.label_image.to(device), self.mask_threshold)


@dataclass
class ModelOutput:
    """The model's one return type: ``losses`` in training mode, ``results`` in eval mode."""

    losses: Losses | None = None
    results: list[InstanceResult] | None = None


def make_instance_result(detections: Detections, probs: Tensor, image_size: tuple[int, int],
                         cfg: Config) -> InstanceResult:
    """Finish one image: detections (D) with their class's mask probabilities (D, M, M).

    Keeps detections above ``mask_test_nms_pre_score_threshold``, reduces each mask to its
    largest component, drops masks under ``mask_test_mask_min_area`` pixels, suppresses masks
    overlapping a better one by more than ``mask_test_nms_overlap_threshold`` (mask IoU), and
    paints the label image.
    """
    order = torch.argsort(detections.scores, descending=True)
    order = order[detections.scores[order] > cfg.mask_test_nms_pre_score_threshold]
    boxes, scores, labels, probs = detections.boxes[order], detections.scores[order], \
        detections.labels[order], probs[order]
    binary = largest_component(probs > cfg.mask_test_mask_threshold)
    areas = mask_areas(binary, boxes)
    keep = (areas > 0) & (areas >= cfg.mask_test_mask_min_area)
    boxes, scores, labels, probs, binary = boxes[keep], scores[keep], labels[keep], probs[keep], binary[keep]
    keep = mask_nms(binary, boxes, cfg.mask_test_nms_overlap_threshold)
    boxes, scores, labels, binary = boxes[keep], scores[keep], labels[keep], binary[keep]
    probs = probs[keep] * binary  # the discarded components must not reappear when pasting
    label_image = paste_label_image(probs, boxes, *image_size, cfg.mask_test_mask_threshold)
    return InstanceResult(boxes, scores, labels, probs, label_image, cfg.mask_test_mask_threshold)
