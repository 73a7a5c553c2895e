"""The mask stage: RoIAlign crops of the detections, the per-class mask head, and in training
sampled targets and the loss. ``results`` finishes each image (see ``postprocess``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import Config
from ...structures import BatchDetections, InstanceResult, Target
from ..losses import zero_loss
from ..roi_align import MultiLevelRoiAlign
from .head import MaskHead
from .loss import mask_loss
from .postprocess import make_instance_result
from .targets import make_mask_targets


class MaskStage(nn.Module):
    """``forward(features, image_sizes, boxes, targets=None, generators=None) -> (mask_probs, loss)``.

    Inference (no targets): ``boxes`` are the detections; mask_probs (D, M, M) is each detection's
    mask probabilities for its own class, loss None. Training: ``boxes`` are the proposals, each
    image samples its foreground boxes (own generator), mask_probs None, loss the mask BCE.
    """

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg  # the sampler and the post-processing read their settings from it
        self.head = MaskHead(cfg, in_channels)
        self.crop = MultiLevelRoiAlign(cfg.rpn_base_sizes, cfg.rpn_scales, cfg.mask_crop_size)

    def forward(self, features: list[Tensor], image_sizes: Tensor, boxes: BatchDetections,
                targets: list[Target] | None = None, generators: list[torch.Generator | None] | None = None
                ) -> tuple[Tensor | None, Tensor | None]:
        if targets is None:
            return self.mask_probs(features, boxes), None
        samples = make_mask_targets(boxes.proposals(len(targets)), targets, self.cfg, generators)
        if samples.labels.numel() == 0:  # no instance in the batch; batch norm cannot run on an empty batch
            return None, zero_loss(*self.head.parameters())
        return None, mask_loss(self.head(self.crop(features, samples.proposals)), samples)

    def mask_probs(self, features: list[Tensor], detections: BatchDetections) -> Tensor:
        """Each detection's mask probabilities for its own class: (D, M, M)."""
        m = self.cfg.mask_size
        # the head runs on the crops in RoIAlign's level order; its (D, M, M) output is reordered
        crops, order = self.crop.crop_level_order(features, detections.boxes, detections.image)
        logits = self.head(crops)   # (D, K, M, M), detection order[i] in row i
        own = logits.gather(1, detections.labels[order].reshape(-1, 1, 1, 1).expand(-1, 1, m, m))[:, 0]
        # float32 under autocast too (thresholds and pasting), in the detections' order
        return torch.sigmoid(own.float())[torch.argsort(order)]

    def results(self, detections: BatchDetections, mask_probs: Tensor,
                image_sizes: list[tuple[int, int]]) -> list[InstanceResult]:
        """One InstanceResult per image (eager, outside any exported graph: see ``postprocess``)."""
        per_image = detections.per_image(len(image_sizes))
        probs = mask_probs.split([len(d) for d in per_image])
        return [make_instance_result(d, p, size, self.cfg) for d, p, size in zip(per_image, probs, image_sizes)]
