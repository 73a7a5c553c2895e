"""IoU of every touching (true, predicted) instance pair of an image, from label images or RLEs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import UserError
from .records import PredictionRecord, TruthRecord
from .rle import RLE, Masks, as_rles, check_label_image, encode_label_image


@dataclass(frozen=True, eq=False)
class Overlaps:
    """IoU of every touching (true, predicted) instance pair of one image, stored sparsely.

    Pairs that do not touch have IoU 0 and are left out, so images with thousands of instances
    stay small. ``true_ids`` (n_true,) / ``pred_ids`` (n_pred,) name the instances (label ids, or
    mask indices); pair k joins ``true_ids[true_index[k]]`` and ``pred_ids[pred_index[k]]`` with
    IoU ``iou[k]`` (all three (P,) for P pairs).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_index: np.ndarray
    pred_index: np.ndarray
    iou: np.ndarray

    def matrix(self) -> np.ndarray:
        """The dense (n_true, n_pred) IoU matrix."""
        dense = np.zeros((len(self.true_ids), len(self.pred_ids)))
        dense[self.true_index, self.pred_index] = self.iou
        return dense


def label_overlaps(true_labels: np.ndarray, pred_labels: np.ndarray) -> Overlaps:
    """Pairwise IoU of the instances of two (H, W) label images, from their joint histogram.

    0 is background; ids are any non-negative integers, not necessarily contiguous. The pixels
    are read once and no per-instance mask is built, so a 2048x2048 image with thousands of
    instances takes a fraction of a second.
    """
    check_label_image(true_labels)
    check_label_image(pred_labels)
    if true_labels.shape != pred_labels.shape:
        raise UserError(f"label images differ in size: truth {true_labels.shape}, prediction {pred_labels.shape}")
    true_ids, true_index = _compact(true_labels)
    pred_ids, pred_index = _compact(pred_labels)
    true_area = np.bincount(true_index, minlength=len(true_ids) + 1)[1:]
    pred_area = np.bincount(pred_index, minlength=len(pred_ids) + 1)[1:]
    both = (true_index > 0) & (pred_index > 0)
    # Only pixels inside both a true and a predicted instance contribute to an intersection.
    stride = len(pred_ids) + 1
    pairs, intersection = np.unique(true_index[both] * stride + pred_index[both], return_counts=True)
    t, p = np.divmod(pairs, stride)
    t, p = t - 1, p - 1
    iou = intersection / (true_area[t] + pred_area[p] - intersection)
    return Overlaps(true_ids, pred_ids, t, p, iou)


def mask_overlaps(true_masks: Masks, pred_masks: Masks) -> Overlaps:
    """Pairwise IoU of two sets of instance masks, (N, H, W) bool or RLEs; instances may overlap."""
    true_rles, pred_rles = as_rles(true_masks), as_rles(pred_masks)
    dense = np.zeros((len(true_rles), len(pred_rles)))
    if true_rles and pred_rles:
        dense[:] = mask_utils.iou(true_rles, pred_rles, [0] * len(pred_rles))
    t, p = np.nonzero(dense)
    return Overlaps(np.arange(len(true_rles)), np.arange(len(pred_rles)), t, p, dense[t, p])


def image_overlaps(truth: TruthRecord, prediction: PredictionRecord) -> Overlaps:
    """One image's overlaps: from label images where both sides have one, else by mask IoU."""
    true_labels = truth.label_image if truth.label_image is not None else _paint_disjoint(truth.masks)
    if true_labels is not None and prediction.label_image is not None:
        return label_overlaps(true_labels, prediction.label_image)
    return mask_overlaps(_microscopy_rles(truth), _microscopy_rles(prediction))


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero ids of a label image, ascending, and each pixel's index into them + 1 (0: background)."""
    flat = labels.ravel()
    if flat.size and flat.max() < flat.size:
        # A lookup table no larger than the image: several times faster than sorting the pixels.
        flat = flat.astype(np.intp, copy=False)
        ids = np.flatnonzero(np.bincount(flat)[1:]) + 1
        lookup = np.zeros(int(flat.max()) + 1, np.intp)
        lookup[ids] = np.arange(1, len(ids) + 1)
        return ids, lookup[flat]
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids.size and ids[0] == 0:
        return ids[1:], inverse
    return ids, inverse + 1


def _microscopy_rles(record: TruthRecord | PredictionRecord) -> list[RLE]:
    """The instances the microscopy metrics score: the label image's if there is one, else the masks."""
    return encode_label_image(record.label_image)[1] if record.label_image is not None else record.rles


def _paint_disjoint(masks: Masks) -> np.ndarray | None:
    """The label image of disjoint (G, H, W) masks, id i + 1 for mask i; None for overlaps or RLEs."""
    if not isinstance(masks, np.ndarray):
        return None
    coverage = masks.sum(axis=0)
    if coverage.max(initial=0) > 1:
        return None
    if not len(masks):
        return np.zeros(masks.shape[1:], np.int32)
    return np.where(coverage > 0, masks.argmax(axis=0) + 1, 0)
