"""Mask targets: foreground proposals, each truth instance cropped by its proposal's box and
resized to ``mask_size`` (one gather from the truth masks for all instances)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...config import Config
from ...structures import Proposals, Target
from ..sampling import candidates_with_truth, match_boxes, per_instance_weights, sample_indices


@dataclass
class MaskTargets:
    proposals: list[Tensor]  # B tensors (S_b, 4): sampled foreground boxes of each image
    labels: Tensor           # (S,) int64 class of each box's truth instance
    masks: Tensor            # (S, M, M) float in {0, 1}


def crop_masks(masks: Tensor, index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop instance ``index[s]`` of masks (G, H, W) by boxes[s] and resize -> (S, size, size) {0, 1}.

    Each of the size x size cells of a box reads the mask pixel under its centre (pixel i covers
    [i, i + 1); outside the image reads 0): the pixels' outline rasterised on the cell grid, so a
    box tight on an instance gives ones up to its edges however small it is. (Bilinear RoIAlign
    and a 0.5 threshold cut the corners off instances upsampled more than about 3x.) Only S x
    size x size values are read, whatever the image size.
    """
    if index.numel() == 0:
        return boxes.new_zeros(0, size, size)
    height, width = masks.shape[-2:]
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs = (boxes[:, 0, None] + steps * (boxes[:, 2] - boxes[:, 0])[:, None]).floor().long()  # (S, size)
    ys = (boxes[:, 1, None] + steps * (boxes[:, 3] - boxes[:, 1])[:, None]).floor().long()
    inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
    values = masks[index[:, None, None], ys.clamp(0, height - 1)[:, :, None], xs.clamp(0, width - 1)[:, None, :]]
    return (values.bool() & inside).to(boxes.dtype)


@torch.no_grad()
def make_mask_targets(proposals: list[Proposals], targets: list[Target], cfg: Config,
                      generators: list[torch.Generator | None] | None = None) -> MaskTargets:
    """Sample ``mask_train_batch_size`` foreground boxes per image (repeating when too few), each
    image with its own generator (default: one from each target's seed)."""
    if generators is None:
        generators = [t.sampling_generator() for t in targets]
    per_image = [_sample_image(p, t, cfg, g) for p, t, g in zip(proposals, targets, generators)]
    boxes, labels, masks = zip(*per_image)
    return MaskTargets(proposals=list(boxes), labels=torch.cat(labels), masks=torch.cat(masks))


def _sample_image(props: Proposals, target: Target, cfg: Config,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """One image's sampled boxes (S, 4), labels (S,) and mask targets (S, M, M)."""
    candidates = candidates_with_truth(props.boxes, target.boxes, cfg.mask_train_min_size)
    if len(target) == 0:  # no instance: no mask to learn
        return candidates[:0], target.labels[:0], candidates.new_zeros(0, cfg.mask_size, cfg.mask_size)
    iou, assign = match_boxes(candidates, target.boxes.to(candidates))
    fg = torch.nonzero(iou >= cfg.mask_train_fg_thresh_low).squeeze(1)
    weights = per_instance_weights(assign[fg]) if cfg.train_sample_per_instance else None
    fg = sample_indices(fg, cfg.mask_train_batch_size, generator, weights)
    masks = crop_masks(target.masks.to(candidates.device), assign[fg], candidates[fg], cfg.mask_size)
    return candidates[fg], target.labels.to(fg.device)[assign[fg]], masks
