"""Tests of the evaluation metrics: instance matching, the DSB2018 score and COCO AP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from maskrcnn import metrics
from maskrcnn.errors import UserError
from maskrcnn.metrics import (IOU_THRESHOLDS, PredictionRecord, SparseCOCOeval, TruthRecord, encode_label_image,
                              encode_masks, evaluate, label_overlaps, mask_overlaps, match_instances)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MICROSCOPY_FIELDS = ("accuracy", "precision", "recall", "f1", "sq", "pq")


def squares(size: int, corners: list[tuple[int, int]], side: int, ids: list[int] | None = None) -> np.ndarray:
    """A label image with one side x side square per top-left corner, ids 1.. unless given."""
    labels = np.zeros((size, size), np.int32)
    for k, (y, x) in enumerate(corners):
        labels[y:y + side, x:x + side] = ids[k] if ids else k + 1
    return labels


def prediction_from_labels(name: str, labels: np.ndarray, scores: list[float] | None = None) -> PredictionRecord:
    ids, rles = encode_label_image(labels)
    boxes = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    return PredictionRecord(name, label_image=labels, boxes=boxes,
                            scores=np.linspace(0.9, 0.5, len(ids)) if scores is None else np.array(scores))


def assert_microscopy_perfect(report: metrics.EvaluationReport) -> None:
    assert report.dsb_score == 1.0
    for row in report.microscopy:
        assert row.fp == row.fn == 0
        assert all(getattr(row, f) == pytest.approx(1.0) for f in MICROSCOPY_FIELDS)


# --- IoU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("id_scale", [1, 10**6])  # small ids: lookup table; huge ids: np.unique
def test_label_iou_matches_brute_force(id_scale: int) -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 6, (24, 20)) * id_scale
    pred = rng.integers(0, 5, (24, 20)) * 7 * id_scale
    overlaps = label_overlaps(true, pred)
    true_ids, pred_ids = np.unique(true[true > 0]), np.unique(pred[pred > 0])
    expected = np.array([[((true == t) & (pred == p)).sum() / ((true == t) | (pred == p)).sum()
                          for p in pred_ids] for t in true_ids])
    np.testing.assert_array_equal(overlaps.true_ids, true_ids)
    np.testing.assert_array_equal(overlaps.pred_ids, pred_ids)
    np.testing.assert_allclose(overlaps.matrix(), expected)


def test_mask_iou_matches_brute_force_with_overlapping_masks() -> None:
    rng = np.random.default_rng(1)
    true, pred = rng.random((4, 16, 12)) < 0.4, rng.random((3, 16, 12)) < 0.4
    expected = np.array([[(t & p).sum() / (t | p).sum() for p in pred] for t in true])
    np.testing.assert_allclose(mask_overlaps(true, pred).matrix(), expected)
    np.testing.assert_allclose(mask_overlaps(encode_masks(true), encode_masks(pred)).matrix(), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_encode_label_image_equals_encoding_each_mask() -> None:
    labels = np.random.default_rng(2).integers(0, 9, (13, 17)) * 3
    ids, rles = encode_label_image(labels)
    np.testing.assert_array_equal(ids, np.unique(labels[labels > 0]))
    reference = encode_masks(labels[None] == ids[:, None, None])
    np.testing.assert_array_equal(mask_utils.decode(rles), mask_utils.decode(reference))
    np.testing.assert_allclose(mask_utils.iou(rles, reference, [0] * len(ids)), np.eye(len(ids)))


# --- microscopy matching --------------------------------------------------------------------------
def test_non_contiguous_ids_match_perfectly() -> None:
    true = squares(30, [(1, 1), (10, 10), (20, 2)], 5, ids=[3, 70, 1_000_000])
    pred = squares(30, [(1, 1), (10, 10), (20, 2)], 5, ids=[12, 5, 9])
    overlaps = label_overlaps(true, pred)
    np.testing.assert_array_equal(overlaps.true_ids, [3, 70, 1_000_000])
    np.testing.assert_array_equal(overlaps.pred_ids, [5, 9, 12])
    stats = match_instances(overlaps)
    np.testing.assert_array_equal(stats.tp, 3)
    assert stats.dsb_score == 1.0


def test_perfect_prediction_scores_one_everywhere() -> None:
    labels = squares(40, [(2, 2), (2, 20), (20, 5), (25, 25)], 6)
    report = evaluate([TruthRecord("a", label_image=labels)], [prediction_from_labels("a", labels)])
    assert_microscopy_perfect(report)
    for scores in report.coco.values():
        assert scores.ap == scores.ap50 == scores.ap75 == scores.ap_small == scores.ar == 1.0
        assert math.isnan(scores.ap_medium) and math.isnan(scores.ap_large)  # no such objects


def test_missing_extra_and_shifted_instances_give_hand_counted_scores() -> None:
    # Truth: four 5x5 squares. Prediction: A and B exact, C shifted 1 px (IoU 20/30 = 2/3),
    # D missed, E spurious.
    true = squares(40, [(1, 1), (1, 10), (20, 20), (30, 2)], 5)
    pred = squares(40, [(1, 1), (1, 10), (20, 21), (30, 30)], 5)
    report = evaluate([TruthRecord("img", label_image=true)],
                      [prediction_from_labels("img", pred, scores=[0.9, 0.8, 0.7, 0.6])])
    for row in report.microscopy:
        if row.threshold < 2 / 3:  # 0.50 .. 0.65: the shifted square matches
            assert (row.tp, row.fp, row.fn) == (3, 1, 1)
            assert row.accuracy == pytest.approx(3 / 5)
            assert row.precision == row.recall == row.f1 == pytest.approx(3 / 4)
            assert row.sq == pytest.approx((1 + 1 + 2 / 3) / 3)
            assert row.pq == pytest.approx(2 / 3)
        else:
            assert (row.tp, row.fp, row.fn) == (2, 2, 2)
            assert row.accuracy == pytest.approx(1 / 3)
            assert row.precision == row.recall == row.f1 == pytest.approx(1 / 2)
            assert row.sq == pytest.approx(1.0)
            assert row.pq == pytest.approx(1 / 2)
    assert report.dsb_score == pytest.approx((4 * 3 / 5 + 6 * 1 / 3) / 10)
    # COCO: 4 IoU thresholds at recall 3/4 (precision 1 up to it: 76 of 101 recall points), 6 at 1/2 (51).
    for scores in report.coco.values():
        assert scores.ap50 == pytest.approx(76 / 101)
        assert scores.ap75 == pytest.approx(51 / 101)
        assert scores.ap == pytest.approx((4 * 76 + 6 * 51) / 1010)
        assert scores.ar == pytest.approx((4 * 3 / 4 + 6 * 1 / 2) / 10)


def test_iou_must_exceed_the_threshold() -> None:
    # 10x10 square against a 10x5 half: IoU exactly 0.5, which does not match at t = 0.5.
    true, pred = squares(12, [(0, 0)], 10), np.zeros((12, 12), np.int32)
    pred[:10, :5] = 1
    assert match_instances(label_overlaps(true, pred)).tp.tolist() == [0] * len(IOU_THRESHOLDS)


@pytest.mark.parametrize("n_true, n_pred, expected", [
    (0, 0, 1.0),  # nothing to find and nothing found
    (0, 2, 0.0),  # only false positives
    (2, 0, 0.0),  # only misses
])
def test_empty_truth_or_prediction(n_true: int, n_pred: int, expected: float) -> None:
    corners = [(2, 2), (20, 20)]
    true, pred = squares(32, corners[:n_true], 6), squares(32, corners[:n_pred], 6)
    report = evaluate([TruthRecord("e", label_image=true)], [prediction_from_labels("e", pred)])
    assert report.dsb_score == expected
    for row in report.microscopy:
        assert (row.tp, row.fp, row.fn) == (0, n_pred, n_true) or n_true == n_pred == 0
        assert all(getattr(row, f) == expected for f in MICROSCOPY_FIELDS)
    # COCO AP is undefined without true instances and 0 when every one is missed.
    assert all(math.isnan(s.ap) if n_true == 0 else s.ap == 0.0 for s in report.coco.values())


def test_dsb_score_averages_images_and_tables_sum_counts() -> None:
    full = squares(32, [(2, 2), (2, 20), (20, 2), (20, 20)], 6)
    half = squares(32, [(2, 2), (2, 20)], 6)
    empty = np.zeros((32, 32), np.int32)
    truths = [TruthRecord("empty", label_image=empty), TruthRecord("full", label_image=full)]
    predictions = [prediction_from_labels("full", half), prediction_from_labels("empty", empty)]
    report = evaluate(truths, predictions)
    assert [r.name for r in report.images] == ["empty", "full"]
    assert [r.dsb_score for r in report.images] == [1.0, 0.5]
    assert report.dsb_score == 0.75  # mean over images, as Kaggle scored
    assert report.headline.accuracy == 0.5  # 2 TP, 2 FN summed over both images


def test_disjoint_truth_masks_are_painted_like_a_label_image() -> None:
    labels = squares(32, [(2, 2), (2, 20), (20, 2)], 6)
    masks = labels[None] == np.arange(1, 4)[:, None, None]
    pred = squares(32, [(2, 3), (2, 20)], 6)
    from_labels = evaluate([TruthRecord("m", label_image=labels)], [prediction_from_labels("m", pred)])
    from_masks = evaluate([TruthRecord("m", masks=masks)], [prediction_from_labels("m", pred)])
    assert from_masks.microscopy == from_labels.microscopy
    assert from_masks.coco == from_labels.coco


def test_overlapping_truth_masks_use_mask_iou() -> None:
    a, b = np.zeros((2, 20, 20), bool)
    a[0:10, 0:10], b[5:15, 5:15] = True, True  # 100 px each, sharing 25
    truth = TruthRecord("o", masks=np.stack([a, b]))
    exact = evaluate([truth], [PredictionRecord(
        "o", masks=encode_masks(np.stack([a, b])), scores=np.array([.9, .8]))])
    assert_microscopy_perfect(exact)
    # A label image paints b over a: a keeps 75 of its 100 pixels (IoU 0.75, which is not > 0.75).
    painted = np.where(b, 2, np.where(a, 1, 0)).astype(np.int32)
    report = evaluate([truth], [prediction_from_labels("o", painted)])
    assert [r.tp for r in report.microscopy] == [2 if t < 0.75 else 1 for t in IOU_THRESHOLDS]


def test_greedy_matching_takes_the_best_pair_first() -> None:
    # Overlapping truths: one prediction has IoU 0.9 with truth 0 and 0.6 with truth 1.
    overlaps = metrics.Overlaps(np.arange(2), np.arange(2), np.array([0, 1, 1]), np.array([0, 0, 1]),
                                np.array([0.9, 0.6, 0.55]))
    assert match_instances(overlaps, [0.5]).tp.tolist() == [2]
    assert match_instances(overlaps, [0.5, 0.58]).tp.tolist() == [2, 1]


# --- COCO -----------------------------------------------------------------------------------------
def test_coco_counts_more_than_100_detections_per_image() -> None:
    labels = squares(200, [(y, x) for y in range(0, 200, 10) for x in range(0, 150, 10)], 8)  # 300 squares
    truth = [TruthRecord("dense", label_image=labels)]
    prediction = [prediction_from_labels("dense", labels, scores=np.linspace(1, 0.1, 300).tolist())]
    full = evaluate(truth, prediction, max_dets=3000)
    assert full.images[0].n_true == 300
    assert full.coco["mask"].ap == full.coco["box"].ap == 1.0
    capped = metrics.coco_metrics(truth, prediction, max_dets=100)
    assert capped["mask"].ap < 0.5  # COCO's default cap would hide two thirds of the nuclei


def _random_coco_case(seed: int) -> tuple[list[TruthRecord], list[PredictionRecord]]:
    """Overlapping random rectangles of every COCO area range, two classes, duplicates for IoU ties."""
    rng = np.random.default_rng(seed)

    def rectangles(n: int) -> np.ndarray:
        masks = np.zeros((n, 160, 160), bool)
        for mask in masks:
            y, x = rng.integers(0, 100, 2)
            mask[y:y + rng.integers(8, 110), x:x + rng.integers(8, 110)] = True
        return masks

    truths, predictions = [], []
    for i in range(3):
        true = rectangles(12)
        true[1] = true[0]  # identical truths: ties in IoU
        pred = np.concatenate([true[:8], rectangles(10)])
        pred[:8] &= rng.random(pred[:8].shape) < 0.9  # imperfect copies of the truth
        pred[-1] = pred[-2]  # identical detections
        truths.append(TruthRecord(f"i{i}", masks=true, labels=rng.integers(1, 3, 12)))
        predictions.append(PredictionRecord(f"i{i}", masks=encode_masks(pred), scores=rng.random(18),
                                            labels=rng.integers(1, 3, 18)))
    return truths, predictions


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_sparse_cocoeval_equals_pycocotools(seed: int, iou_type: str) -> None:
    truths, predictions = _random_coco_case(seed)
    images = [{"id": i + 1, "height": 160, "width": 160} for i in range(len(truths))]
    categories = [{"id": 1}, {"id": 2}]
    results = []
    for evaluator_class in (COCOeval, SparseCOCOeval):
        evaluator = evaluator_class(metrics._coco(images, categories, metrics._truth_annotations(truths)),
                                    metrics._coco(images, categories,
                                                  metrics._detection_annotations(predictions, iou_type)),
                                    iou_type)
        evaluator.params.maxDets = [1, 10, 15]  # 15 < 18 detections: the cap is exercised too
        with metrics._quiet():
            evaluator.evaluate()
            evaluator.accumulate()
        results.append(evaluator)
    stock, sparse = results
    for key in ("precision", "recall"):
        np.testing.assert_array_equal(sparse.eval[key], stock.eval[key])
    for a, b in zip(stock.evalImgs, sparse.evalImgs):
        assert (a is None) == (b is None)
        if a is not None:
            for key in ("dtIds", "gtIds", "dtScores"):
                assert a[key] == b[key]
            for key in ("dtMatches", "gtMatches", "dtIgnore", "gtIgnore"):
                np.testing.assert_array_equal(np.asarray(a[key], float), np.asarray(b[key], float))


# --- records, report, scale -----------------------------------------------------------------------
def test_input_errors_name_the_problem() -> None:
    labels = squares(20, [(2, 2)], 5)
    truth = [TruthRecord("a", label_image=labels)]
    with pytest.raises(UserError, match="no prediction for"):
        evaluate(truth, [prediction_from_labels("b", labels)])
    with pytest.raises(UserError, match="differs"):
        evaluate(truth, [prediction_from_labels("a", squares(24, [(2, 2)], 5))])
    with pytest.raises(UserError, match="2 scores for 1 instances"):
        evaluate(truth, [PredictionRecord("a", label_image=labels, scores=np.array([0.5, 0.4]))])
    with pytest.raises(UserError, match="label image or instance masks"):
        TruthRecord("c")


def test_report_json_table_and_summary(tmp_path: Path) -> None:
    labels = squares(32, [(2, 2), (2, 20)], 6)
    report = evaluate([TruthRecord("sample_1", label_image=labels)],
                      [prediction_from_labels("sample_1", squares(32, [(2, 2)], 6))])
    summary = report.summary()
    assert summary["mask_ap50"] == summary["box_ap50"] == pytest.approx(51 / 101)
    assert summary["dsb_score"] == summary["accuracy_50"] == summary["recall_50"] == 0.5
    assert math.isnan(summary["mask_ap_large"])
    path = tmp_path / "out" / "report.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["summary"]["mask_ap_large"] is None  # NaN is written as null: strict JSON
    assert data["images"][0]["name"] == "sample_1" and len(data["microscopy"]) == 10
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind
    table = report.format_table()
    for text in ("maxDets=3000", "DSB2018 score", "sample_1", " 0.95"):
        assert text in table


def test_dense_2048_image_with_2000_instances_runs() -> None:
    corners = [(y, x) for y in range(4, 2020, 44) for x in range(4, 2020, 44)]
    true = squares(2048, corners, 30)
    report = evaluate([TruthRecord("big", label_image=true)], [prediction_from_labels("big", np.roll(true, 3, 1))])
    assert report.images[0].n_true == len(corners) > 2000
    shifted_iou = (27 * 30) / (33 * 30)  # a 30x30 square moved 3 px
    assert [r.tp for r in report.microscopy] == [len(corners) if t < shifted_iou else 0 for t in IOU_THRESHOLDS]


def _dsb_sample() -> np.ndarray:
    paths = sorted((SHARED_DATA / "dsb2018-labels" / "masks").glob("*.png"))
    if not paths:
        pytest.skip(f"sample data not found under {SHARED_DATA}")
    from PIL import Image

    return np.array(Image.open(paths[0]))


def test_real_dsb_sample_against_itself_and_with_nuclei_removed() -> None:
    labels = _dsb_sample()
    n = len(np.unique(labels[labels > 0]))
    assert n == 369
    truth = [TruthRecord("dsb", label_image=labels)]
    same = evaluate(truth, [prediction_from_labels("dsb", labels)])
    assert_microscopy_perfect(same)
    assert same.coco["mask"].ap == same.coco["box"].ap == 1.0

    removed = np.where(np.isin(labels, np.arange(1, 370, 37)), 0, labels)  # 10 nuclei gone
    report = evaluate(truth, [prediction_from_labels("dsb", removed)])
    for row in report.microscopy:
        assert (row.tp, row.fp, row.fn) == (359, 0, 10)
        assert row.accuracy == pytest.approx(359 / 369)
    assert report.dsb_score == pytest.approx(359 / 369)
