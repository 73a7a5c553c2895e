"""Prediction outputs without a trained model: input expansion, tables, encodings, files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.io import read_label_image
from maskrcnn.errors import UserError
from maskrcnn.outputs.files import TABLE_FIELDS, coco_records, instance_table, kaggle_rows, write_prediction
from maskrcnn.outputs.plots import overlay_image
from maskrcnn.prediction.predict import expand_inputs, predict_files
from maskrcnn.structures import InstanceResult

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def result_from_labels(labels: np.ndarray, scores: list[float] | None = None) -> InstanceResult:
    """An InstanceResult whose label image is ``labels`` (ids 1..K), boxes from its pixels."""
    k = int(labels.max())
    boxes = torch.zeros(k, 4)
    for i in range(1, k + 1):
        ys, xs = np.nonzero(labels == i)
        boxes[i - 1] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    scores = torch.tensor(scores if scores is not None else np.linspace(0.9, 0.5, k), dtype=torch.float32)
    return InstanceResult(boxes, scores, torch.ones(k, dtype=torch.int64), torch.zeros(k, 1, 1),
                          torch.from_numpy(labels.astype(np.int32)))


@pytest.fixture
def labels() -> np.ndarray:
    """Three instances: one spans several columns (several runs), one has a hole, one is a pixel."""
    out = np.zeros((12, 10), np.int32)
    out[1:4, 1:7] = 1
    out[6:11, 2:7] = 2
    out[8, 4] = 0  # a hole
    out[11, 9] = 3
    return out


def decode_kaggle(encoded: str, shape: tuple[int, int]) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], bool)
    values = [int(v) for v in encoded.split()]
    for start, length in zip(values[::2], values[1::2]):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(shape, order="F")


# --- inputs -----------------------------------------------------------------------------------
@pytest.fixture
def image_tree(tmp_path):
    for rel in ("a/one.png", "a/two.tif", "a/sub/three.png", "b/four.jpg"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    return tmp_path


def test_expand_inputs_files_folders_and_globs(image_tree):
    a, b = image_tree / "a", image_tree / "b"
    assert expand_inputs([str(a)]) == [a / "one.png", a / "sub" / "three.png", a / "two.tif"]
    assert expand_inputs([str(b / "four.jpg"), str(a / "one.png")]) == [b / "four.jpg", a / "one.png"]
    assert expand_inputs([str(image_tree / "*" / "*.png")]) == [a / "one.png"]
    assert expand_inputs([str(image_tree / "**" / "*.png")]) == [a / "one.png", a / "sub" / "three.png"]
    # an image named twice (file and folder) is predicted once, at its first place
    assert expand_inputs([str(a / "two.tif"), str(a)]) == [a / "two.tif", a / "one.png", a / "sub" / "three.png"]


def test_expand_inputs_missing_path_is_a_user_error(image_tree):
    with pytest.raises(UserError, match="nope.png: no such file, folder or matching pattern"):
        expand_inputs([str(image_tree / "nope.png")])
    with pytest.raises(UserError, match="no such file"):
        expand_inputs([str(image_tree / "*.bmp")])


def test_predict_files_refuses_inputs_that_would_overwrite_each_other(image_tree, tmp_path):
    (image_tree / "b" / "one.png").write_bytes(b"x")
    with pytest.raises(UserError, match="one.png: same name as .*one.png.*overwrite"):
        predict_files(None, [str(image_tree / "a"), str(image_tree / "b")], tmp_path / "out")


def test_predict_files_with_no_images_is_a_user_error(image_tree, tmp_path):
    empty = image_tree / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images found in"):
        predict_files(None, [str(empty)], tmp_path / "out")


# --- tables and encodings -------------------------------------------------------------------------
def test_instance_table_rows_follow_the_label_image(labels):
    image = np.arange(labels.size, dtype=np.uint8).reshape(labels.shape)
    rows = instance_table(result_from_labels(labels), image, ["background", "nucleus"])
    assert [r["id"] for r in rows] == [1, 2, 3]
    for row in rows:
        mask = labels == row["id"]
        ys, xs = np.nonzero(mask)
        assert row["class"] == "nucleus" and row["area"] == mask.sum()
        assert row["centroid_x"] == pytest.approx(xs.mean(), abs=0.01)
        assert row["centroid_y"] == pytest.approx(ys.mean(), abs=0.01)
        assert row["mean_intensity"] == pytest.approx(image[mask].mean(), abs=0.001)
        assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert set(rows[0]) == set(TABLE_FIELDS)


def test_coco_records_decode_to_the_label_image(labels):
    records = coco_records(5, result_from_labels(labels, [0.9, 0.8, 0.7]))
    assert [r["score"] for r in records] == [0.9, 0.8, 0.7]
    for k, record in enumerate(records, start=1):
        assert record["image_id"] == 5 and record["category_id"] == 1
        assert isinstance(record["segmentation"]["counts"], str)  # JSON-ready
        assert np.array_equal(mask_utils.decode(record["segmentation"]).astype(bool), labels == k)
        x, y, w, h = record["bbox"]
        assert [x, y, w, h] == mask_utils.toBbox(record["segmentation"]).tolist()


def test_kaggle_rows_decode_to_the_label_image(labels):
    rows = kaggle_rows("img", result_from_labels(labels))
    assert [r["ImageId"] for r in rows] == ["img"] * 3
    for k, row in enumerate(rows, start=1):
        assert np.array_equal(decode_kaggle(row["EncodedPixels"], labels.shape), labels == k)
    assert rows[2]["EncodedPixels"] == f"{labels.size} 1"  # the last pixel, 1-based, column-major


def test_empty_result_gives_one_empty_kaggle_row_and_no_coco_records():
    empty = result_from_labels(np.zeros((8, 8), np.int32))
    assert kaggle_rows("img", empty) == [{"ImageId": "img", "EncodedPixels": ""}]
    assert coco_records(1, empty) == []


def test_overlay_draws_contours_only(labels):
    display = np.full((*labels.shape, 3), 7, np.uint8)
    out = overlay_image(display, labels)
    changed = (out != display).any(axis=2)
    assert not changed[labels == 0].any()  # background untouched
    assert changed[1, 1] and not changed[2, 3]  # rim drawn, interior kept
    assert changed[11, 9]  # a one-pixel instance is all rim


# --- files ------------------------------------------------------------------------------------------
def test_write_prediction_files(labels, tmp_path):
    image = (labels * 40).astype(np.uint8)
    normalized = torch.from_numpy(image / 255.0).float()[None]
    files = write_prediction(tmp_path, "cell", image, normalized, result_from_labels(labels), ["bg", "nucleus"])
    assert files.label_image.name == "cell_labels.png"
    with Image.open(files.label_image) as png:
        assert png.mode in ("I;16", "I")
    assert np.array_equal(read_label_image(files.label_image), labels)
    with Image.open(files.overlay) as overlay:
        assert overlay.mode == "RGB" and overlay.size == (labels.shape[1], labels.shape[0])
    with open(files.table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == [1, 2, 3]


def test_more_than_65535_instances_are_written_as_tiff(tmp_path):
    labels = np.arange(1, 256 * 257 + 1, dtype=np.int32).reshape(256, 257)  # 65792 one-pixel instances
    k = int(labels.max())
    xs, ys = np.meshgrid(np.arange(257), np.arange(256))
    boxes = torch.from_numpy(np.stack([xs, ys, xs + 1, ys + 1], axis=-1).reshape(-1, 4).astype(np.float32))
    result = InstanceResult(boxes, torch.ones(k), torch.ones(k, dtype=torch.int64), torch.zeros(k, 1, 1),
                            torch.from_numpy(labels))
    image = np.zeros(labels.shape, np.uint8)
    files = write_prediction(tmp_path, "dense", image, torch.zeros(1, *labels.shape), result, ["bg", "nucleus"])
    assert files.label_image.name == "dense_labels.tif"
    assert np.array_equal(read_label_image(files.label_image), labels)

