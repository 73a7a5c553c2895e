"""``mask_test_min_contrast``: instances fainter than the image's background plus that share of the
way to its objects' level are dropped (0, the default: none are).

Why: the built-in nuclei model also outlines faint blobs at or near the background's level (its
synthetic training scenes label dim out-of-focus nuclei), which annotators of real images leave
out (docs/experiments.md, "Faint detections"). The two levels come from the image, not from the
detections, so that whole, tiled and streamed prediction drop the same instances: the central
window the diameter estimate reads (maskrcnn.prediction.diameter), smoothed and split at Otsu's
level; the background is the median below it, the objects' level the median above. An instance's
intensity is the mean, over its pixels in the label image, of the image's channels averaged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..structures import InstanceResult
from .diameter import SAMPLE_SIDE, central_window, otsu_threshold, smoothed

NO_FLOOR = -math.inf  # keeps every instance


def contrast_floor(image: Tensor, share: float) -> float:
    """A normalised image (C, H, W) in [0, 1] -> the mean intensity an instance needs to be kept
    (NO_FLOOR when ``share`` is 0 or its window holds a single level)."""
    if share <= 0:
        return NO_FLOOR
    smooth = smoothed(central_window(image, SAMPLE_SIDE).mean(0))
    cut = otsu_threshold(smooth)
    low, high = smooth[smooth <= cut], smooth[smooth > cut]
    if not low.numel() or not high.numel():
        return NO_FLOOR
    background = float(low.median())
    return background + share * (float(high.median()) - background)


def drop_faint(result: InstanceResult, image: Tensor, floor: float) -> InstanceResult:
    """``result`` without its instances whose mean intensity in ``image`` (C, H, W, the result's
    frame) is under ``floor``; the label image's ids run 1..K again."""
    if floor == NO_FLOOR or len(result) == 0:
        return result
    ids = result.label_image.long().flatten()
    sums = torch.bincount(ids, weights=image.float().mean(0).flatten(), minlength=len(result) + 1)[1:]
    counts = torch.bincount(ids, minlength=len(result) + 1)[1:]
    keep = sums >= floor * counts
    if bool(keep.all()):
        return result
    new_ids = torch.cat([keep.new_zeros(1, dtype=torch.int32), torch.cumsum(keep, 0, dtype=torch.int32)])
    new_ids[1:][~keep] = 0
    return InstanceResult(result.boxes[keep], result.scores[keep], result.labels[keep], result.mask_probs[keep],
                          new_ids[result.label_image.long()], result.mask_threshold)
