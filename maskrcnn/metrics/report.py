"""``evaluate``: score a data set's predictions against its truths, as one report of tables and JSON.

Data-set tables sum TP/FP/FN (and matched IoU) over the images before dividing; the DSB2018 score
is instead the mean of the images' own scores, as Kaggle computed it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..runtime.atomic import atomic_write_text
from .coco import DEFAULT_MAX_DETS, CocoScores, coco_metrics
from .matching import MatchStats, ThresholdRow, match_instances
from .overlaps import image_overlaps
from .records import PredictionRecord, TruthRecord

HEADLINE_THRESHOLD = 0.5  # per-image rows and summary() report the microscopy numbers here


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


def _nan_to_none(value: Any) -> Any:
    """The value with every NaN float, however deeply nested in dicts and lists, replaced by None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
