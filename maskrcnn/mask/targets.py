"""Mask targets: foreground proposals, each truth instance cropped by its proposal's box and
resized to ``mask_size`` (RoIAlign on the truth masks: one call for all instances)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..boxes import candidates_with_truth, match_boxes, sample_indices
from ..config import Config
from ..structures import Proposals, Target


@dataclass
class MaskTargets:
    proposals: list[Tensor]  # B tensors (S_b, 4): sampled foreground boxes of each image
    labels: Tensor           # (S,) int64 class of each box's truth instance
    masks: Tensor            # (S, M, M) float in {0, 1}


def crop_masks(masks: Tensor, index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop instance ``index[s]`` of masks (G, H, W) by boxes[s] and resize -> (S, size, size) {0, 1}.

    Only the instances actually sampled are converted to float, to bound memory on dense images.
    """
    if index.numel() == 0:
        return boxes.new_zeros(0, size, size)
    used, inverse = torch.unique(index, return_inverse=True)
    source = masks[used].to(boxes.dtype)[:, None]                                    # (U, 1, H, W)
    rois = torch.cat([inverse[:, None].to(boxes.dtype), boxes], dim=1)
    # aligned=True: mask pixel i covers [i, i + 1), so its centre is at i + 0.5.
    crops = roi_align(source, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return (crops[:, 0] >= 0.5).to(boxes.dtype)


@torch.no_grad()
def make_mask_targets(proposals: list[Proposals], targets: list[Target], cfg: Config) -> MaskTargets:
    """Sample ``mask_train_batch_size`` foreground boxes per image (repeating when too few)."""
    per_image = [_sample_image(props, target, cfg) for props, target in zip(proposals, targets)]
    boxes, labels, masks = zip(*per_image)
    return MaskTargets(proposals=list(boxes), labels=torch.cat(labels), masks=torch.cat(masks))


def _sample_image(props: Proposals, target: Target, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
    """One image's sampled boxes (S, 4), labels (S,) and mask targets (S, M, M)."""
    candidates = candidates_with_truth(props.boxes, target.boxes, cfg.mask_train_min_size)
    if len(target) == 0:  # no instance: no mask to learn
        return candidates[:0], target.labels[:0], candidates.new_zeros(0, cfg.mask_size, cfg.mask_size)
    iou, assign = match_boxes(candidates, target.boxes.to(candidates))
    fg = sample_indices(torch.nonzero(iou >= cfg.mask_train_fg_thresh_low).squeeze(1), cfg.mask_train_batch_size)
    masks = crop_masks(target.masks.to(candidates.device), assign[fg], candidates[fg], cfg.mask_size)
    return candidates[fg], target.labels.to(fg.device)[assign[fg]], masks
