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

Modules, in the order the data flows: ``records`` (one image's truth or prediction),
``overlaps`` (IoU of instance pairs), ``matching`` (TP/FP/FN per threshold and the numbers from
them), ``coco`` (COCO records and COCOeval), ``report`` (``evaluate`` and its tables and JSON).
"""

from .coco import (COCO_IOU_TYPES, DEFAULT_MAX_DETS, CocoScores, SparseCOCOeval, coco_metrics,
                   detection_records)
# The COCO-object builders and the print silencer, for tests that run pycocotools' own COCOeval on
# exactly what coco_metrics feeds SparseCOCOeval.
from .coco import _coco, _detection_annotations, _quiet, _truth_annotations  # noqa: F401
from .matching import IOU_THRESHOLDS, MatchStats, ThresholdRow, match_instances
from .overlaps import Overlaps, image_overlaps, label_overlaps, mask_overlaps
from .records import PredictionRecord, TruthRecord, prediction_record, truth_record
from .report import HEADLINE_THRESHOLD, EvaluationReport, ImageScores, evaluate
from .rle import RLE, Masks, encode_label_image, encode_masks

__all__ = [
    "RLE", "Masks", "encode_label_image", "encode_masks",
    "PredictionRecord", "TruthRecord", "prediction_record", "truth_record",
    "Overlaps", "image_overlaps", "label_overlaps", "mask_overlaps",
    "IOU_THRESHOLDS", "MatchStats", "ThresholdRow", "match_instances",
    "COCO_IOU_TYPES", "DEFAULT_MAX_DETS", "CocoScores", "SparseCOCOeval", "coco_metrics", "detection_records",
    "HEADLINE_THRESHOLD", "EvaluationReport", "ImageScores", "evaluate",
]
