"""MaskRCNN: backbone -> RPN -> RoIAlign -> RCNN -> mask, as in the spec's figures.

Shape shorthand: B images, N anchors, R proposals, S sampled boxes, D detections, K classes,
M mask size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .losses import zero_loss
from .config import Config
from .mask.head import MaskHead
from .mask.loss import mask_loss
from .mask.targets import make_mask_targets
from .rcnn.detections import make_detections
from .rcnn.head import RcnnHead
from .rcnn.loss import rcnn_loss
from .rcnn.targets import make_rcnn_targets
from .mask.postprocess import make_instance_result
from .roi_align import MultiLevelRoiAlign
from .rpn.anchors import AnchorGenerator
from .rpn.head import RpnMultiHead
from .rpn.loss import rpn_loss
from .rpn.proposals import make_proposals
from .rpn.targets import make_rpn_targets
from .structures import Detections, InstanceResult, Losses, ModelOutput, Proposals, Target

SIZE_DIVISOR = 32  # the coarsest FPN stride: padded inputs keep every level's grid aligned


class MaskRCNN(nn.Module):
    """``model(images, targets=None) -> ModelOutput``.

    images: a (B, C, H, W) float tensor or a list of (C, H, W) tensors of any sizes, values in
    [0, 1] (see ``maskrcnn.data.normalize``). In training mode ``targets`` (one Target per image)
    is required and the output holds the five losses; in eval mode it holds one InstanceResult per
    image, at that image's own size.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.anchors = AnchorGenerator(cfg)
        self.rpn = RpnMultiHead(cfg, self.backbone.out_channels)
        self.rcnn_crop = MultiLevelRoiAlign(cfg.rpn_base_sizes, cfg.rpn_scales, cfg.rcnn_crop_size)
        self.rcnn = RcnnHead(cfg, self.backbone.out_channels)
        self.mask_crop = MultiLevelRoiAlign(cfg.rpn_base_sizes, cfg.rpn_scales, cfg.mask_crop_size)
        self.mask = MaskHead(cfg, self.backbone.out_channels)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).reshape(-1, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor | list[Tensor], targets: list[Target] | None = None) -> ModelOutput:
        if not self.training:
            with torch.no_grad():  # results are thresholded masks: nothing to differentiate
                return ModelOutput(results=self._detect(*self._features(images)))
        features, anchors, logits, deltas, sizes = self._features(images)
        if targets is None or len(targets) != len(sizes):
            raise ValueError("training needs one Target per image")
        targets = [t.to(logits.device) for t in targets]
        return ModelOutput(losses=self._losses(features, anchors, logits, deltas, sizes, targets))

    def _features(self, images: Tensor | list[Tensor]):
        """Backbone and RPN head: (features, anchors (N, 4), logits (B, N, 2), deltas (B, N, 2, 4), sizes)."""
        batch, sizes = self.prepare(images)
        features = self.backbone(batch)
        logits, deltas = self.rpn(features)
        anchors = self.anchors([tuple(f.shape[-2:]) for f in features], batch.device)
        return features, anchors, logits, deltas, sizes

    def prepare(self, images: Tensor | list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad to a multiple of 32 -> (B, C, H', W') and the original sizes."""
        if isinstance(images, Tensor) and images.dim() == 3:
            images = images[None]
        if len(images) == 0:
            raise ValueError("no images given")
        device = self.pixel_mean.device
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        height = -(-max(h for h, _ in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
        width = -(-max(w for _, w in sizes) // SIZE_DIVISOR) * SIZE_DIVISOR
        channels = self.cfg.in_channels
        batch = torch.zeros(len(images), channels, height, width, device=device)
        for i, (image, (h, w)) in enumerate(zip(images, sizes)):
            if image.dim() != 3 or image.shape[0] != channels:
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; the model expects ({channels}, H, W)")
            batch[i, :, :h, :w] = (image.to(device, torch.float32) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    # ----------------------------------------------------------------------------------------
    def _proposals(self, anchors: Tensor, logits: Tensor, deltas: Tensor,
                   sizes: list[tuple[int, int]]) -> list[Proposals]:
        cfg = self.cfg
        if self.training:  # looser thresholds: more proposals to sample RCNN and mask targets from
            settings = dict(score_threshold=cfg.rpn_train_nms_pre_score_threshold,
                            nms_threshold=cfg.rpn_train_nms_overlap_threshold, min_size=cfg.rpn_train_nms_min_size,
                            pre_nms_top_k=cfg.rpn_train_pre_nms_top_k, post_nms_top_k=cfg.rpn_train_post_nms_top_k)
        else:
            settings = dict(score_threshold=cfg.rpn_test_nms_pre_score_threshold,
                            nms_threshold=cfg.rpn_test_nms_overlap_threshold, min_size=cfg.rpn_test_nms_min_size,
                            pre_nms_top_k=cfg.rpn_test_pre_nms_top_k, post_nms_top_k=cfg.rpn_test_post_nms_top_k)
        # float32 under autocast too: NMS needs boxes and scores of one dtype, and these are targets
        return make_proposals(anchors, logits.detach().float(), deltas.detach().float(), sizes, **settings)

    def _losses(self, features: list[Tensor], anchors: Tensor, logits: Tensor, deltas: Tensor,
                sizes: list[tuple[int, int]], targets: list[Target]) -> Losses:
        cfg = self.cfg
        rpn_targets = make_rpn_targets(anchors, [t.boxes for t in targets], cfg.rpn_train_fg_thresh_low,
                                       cfg.rpn_train_bg_thresh_high)
        rpn_cls, rpn_reg = rpn_loss(logits, deltas, rpn_targets, cfg.rpn_focal_gamma, cfg.rpn_delta_sigma)
        proposals = self._proposals(anchors, logits, deltas, sizes)
        # One generator per image, from its Target's seed: an image samples the same boxes in a
        # batch of any size on any process (DDP then trains as one process on the global batch).
        generators = [t.sampling_generator() for t in targets]

        rcnn_targets = make_rcnn_targets(proposals, targets, cfg, generators)
        rcnn_logits, rcnn_deltas = self.rcnn(self.rcnn_crop(features, rcnn_targets.proposals))
        rcnn_cls, rcnn_reg = rcnn_loss(rcnn_logits, rcnn_deltas, rcnn_targets)

        mask_targets = make_mask_targets(proposals, targets, cfg, generators)
        if mask_targets.labels.numel():
            mask_logits = self.mask(self.mask_crop(features, mask_targets.proposals))
            loss_mask = mask_loss(mask_logits, mask_targets)
        else:  # no instance in the batch; batch norm cannot run on an empty batch
            loss_mask = zero_loss(*self.mask.parameters())
        return Losses(rpn_cls, rpn_reg, rcnn_cls, rcnn_reg, loss_mask)

    def _detect(self, features: list[Tensor], anchors: Tensor, logits: Tensor, deltas: Tensor,
                sizes: list[tuple[int, int]]) -> list[InstanceResult]:
        cfg = self.cfg
        proposals = [p.boxes for p in self._proposals(anchors, logits, deltas, sizes)]
        rcnn_logits, rcnn_deltas = self.rcnn(self.rcnn_crop(features, proposals))
        detections = make_detections(
            proposals, rcnn_logits, rcnn_deltas, sizes, box_weights=cfg.rcnn_box_weights,
            score_threshold=cfg.rcnn_test_nms_pre_score_threshold,
            nms_threshold=cfg.rcnn_test_nms_overlap_threshold, min_size=cfg.rcnn_test_nms_min_size,
            max_detections=cfg.rcnn_test_max_detections)
        probs = self._mask_probs(features, detections)
        return [make_instance_result(d, p, size, cfg) for d, p, size in zip(detections, probs, sizes)]

    def _mask_probs(self, features: list[Tensor], detections: list[Detections]) -> list[Tensor]:
        """Each detection's mask probabilities for its own class: B tensors (D_b, M, M)."""
        labels = torch.cat([d.labels for d in detections])
        if labels.numel() == 0:
            empty = features[0].new_zeros(0, self.cfg.mask_size, self.cfg.mask_size)
            return [empty for _ in detections]
        logits = self.mask(self.mask_crop(features, [d.boxes for d in detections]))
        probs = torch.sigmoid(logits[torch.arange(labels.numel(), device=labels.device), labels])
        return list(probs.split([len(d) for d in detections]))
