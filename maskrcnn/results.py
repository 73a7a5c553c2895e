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
