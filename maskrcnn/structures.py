"""Typed records that cross stage boundaries, and the ``Detector`` protocol.

This module is the bottom of the package: it imports none of the stages. See docs/design.md for
the data flow. Shape shorthand used across the package: B images, N anchors, G truth instances,
R proposals, K classes (background included), M mask size, D detections.
Boxes are ``xyxy`` float in input pixels; label 0 is background; batches are per-image lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .config import Config
from .modeling.boxes import split_by_image


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


@dataclass
class Detections:
    """Boxes found in one image, sorted by score: boxes (D, 4), scores (D,), labels (D,) int64."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass
class BatchDetections:
    """Boxes of a whole batch, flat: what inference passes from stage to stage (and what traces).

    boxes (R, 4), scores (R,), labels (R,) int64 (1, foreground, for RPN proposals) and image
    (R,) int64, the image of each row; rows are grouped by image, by descending score within one.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image: Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def per_image(self, num_images: int) -> list[Detections]:
        """One Detections per image (eager only: the split sizes are read from the data)."""
        return [Detections(*part) for part in
                split_by_image(self.image, num_images, self.boxes, self.scores, self.labels)]

    def proposals(self, num_images: int) -> list[Proposals]:
        """One Proposals per image, for the training-time samplers."""
        return [Proposals(d.boxes, d.scores) for d in self.per_image(num_images)]


LOSS_NAMES = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask")


@dataclass
class Losses:
    """The five training losses, each a scalar tensor (a mean over images, see ``maskrcnn.modeling.losses``)."""

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
        values = torch.stack([getattr(self, n).detach().float() for n in LOSS_NAMES]).tolist()
        return dict(zip(LOSS_NAMES, values))


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
        # imported here, not at the top: this module stays below the stages (see module doc)
        from .modeling.mask.paste import paste_masks

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


@runtime_checkable
class Detector(Protocol):
    """What prediction, evaluation and tiling accept: ``MaskRCNN`` and an exported model alike.

    ``detector(images).results`` gives one InstanceResult per image, for a (C, H, W) or
    (B, C, H, W) tensor or a list of (C, H, W) tensors with values in [0, 1]; ``cfg`` holds the
    class names and the thresholds that tiled prediction re-applies when it stitches tiles.
    """

    cfg: Config
    training: bool

    def __call__(self, images: Tensor | list[Tensor]) -> ModelOutput: ...

    def eval(self) -> "Detector": ...

    def train(self, mode: bool = True) -> "Detector": ...
