"""The RPN stage: head, anchors, proposals and, in training, targets and losses."""

from __future__ import annotations

from torch import Tensor, nn

from ...config import Config
from ...structures import BatchDetections, Target
from .anchors import AnchorGenerator
from .head import RpnMultiHead
from .loss import rpn_loss
from .proposals import make_proposals
from .targets import make_rpn_targets


class RpnStage(nn.Module):
    """``forward(features, image_sizes, targets=None) -> (proposals, losses)``.

    features: L tensors (B, C, H_l, W_l), p2 first; image_sizes (B, 2) int (H, W) of each image
    before padding. proposals: the batch's proposals (training or test NMS settings by mode);
    losses: (objectness, box regression) when ``targets`` are given, else None.
    """

    def __init__(self, cfg: Config, in_channels: int) -> None:
        super().__init__()
        self.head = RpnMultiHead(cfg, in_channels)
        self.anchors = AnchorGenerator(cfg)
        self.train_nms, self.test_nms = cfg.rpn_nms(training=True), cfg.rpn_nms(training=False)
        self.fg_thresh_low, self.bg_thresh_high = cfg.rpn_train_fg_thresh_low, cfg.rpn_train_bg_thresh_high
        self.focal_gamma, self.delta_sigma = cfg.rpn_focal_gamma, cfg.rpn_delta_sigma

    def forward(self, features: list[Tensor], image_sizes: Tensor, targets: list[Target] | None = None
                ) -> tuple[BatchDetections, tuple[Tensor, Tensor] | None]:
        logits, deltas = self.head(features)                                   # (B, N, 2), (B, N, 2, 4)
        anchors = self.anchors([f.shape[-2:] for f in features], features[0].device)  # (N, 4)
        # float32 under autocast too: NMS needs boxes and scores of one dtype, and these are targets
        proposals = make_proposals(anchors, logits.detach().float(), deltas.detach().float(), image_sizes,
                                   self.train_nms if self.training else self.test_nms)
        if targets is None:
            return proposals, None
        rpn_targets = make_rpn_targets(anchors, [t.boxes for t in targets], self.fg_thresh_low,
                                       self.bg_thresh_high)
        return proposals, rpn_loss(logits, deltas, rpn_targets, self.focal_gamma, self.delta_sigma)
