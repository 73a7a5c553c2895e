"""Named layouts: ``Config`` values for nuclei (the CLI's default and the built-in model) and COCO.

Each takes field changes on top (``nuclei_config(fpn_channels=64)``).
"""

from __future__ import annotations

from typing import Any

from .config import Config


def nuclei_config(**changes: Any) -> Config:
    """The CLI's default: a small ResNet-18 model for small objects (anchors from 8 px, as the
    spec's DSB2018 setup) that trains on a laptop CPU in minutes."""
    values: dict[str, Any] = dict(
        backbone="resnet18", fpn_channels=128, rpn_head_channels=128, rcnn_fc_channels=512,
        mask_head_channels=128, rcnn_train_batch_size=64, mask_train_batch_size=32,
        rpn_test_post_nms_top_k=3000)  # dense images: 1000+ nuclei need more than 1000 proposals
    values.update(changes)
    return Config(**values)


def builtin_config(**changes: Any) -> Config:
    """The built-in ``nuclei`` model's layout, and what ``maskrcnn train`` builds by default.

    ``nuclei_config`` with the spec's own DSB2018 layout, p2 at stride 2 (nuclei of 6-12 px cover
    3-6 p2 cells instead of 1.5-3; it trains on 128 x 128 crops, as cheap as 256 x 256 at stride
    4), heads at half width, a ResNet-18 trunk at half width (a quarter of its weights: the file
    fits in git) and one input channel (fluorescence is one channel; RGB input is averaged).
    """
    values: dict[str, Any] = dict(
        rpn_scales=[2, 4, 8, 16], trunk_width=32, in_channels=1, pixel_mean=[0.25], pixel_std=[0.25],
        fpn_channels=64, rpn_head_channels=64, rcnn_fc_channels=256, mask_head_channels=64,
        rcnn_train_batch_size=32, mask_train_batch_size=16)
    values.update(changes)
    return nuclei_config(**values)


def coco_config(**changes: Any) -> Config:
    """COCO-sized objects: ResNet-50-FPN with anchors of 32 to 256 px."""
    values: dict[str, Any] = dict(
        backbone="resnet50", rpn_base_sizes=[32, 64, 128, 256], rcnn_train_batch_size=256,
        rcnn_train_fg_fraction=0.25, rcnn_test_nms_pre_score_threshold=0.05,
        mask_test_nms_pre_score_threshold=0.05, mask_test_nms_overlap_threshold=0.5,
        rcnn_test_max_detections=100, rpn_test_post_nms_top_k=1000)
    values.update(changes)
    return Config(**values)
