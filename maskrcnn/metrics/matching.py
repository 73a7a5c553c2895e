"""One-to-one instance matching at IoU thresholds and the microscopy numbers it gives.

At each threshold t, true and predicted instances are matched one-to-one where IoU > t and
counted as TP, FP (unmatched predictions) and FN (unmatched truths). From the counts: accuracy
TP / (TP + FP + FN), precision, recall, F1, SQ (mean IoU of the matches), PQ = SQ * F1, and an
image's DSB2018 score, its accuracy averaged over the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .overlaps import Overlaps

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


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

    Every field is (T,) for T thresholds. iou_sum is the summed IoU of the true positives, which
    SQ and PQ need.
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
        """One row per threshold, in the thresholds' order."""
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
