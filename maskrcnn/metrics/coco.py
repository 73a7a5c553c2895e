"""COCO box and mask AP: records in COCO's formats, and pycocotools' COCOeval made fast for dense images.

COCOeval runs on in-memory COCO objects, with the per-image detection limit raised to
``max_dets`` (COCO's default of 100 would drop most nuclei of a dense image).
``detection_records`` is the one builder of COCO results records: ``predict`` writes them to
results_coco.json and ``coco_metrics`` loads them into COCOeval.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .records import PredictionRecord, TruthRecord
from .rle import rle_areas

DEFAULT_MAX_DETS = 3000  # matches Config.rcnn_test_max_detections
COCO_IOU_TYPES = {"box": "bbox", "mask": "segm"}


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


def detection_records(image_id: int, prediction: PredictionRecord, segmentation: bool = True) -> list[dict]:
    """One image's D detections in COCO's results format, in the prediction's instance order.

    Each record holds image_id, category_id, bbox (x, y, width, height) and score, and with
    ``segmentation`` the instance's COCO RLE (a label image's RLEs cover its visible pixels).
    """
    boxes, scores, labels = prediction.boxes_xywh(), prediction.confidences(), prediction.class_ids()
    records = []
    for k, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        record = {"image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box],
                  "score": float(score)}
        if segmentation:
            record["segmentation"] = prediction.rles[k]
        records.append(record)
    return records


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
    """The truths as COCO annotations; image i of the list is COCO image i + 1."""
    annotations = []
    for image_id, truth in enumerate(truths, start=1):
        areas = rle_areas(truth.rles)
        boxes = mask_utils.toBbox(truth.rles) if truth.rles else []
        for rle, area, box, label in zip(truth.rles, areas, boxes, truth.class_ids()):
            annotations.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                                "area": float(area), "bbox": box.tolist(), "iscrowd": 0})
    return _numbered(annotations)


def _detection_annotations(predictions: Sequence[PredictionRecord], iou_type: str) -> list[dict]:
    """Detections as COCO results; ``area`` as COCO.loadRes sets it (box area for bbox, mask area for segm)."""
    annotations = []
    for image_id, prediction in enumerate(predictions, start=1):
        segm = iou_type == "segm"
        records = detection_records(image_id, prediction, segmentation=segm)
        areas = rle_areas(prediction.rles) if segm else [r["bbox"][2] * r["bbox"][3] for r in records]
        for record, area in zip(records, areas):
            record.update(area=float(area), iscrowd=0)
        annotations += records
    return _numbered(annotations)


def _numbered(annotations: list[dict]) -> list[dict]:
    """The annotations with ids 1, 2, ...: COCOeval stores matches as annotation ids, 0 meaning unmatched."""
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
