"""Evaluation metrics: the microscopy family (StarDist, Cellpose, DSB2018) and COCO box/mask AP.

Microscopy family. At each IoU threshold t in 0.50, 0.55, ..., 0.95, true and predicted
instances are matched one-to-one where IoU > t and counted as TP, FP (unmatched predictions) and
FN (unmatched truths). From the counts: ``accuracy`` = TP / (TP + FP + FN), which StarDist names
accuracy and Cellpose and the DSB2018 rules name "AP" (it is not COCO's AP, so it is not called
that here); precision, recall, F1; SQ (mean IoU of the matches) and PQ = SQ * F1 (panoptic
quality). The DSB2018 score of an image is its accuracy averaged over the ten thresholds, and a
data set's is the mean of its images' scores, as Kaggle computed it. Data-set tables instead sum
TP/FP/FN (and matched IoU) over images before dividing.

Edge cases: a ratio whose denominator is 0 is 1.0 when the image has neither FP nor FN (no true
and no predicted instances: nothing to find and nothing found), else 0.0. So an empty image
predicted empty scores 1.0 everywhere, and any FP or FN on an otherwise empty side scores 0.0.

COCO family: pycocotools' COCOeval on in-memory COCO objects, with the per-image detection limit
raised to ``max_dets`` (COCO's default of 100 would drop most nuclei of a dense image).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .atomic import atomic_write_text
from .errors import UserError
from .rle import coco_rle, label_runs

RLE = dict[str, Any]
Masks = np.ndarray | Sequence[RLE]  # (N, H, W) bool array, or N COCO RLEs

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
HEADLINE_THRESHOLD = 0.5  # per-image rows and summary() report the microscopy numbers here
DEFAULT_MAX_DETS = 3000  # matches Config.rcnn_test_max_detections
COCO_IOU_TYPES = {"box": "bbox", "mask": "segm"}


# --- instance overlaps ------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Overlaps:
    """IoU of every touching (true, predicted) instance pair of one image, stored sparsely.

    Pairs that do not touch have IoU 0 and are left out, so images with thousands of instances
    stay small. ``true_ids`` / ``pred_ids`` name the instances (label ids, or mask indices);
    pair k joins ``true_ids[true_index[k]]`` and ``pred_ids[pred_index[k]]`` with IoU ``iou[k]``.
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
    _check_label_image(true_labels)
    _check_label_image(pred_labels)
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
    true_rles, pred_rles = _as_rles(true_masks), _as_rles(pred_masks)
    dense = np.zeros((len(true_rles), len(pred_rles)))
    if true_rles and pred_rles:
        dense[:] = mask_utils.iou(true_rles, pred_rles, [0] * len(pred_rles))
    t, p = np.nonzero(dense)
    return Overlaps(np.arange(len(true_rles)), np.arange(len(pred_rles)), t, p, dense[t, p])


def _check_label_image(labels: np.ndarray) -> None:
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"a label image must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise UserError("a label image must not hold negative ids")


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


# --- RLEs ---------------------------------------------------------------------------------------
def encode_masks(masks: np.ndarray) -> list[RLE]:
    """COCO RLEs of instance masks (N, H, W) bool: the memory-bounded form predictions may take."""
    if masks.ndim != 3:
        raise UserError(f"instance masks must be (N, H, W), got shape {masks.shape}")
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))


def encode_label_image(label_image: np.ndarray) -> tuple[np.ndarray, list[RLE]]:
    """The non-zero ids of a label image, ascending, and each one's COCO RLE (one pass, no masks)."""
    _check_label_image(label_image)
    runs = label_runs(label_image)
    ids = np.fromiter(runs, dtype=np.int64, count=len(runs))
    return ids, [coco_rle(*runs[i], *label_image.shape) for i in runs]


def _as_rles(masks: Masks) -> list[RLE]:
    """The masks as a list of RLEs, encoding an array."""
    return encode_masks(masks) if isinstance(masks, np.ndarray) else list(masks)


def _rle_areas(rles: Sequence[RLE]) -> np.ndarray:
    """Pixel counts of RLEs."""
    # pycocotools' area() overflows a uint8 count for lists of more than 255 under numpy 2.
    chunks = (list(rles[i:i + 255]) for i in range(0, len(rles), 255))
    return np.concatenate([np.zeros(0), *map(mask_utils.area, chunks)])


# --- input records ------------------------------------------------------------------------------
@dataclass(eq=False)
class _Instances:
    """What truth and predictions share: one image's instances as a label image and/or masks.

    The instances are ``masks`` in order or, when ``masks`` is None, the label image's non-zero
    ids in ascending order; per-instance arrays (``labels``, and boxes and scores of a
    prediction) follow that order. ``labels`` None means class 1 for every instance.
    """

    name: str
    label_image: np.ndarray | None = None
    masks: Masks | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.label_image is None and self.masks is None:
            raise UserError(f"{self.name}: give a label image or instance masks")
        if self.image_size is None:
            raise UserError(f"{self.name}: cannot tell the image size from an empty RLE list; "
                            "give a label image or a (0, H, W) mask array")

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.label_image is not None:
            return tuple(self.label_image.shape)
        if isinstance(self.masks, np.ndarray):
            return tuple(self.masks.shape[1:])
        return tuple(self.masks[0]["size"]) if len(self.masks) else None

    @cached_property
    def rles(self) -> list[RLE]:
        """Each instance's COCO RLE."""
        return _as_rles(self.masks) if self.masks is not None else encode_label_image(self.label_image)[1]

    def class_ids(self) -> np.ndarray:
        """(N,) class id of each instance."""
        labels = self._per_instance("labels")
        return np.ones(len(self.rles), np.int64) if labels is None else labels

    def _per_instance(self, field_name: str) -> np.ndarray | None:
        """A per-instance field as an array, checked against the number of instances (None if absent)."""
        values = getattr(self, field_name)
        if values is None:
            return None
        values = np.asarray(values)
        if len(values) != len(self.rles):
            raise UserError(f"{self.name}: {len(values)} {field_name} for {len(self.rles)} instances")
        return values


@dataclass(eq=False)
class TruthRecord(_Instances):
    """The ground truth of one image.

    name: pairs it with the PredictionRecord of the same name.
    label_image: (H, W) int, 0 background, ids arbitrary (the microscopy metrics' input).
    masks: (G, H, W) bool or G RLEs, which may overlap (COCO-style); with no label image, disjoint
        dense masks are painted into one (id i + 1 for mask i) and overlapping ones are matched by
        mask IoU.
    labels: (G,) class ids; None: all 1.
    """


@dataclass(eq=False)
class PredictionRecord(_Instances):
    """The model's output for one image.

    label_image: (H, W) int with overlaps resolved (``InstanceResult.label_image``); the
        microscopy metrics use it when given, else the masks.
    masks: (D, H, W) bool or D RLEs (``encode_masks``), one per detection: COCO mask AP uses them
        when given, else the label image's instances. Give them whenever detections may be hidden
        under others in the label image, as the ids then no longer line up with the detections.
    boxes: (D, 4) xyxy in pixels; None: the masks' bounding boxes.
    scores: (D,) confidences ranking detections for COCO AP; None: all 1, in input order.
    labels: (D,) class ids; None: all 1.
    """

    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None

    def boxes_xywh(self) -> np.ndarray:
        """(D, 4) boxes as COCO's (x, y, width, height)."""
        boxes = self._per_instance("boxes")
        if boxes is None:
            return mask_utils.toBbox(self.rles) if self.rles else np.zeros((0, 4))
        xyxy = boxes.astype(float).reshape(-1, 4)
        return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)

    def confidences(self) -> np.ndarray:
        scores = self._per_instance("scores")
        return np.ones(len(self.rles)) if scores is None else scores


# --- microscopy matching ------------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdRow:
    """The microscopy numbers at one IoU threshold (``accuracy`` is TP / (TP + FP + FN))."""

    threshold: float
    tp: int
    fp: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    sq: float
    pq: float


@dataclass(frozen=True, eq=False)
class MatchStats:
    """Matching counts of one image, per IoU threshold; ``a + b`` sums two images' counts.

    iou_sum is the summed IoU of the true positives, which SQ and PQ need.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    def __add__(self, other: MatchStats) -> MatchStats:
        if not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("cannot add match counts taken at different IoU thresholds")
        return MatchStats(self.thresholds, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                          self.iou_sum + other.iou_sum)

    def _ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        """numerator / denominator, where 0/0 is 1.0 without FP and FN (an empty image) and else 0.0."""
        flawless = (self.fp + self.fn) == 0
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), flawless.astype(float))

    @property
    def accuracy(self) -> np.ndarray:
        """TP / (TP + FP + FN): StarDist's accuracy, Cellpose's and DSB2018's "AP"."""
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def precision(self) -> np.ndarray:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> np.ndarray:
        """2 TP / (2 TP + FP + FN), also PQ's recognition quality RQ."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def sq(self) -> np.ndarray:
        """Segmentation quality: the mean IoU of the matched pairs."""
        return self._ratio(self.iou_sum, self.tp)

    @property
    def pq(self) -> np.ndarray:
        """Panoptic quality SQ * RQ."""
        return self.sq * self.f1

    @property
    def dsb_score(self) -> float:
        """The mean accuracy over the thresholds: one image's DSB2018 score."""
        return float(self.accuracy.mean())

    def rows(self) -> list[ThresholdRow]:
        columns = zip(self.thresholds, self.tp, self.fp, self.fn, self.accuracy, self.precision, self.recall,
                      self.f1, self.sq, self.pq)
        return [ThresholdRow(float(t), int(tp), int(fp), int(fn), *map(float, rest))
                for t, tp, fp, fn, *rest in columns]


def match_instances(overlaps: Overlaps, thresholds: Sequence[float] = IOU_THRESHOLDS) -> MatchStats:
    """Match true and predicted instances one-to-one at each threshold (IoU > t) and count them.

    Pairs are accepted greedily by descending IoU, each instance at most once. For t >= 0.5 and
    non-overlapping instances on both sides (label images) no instance has two candidate
    partners, so this is the unique matching of the DSB2018 rules; with overlapping masks greedy
    decides. The pairs above a higher threshold are a prefix of the same IoU order, so one greedy
    pass at the lowest threshold gives every threshold's matching.
    """
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.ndim != 1 or not thresholds.size or thresholds.min() < 0 or thresholds.max() >= 1:
        raise ValueError(f"IoU thresholds must be a non-empty list in [0, 1), got {thresholds}")
    candidate = overlaps.iou > thresholds.min()
    matched = _greedy_match(overlaps.true_index[candidate], overlaps.pred_index[candidate],
                            overlaps.iou[candidate])
    above = matched[None, :] > thresholds[:, None]
    tp = above.sum(axis=1)
    return MatchStats(thresholds, tp, len(overlaps.pred_ids) - tp, len(overlaps.true_ids) - tp,
                      (above * matched).sum(axis=1))


def _greedy_match(true_index: np.ndarray, pred_index: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """IoUs of the pairs accepted by descending IoU, each instance used at most once."""
    # A loop over candidate pairs (at most a few per instance), not pixels: greedy is sequential.
    order = np.argsort(-iou, kind="stable")
    used_true: set[int] = set()
    used_pred: set[int] = set()
    accepted = []
    for t, p, value in zip(true_index[order].tolist(), pred_index[order].tolist(), iou[order].tolist()):
        if t not in used_true and p not in used_pred:
            used_true.add(t)
            used_pred.add(p)
            accepted.append(value)
    return np.asarray(accepted, dtype=float)


def image_overlaps(truth: TruthRecord, prediction: PredictionRecord) -> Overlaps:
    """One image's overlaps: from label images where both sides have one, else by mask IoU."""
    true_labels = truth.label_image if truth.label_image is not None else _paint_disjoint(truth.masks)
    if true_labels is not None and prediction.label_image is not None:
        return label_overlaps(true_labels, prediction.label_image)
    return mask_overlaps(_microscopy_rles(truth), _microscopy_rles(prediction))


def _microscopy_rles(record: _Instances) -> list[RLE]:
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


# --- COCO ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CocoScores:
    """COCOeval's numbers for one IoU type, all at ``max_dets`` detections per image.

    ap is AP@[.50:.95]; ap_small/medium/large split it by object area (32^2, 96^2 pixels);
    ar is the recall averaged over the IoU thresholds. NaN where undefined (no true instances).
    """

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar: float


def coco_metrics(truths: Sequence[TruthRecord], predictions: Sequence[PredictionRecord],
                 max_dets: int = DEFAULT_MAX_DETS) -> dict[str, CocoScores]:
    """Box and mask AP by pycocotools: ``{"box": ..., "mask": ...}``. predictions[i] is truths[i]'s image.

    The COCO objects are built in memory; category ids are the class labels.
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    images = [{"id": i + 1, "height": t.image_size[0], "width": t.image_size[1]} for i, t in enumerate(truths)]
    classes = {int(c) for record in (*truths, *predictions) for c in record.class_ids()}
    categories = [{"id": c} for c in sorted(classes)]
    ground_truth = _coco(images, categories, _truth_annotations(truths))
    scores = {}
    for name, iou_type in COCO_IOU_TYPES.items():
        detections = _coco(images, categories, _detection_annotations(predictions, iou_type))
        scores[name] = _coco_scores(ground_truth, detections, iou_type, max_dets)
    return scores


def _truth_annotations(truths: Sequence[TruthRecord]) -> list[dict]:
    annotations = []
    for image_id, truth in enumerate(truths, start=1):
        areas = _rle_areas(truth.rles)
        boxes = mask_utils.toBbox(truth.rles) if truth.rles else []
        for rle, area, box, label in zip(truth.rles, areas, boxes, truth.class_ids()):
            annotations.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                                "area": float(area), "bbox": box.tolist(), "iscrowd": 0})
    # COCOeval stores matches as annotation ids with 0 meaning unmatched, so ids start at 1.
    for ann_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = ann_id
    return annotations


def _detection_annotations(predictions: Sequence[PredictionRecord], iou_type: str) -> list[dict]:
    """Detections as COCO results; ``area`` as COCO.loadRes sets it (box area for bbox, mask area for segm)."""
    annotations = []
    for image_id, prediction in enumerate(predictions, start=1):
        boxes, scores, labels = prediction.boxes_xywh(), prediction.confidences(), prediction.class_ids()
        if iou_type == "segm":
            areas = _rle_areas(prediction.rles)
        else:
            areas = boxes[:, 2] * boxes[:, 3]
        for k, (box, score, label, area) in enumerate(zip(boxes, scores, labels, areas)):
            annotation = {"image_id": image_id, "category_id": int(label), "bbox": box.tolist(),
                          "score": float(score), "area": float(area), "iscrowd": 0}
            if iou_type == "segm":
                annotation["segmentation"] = prediction.rles[k]
            annotations.append(annotation)
    for ann_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = ann_id
    return annotations


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with _quiet():
        coco.createIndex()
    return coco


class SparseCOCOeval(COCOeval):
    """COCOeval whose per-image matching visits only the truths each detection overlaps.

    pycocotools' evaluateImg loops in Python over every truth for every detection and threshold:
    about a minute per IoU type on an image with 2000 nuclei. This override makes the same
    matches for non-crowd truths (all that ``coco_metrics`` builds): at each threshold t and for
    each detection in score order, the still-free truth with IoU >= t, preferring truths inside
    the area range, then the highest IoU, then the later truth (pycocotools' tie rule). Pairs
    with IoU 0 are skipped, so the IoU thresholds must be above 0 (COCO's are 0.5 to 0.95).
    """

    def evaluateImg(self, imgId: int, catId: int, aRng: list[float], maxDet: int) -> dict | None:
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gt and not dt:
            return None
        if any(g["iscrowd"] for g in gt):
            raise ValueError("SparseCOCOeval does not handle crowd annotations")
        gt_ignore = np.array([bool(g["ignore"]) or not aRng[0] <= g["area"] <= aRng[1] for g in gt], bool)
        gt_order = np.argsort(gt_ignore, kind="mergesort")
        dt_order = np.argsort([-d["score"] for d in dt], kind="mergesort")[:maxDet]
        gt, gt_ignore, dt = [gt[i] for i in gt_order], gt_ignore[gt_order], [dt[i] for i in dt_order]
        # computeIoU's rows are the detections in this same score order.
        ious = self.ious[imgId, catId]
        ious = ious[:, gt_order] if len(ious) else np.zeros((len(dt), len(gt)))
        gt_ids = np.array([g["id"] for g in gt])
        thresholds = np.minimum(self.params.iouThrs, 1 - 1e-10)[:, None]
        gt_matches = np.zeros((len(thresholds), len(gt)))
        dt_matches = np.zeros((len(thresholds), len(dt)))
        dt_ignore = np.zeros((len(thresholds), len(dt)), bool)
        rows, columns = np.nonzero(ious)
        touched_by = np.split(columns, np.searchsorted(rows, np.arange(1, len(dt))))  # truths per detection
        for d, (detection, touched) in enumerate(zip(dt, touched_by)):
            if not touched.size:
                continue
            iou = ious[d, touched]
            eligible = (gt_matches[:, touched] == 0) & (iou >= thresholds)  # (T, touched)
            # In-range truths outrank out-of-range ones (+2 exceeds any IoU); reversed argmax: ties to the later.
            rank = np.where(eligible, iou + 2 * ~gt_ignore[touched], -np.inf)[:, ::-1]
            t = np.flatnonzero(eligible.any(axis=1))
            m = touched[len(touched) - 1 - rank[t].argmax(axis=1)]
            dt_matches[t, d], dt_ignore[t, d], gt_matches[t, m] = gt_ids[m], gt_ignore[m], detection["id"]
        outside = np.array([not aRng[0] <= d["area"] <= aRng[1] for d in dt], bool)
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt],
                "dtMatches": dt_matches, "gtMatches": gt_matches, "dtScores": [d["score"] for d in dt],
                "gtIgnore": gt_ignore.astype(int),
                "dtIgnore": dt_ignore | ((dt_matches == 0) & outside[None, :])}


def _coco_scores(ground_truth: COCO, detections: COCO, iou_type: str, max_dets: int) -> CocoScores:
    evaluator = SparseCOCOeval(ground_truth, detections, iou_type)
    # Sorted, ending at max_dets: the last maxDets index is the raised limit. summarize() is not
    # used because it reads its AP numbers at a hard-coded maxDets=100.
    evaluator.params.maxDets = [m for m in (1, 10) if m < max_dets] + [max_dets]
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][..., -1]  # (T iou, R recall, K class, A area)
    recall = evaluator.eval["recall"][..., -1]  # (T, K, A)
    iou = evaluator.params.iouThrs
    area = {label: i for i, label in enumerate(evaluator.params.areaRngLbl)}
    at50, at75 = np.isclose(iou, 0.5), np.isclose(iou, 0.75)
    return CocoScores(ap=_valid_mean(precision[..., area["all"]]),
                      ap50=_valid_mean(precision[at50][..., area["all"]]),
                      ap75=_valid_mean(precision[at75][..., area["all"]]),
                      ap_small=_valid_mean(precision[..., area["small"]]),
                      ap_medium=_valid_mean(precision[..., area["medium"]]),
                      ap_large=_valid_mean(precision[..., area["large"]]),
                      ar=_valid_mean(recall[..., area["all"]]))


def _valid_mean(values: np.ndarray) -> float:
    """Mean of the entries COCOeval defines; it writes -1 where a class has no true instances."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else math.nan


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- report -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageScores:
    """One image's microscopy numbers at IoU 0.5, and its DSB2018 score."""

    name: str
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    pq: float
    dsb_score: float


@dataclass
class EvaluationReport:
    """Everything ``evaluate`` measures.

    microscopy: one row per IoU threshold, counts summed over the images.
    dsb_score: the mean over images of each image's DSB2018 score (Kaggle's leaderboard number).
    coco: {"box": ..., "mask": ...} from ``coco_metrics``.
    images: one row per image, in the order of the truths.
    """

    microscopy: list[ThresholdRow]
    dsb_score: float
    coco: dict[str, CocoScores]
    images: list[ImageScores]
    max_dets: int

    @property
    def headline(self) -> ThresholdRow:
        """The data-set row at IoU 0.5."""
        return _headline_row(self.microscopy)

    def summary(self) -> dict[str, float]:
        """The headline numbers, flat: ``mask_ap``, ``box_ap50``, ``dsb_score``, ``f1_50``, ..."""
        numbers = {f"{name}_{f.name}": getattr(scores, f.name)
                   for name, scores in self.coco.items() for f in fields(scores)}
        numbers["dsb_score"] = self.dsb_score
        for key in ("accuracy", "precision", "recall", "f1", "sq", "pq"):
            numbers[f"{key}_50"] = getattr(self.headline, key)
        return numbers

    def to_json(self, path: str | Path) -> None:
        """Write the report as JSON, atomically; undefined numbers (NaN) become null."""
        data = {"summary": self.summary(), **asdict(self)}
        atomic_write_text(path, json.dumps(_nan_to_none(data), indent=2, allow_nan=False) + "\n")

    def format_table(self) -> str:
        """The report as plain-text tables."""
        return "\n\n".join([self._coco_table(), self._microscopy_table(), self._image_table()])

    def _coco_table(self) -> str:
        lines = [f"COCO AP (pycocotools, maxDets={self.max_dets})",
                 f"{'':6}{'AP':>8}{'AP50':>8}{'AP75':>8}{'APs':>8}{'APm':>8}{'APl':>8}{'AR':>8}"]
        for name, s in self.coco.items():
            values = (s.ap, s.ap50, s.ap75, s.ap_small, s.ap_medium, s.ap_large, s.ar)
            lines.append(f"{name:6}" + "".join(f"{v:8.3f}" for v in values))
        return "\n".join(lines)

    def _microscopy_table(self) -> str:
        lines = [f"Instance matching (one-to-one at IoU > t, counts summed over {len(self.images)} images)",
                 f"{'IoU':>5}{'TP':>8}{'FP':>8}{'FN':>8}{'accuracy':>10}{'precision':>10}{'recall':>8}"
                 f"{'F1':>8}{'SQ':>8}{'PQ':>8}"]
        for r in self.microscopy:
            lines.append(f"{r.threshold:5.2f}{r.tp:8d}{r.fp:8d}{r.fn:8d}{r.accuracy:10.3f}{r.precision:10.3f}"
                         f"{r.recall:8.3f}{r.f1:8.3f}{r.sq:8.3f}{r.pq:8.3f}")
        lines.append("DSB2018 score (mean over images of accuracy averaged over IoU 0.50:0.95): "
                     f"{self.dsb_score:.3f}")
        return "\n".join(lines)

    def _image_table(self) -> str:
        width = max(len("image"), *(len(r.name) for r in self.images))
        lines = ["Per image (IoU 0.5)",
                 f"{'image':<{width}}{'true':>6}{'pred':>6}{'TP':>6}{'FP':>6}{'FN':>6}{'prec':>7}{'recall':>7}"
                 f"{'F1':>7}{'PQ':>7}{'DSB':>7}"]
        for r in self.images:
            lines.append(f"{r.name:<{width}}{r.n_true:6d}{r.n_pred:6d}{r.tp:6d}{r.fp:6d}{r.fn:6d}"
                         f"{r.precision:7.3f}{r.recall:7.3f}{r.f1:7.3f}{r.pq:7.3f}{r.dsb_score:7.3f}")
        return "\n".join(lines)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def evaluate(truths: Sequence[TruthRecord], predictions: Sequence[PredictionRecord],
             max_dets: int = DEFAULT_MAX_DETS) -> EvaluationReport:
    """Score predictions against truths, paired by name: microscopy metrics and COCO AP."""
    if not truths:
        raise UserError("nothing to evaluate: no images")
    predictions = _pair_by_name(truths, predictions)
    per_image = [match_instances(image_overlaps(t, p)) for t, p in zip(truths, predictions)]
    total = sum(per_image[1:], per_image[0])
    return EvaluationReport(microscopy=total.rows(),
                            dsb_score=float(np.mean([s.dsb_score for s in per_image])),
                            coco=coco_metrics(truths, predictions, max_dets),
                            images=[_image_scores(t.name, s) for t, s in zip(truths, per_image)],
                            max_dets=max_dets)


def _image_scores(name: str, stats: MatchStats) -> ImageScores:
    row = _headline_row(stats.rows())
    return ImageScores(name=name, n_true=row.tp + row.fn, n_pred=row.tp + row.fp, tp=row.tp, fp=row.fp,
                       fn=row.fn, accuracy=row.accuracy, precision=row.precision, recall=row.recall,
                       f1=row.f1, pq=row.pq, dsb_score=stats.dsb_score)


def _headline_row(rows: list[ThresholdRow]) -> ThresholdRow:
    return next(row for row in rows if math.isclose(row.threshold, HEADLINE_THRESHOLD))


def _pair_by_name(truths: Sequence[TruthRecord],
                  predictions: Sequence[PredictionRecord]) -> list[PredictionRecord]:
    """The predictions in the order of the truths; each image needs exactly one of each."""
    by_name = {p.name: p for p in predictions}
    truth_names = [t.name for t in truths]
    if len(by_name) != len(predictions) or len(set(truth_names)) != len(truths):
        raise UserError("image names must be unique among the truths and among the predictions")
    missing = [n for n in truth_names if n not in by_name]
    extra = sorted(set(by_name) - set(truth_names))
    if missing or extra:
        raise UserError(f"truths and predictions name different images: no prediction for {missing[:5]}, "
                        f"no truth for {extra[:5]}")
    for truth in truths:
        size = by_name[truth.name].image_size
        if size != truth.image_size:
            raise UserError(f"{truth.name}: prediction size {size} differs from the truth's {truth.image_size}")
    return [by_name[n] for n in truth_names]
