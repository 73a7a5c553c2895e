"""One image through a Detector, whole or in tiles: what prediction, evaluation and validation call.

A Detector is ``MaskRCNN`` or a model from ``maskrcnn export`` (see ``maskrcnn.structures``);
both take the same normalised image and return the same InstanceResult. Around that one call:

- ``scale``: the image is resized by this factor first (``--scale``/``--diameter``: nuclei of
  another size than the model was trained on), and the instances are mapped back. Masks live in
  their boxes' frames, so mapping back divides the boxes and repaints the label image at the
  original size: nothing is resampled twice.
- ``tta``: test-time augmentation over the 8 flips and quarter turns (the dihedral group: an
  optional transpose, then optional flips). Each pass's instances are mapped back to the original
  frame and merged before the mask NMS: each cluster of overlapping instances is scored by its
  mean over the passes (:func:`_voted_scores`), then the one mask NMS keeps its best mask.
- ``tile``: the image is processed in overlapping tiles (maskrcnn/prediction/tiling.py), each tile as above.
- ``floor``: each image or tile then drops its instances fainter than the model's
  ``mask_test_min_contrast`` asks, against levels read from the whole image (maskrcnn.prediction.contrast).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.mask.paste import mask_nms, overlapping_mask_iou
from ..modeling.mask.postprocess import assemble_result
from ..runtime.precision import autocast
from ..structures import Detector, InstanceResult
from .contrast import contrast_floor, drop_faint
from .tiling import TILE_OVERLAP, predict_tiled

# (transpose, flip left-right, flip top-bottom) for each of the 8 TTA passes; the first is the identity
DIHEDRAL = list(itertools.product((False, True), repeat=3))


def segment(detector: Detector, image: Tensor, device: torch.device | str = "cpu",
            tile: int | None = None, overlap: int = TILE_OVERLAP, precision: str = "fp32",
            scale: float = 1.0, tta: bool = False, floor: float | None = None) -> InstanceResult:
    """A normalised image (C, H, W) in [0, 1] -> its instances, on the CPU; ``precision`` as in
    ``maskrcnn.runtime.precision`` (exported models always run float32). ``floor``: the intensity an
    instance needs (None: as ``mask_test_min_contrast`` sets it for this image; a streamed image's
    tiles pass their image's)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if floor is None:
        floor = contrast_floor(image, detector.cfg.mask_test_min_contrast)

    def detect(crop: Tensor) -> InstanceResult:
        return drop_faint(_detect(detector, crop, device, scale, tta), crop, floor)

    with torch.inference_mode(), autocast(precision, device):
        if tile:
            return predict_tiled(detector, image, tile, overlap, device, detect=detect)
        return detect(image)


def _detect(detector: Detector, image: Tensor, device: torch.device | str, scale: float,
            tta: bool) -> InstanceResult:
    """One image (C, H, W) at ``scale``, with or without TTA -> instances in its own frame (CPU)."""
    size = tuple(image.shape[-2:])
    if scale != 1.0:
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False,
                              antialias=scale < 1, recompute_scale_factor=False)[0]
    scaled = tuple(image.shape[-2:])
    passes = DIHEDRAL if tta else DIHEDRAL[:1]
    found = [_undo(detector(_apply(image, *p).to(device)).results[0].to("cpu"), scaled, *p) for p in passes]
    if len(found) == 1 and scale == 1.0:
        return found[0]
    boxes, scores, labels, probs = (torch.cat(parts) for parts in zip(
        *((r.boxes, r.scores, r.labels, r.mask_probs) for r in found)))
    boxes = boxes * torch.tensor([size[1] / scaled[1], size[0] / scaled[0]] * 2, dtype=boxes.dtype)
    order = torch.argsort(scores, descending=True)
    cfg = detector.cfg
    boxes, scores, labels, probs = boxes[order], scores[order], labels[order], probs[order]
    binary = probs > cfg.mask_test_mask_threshold
    if len(found) > 1:
        scores = _voted_scores(binary, boxes, scores, len(found), cfg.mask_test_nms_overlap_threshold)
        kept = scores > cfg.mask_test_nms_pre_score_threshold
        order = torch.argsort(scores[kept], descending=True)
        boxes, scores, labels, probs, binary = (t[kept][order] for t in (boxes, scores, labels, probs, binary))
    return assemble_result(boxes, scores, labels, probs, binary, size, cfg)


def _voted_scores(binary: Tensor, boxes: Tensor, scores: Tensor, passes: int, threshold: float) -> Tensor:
    """Each instance's score as its cluster's mean over the TTA passes (a pass that missed it adds 0).

    Instances sorted by descending score; a cluster is a mask-NMS survivor and the instances it
    suppresses (mask IoU above ``threshold``). The survivor keeps its mask and box; an instance
    found in one orientation only falls to an eighth of its score, so the merged result keeps what
    the passes agree on instead of the union of every pass's false positives.
    """
    keep = mask_nms(binary, boxes, threshold)
    i, j, iou = overlapping_mask_iou(binary, boxes)  # pairs j < i: j scores higher
    joined = (iou > threshold) & keep[j] & ~keep[i]
    leader = torch.arange(len(scores))
    # each suppressed instance joins the highest-scoring survivor that overlaps it
    leader.scatter_reduce_(0, i[joined], j[joined], reduce="amin", include_self=False)
    total = torch.zeros_like(scores).index_add_(0, leader, scores)
    return torch.where(keep, total / passes, torch.zeros_like(scores))


def _apply(image: Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> Tensor:
    """(C, H, W) -> the image seen through one dihedral transform."""
    if transpose:
        image = image.transpose(-2, -1)
    dims = [d for d, on in ((-1, flip_x), (-2, flip_y)) if on]
    return image.flip(dims) if dims else image


def _undo(result: InstanceResult, size: tuple[int, int], transpose: bool, flip_x: bool,
          flip_y: bool) -> InstanceResult:
    """Instances found in the transformed image -> the same instances in the image of ``size`` (H, W).

    Only boxes and box-frame masks are mapped (the label image is repainted by the caller).
    """
    if not (transpose or flip_x or flip_y):
        return result
    height, width = (size[1], size[0]) if transpose else size  # the transformed image's size
    boxes, probs = result.boxes.clone(), result.mask_probs
    if flip_x:
        boxes[:, [0, 2]] = width - result.boxes[:, [2, 0]]
        probs = probs.flip(-1)
    if flip_y:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]].clone()
        probs = probs.flip(-2)
    if transpose:
        boxes = boxes[:, [1, 0, 3, 2]]
        probs = probs.transpose(-2, -1)
    return InstanceResult(boxes, result.scores, result.labels, probs.contiguous(), result.label_image,
                          result.mask_threshold)
