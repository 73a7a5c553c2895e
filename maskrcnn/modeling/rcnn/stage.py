"""The RCNN stage: RoIAlign crops of the proposals, the box head, detections and, in training,
sampled targets and losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import Config
from ...structures import BatchDetections, Target
from ..roi_align import MultiLevelRoiAlign
from .detections import make_detections
from .head import RcnnHead
from .loss import rcnn_loss
from .targets import make_rcnn_targets


class RcnnStage(nn.Module):
    """``forward(features, image_sizes, proposals, targets=None, generators=None) -> (detections, losses)``.

    Inference (no targets): detections of the batch, losses None. Training: each image's boxes
    are sampled from its proposals (with its own generator, see ``Target.sampling_generator``),
    detections None, losses (classification, box regression).
    """

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg  # the samplers read their settings from it
        self.head = RcnnHead(cfg, in_channels)
        self.crop = MultiLevelRoiAlign(cfg.rpn_base_sizes, cfg.rpn_scales, cfg.rcnn_crop_size)
        self.test_nms = cfg.rcnn_nms()

    def forward(self, features: list[Tensor], image_sizes: Tensor, proposals: BatchDetections,
                targets: list[Target] | None = None, generators: list[torch.Generator | None] | None = None
                ) -> tuple[BatchDetections | None, tuple[Tensor, Tensor] | None]:
        if targets is None:
            # the head runs on the crops in RoIAlign's level order; its outputs are reordered
            crops, order = self.crop.crop_level_order(features, proposals.boxes, proposals.image)
            logits, deltas = self.head(crops)
            restore = torch.argsort(order)
            # float32 from here on under autocast too: box decoding, scores and NMS
            return make_detections(proposals, logits[restore].float(), deltas[restore].float(), image_sizes,
                                   self.cfg.rcnn_box_weights, self.test_nms), None
        samples = make_rcnn_targets(proposals.proposals(len(targets)), targets, self.cfg, generators)
        logits, deltas = self.head(self.crop(features, samples.proposals))
        return None, rcnn_loss(logits, deltas, samples, self.cfg.rcnn_delta_sigma)
