"""Typed records that cross stage boundaries.

Shape shorthand used across the package: B images, N anchors, G truth instances, R proposals,
K classes (background included), M mask size, D detections.
Boxes are ``xyxy`` float in input pixels; label 0 is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth of one image.

    boxes: (G, 4) float xyxy; labels: (G,) int64 in 1..K-1; masks: (G, H, W) bool or uint8.
    seed: the image's own seed for the training-time sampling of RCNN and mask boxes, so that an
    image is sampled alike whatever batch and process it lands in (``InstanceDataset`` derives it
    from (seed, epoch, index)); None draws from torch's global RNG.
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor
    seed: int | None = None

    def __post_init__(self) -> None:
        g = self.boxes.shape[0]
        if self.boxes.shape != (g, 4) or self.labels.shape != (g,) or self.masks.shape[0] != g:
            raise ValueError(f"Target: boxes {tuple(self.boxes.shape)}, labels {tuple(self.labels.shape)} "
                             f"and masks {tuple(self.masks.shape)} disagree on the instance count")

    @classmethod
    def from_masks(cls, masks: Tensor, labels: Tensor | None = None, seed: int | None = None) -> "Target":
        """Build a target from (G, H, W) instance masks; boxes are the masks' tight extents."""
        masks = masks.bool()
        if labels is None:
            labels = torch.ones(masks.shape[0], dtype=torch.int64, device=masks.device)
        return cls(boxes=masks_to_boxes(masks), labels=labels.long(), masks=masks, seed=seed)

    def to(self, device: torch.device | str) -> "Target":
        return Target(self.boxes.to(device), self.labels.to(device), self.masks.to(device), self.seed)

    def sampling_generator(self) -> torch.Generator | None:
        """A fresh CPU generator from ``seed`` (None without one: torch's global RNG is used)."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return self.boxes.shape[0]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(G, H, W) bool -> (G, 4) float xyxy boxes enclosing each mask (pixel edges, so x1 = last+1)."""
    g, h, w = masks.shape
    if g == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows = masks.any(dim=2)  # (G, H)
    cols = masks.any(dim=1)  # (G, W)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


@dataclass
class Proposals:
    """RPN proposals of one image: boxes (R, 4) xyxy and foreground scores (R,)."""

    boxes: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]
