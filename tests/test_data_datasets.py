"""Dataset readers (DSB, labels, COCO), format detection and the real DSB2018 sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.datasets import CocoReader, DsbReader, LabelsReader, open_dataset
from maskrcnn.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RNG = np.random.default_rng(2)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def box_mask(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- DSB layout ----------------------------------------------------------------------------------

def make_dsb(root: Path) -> list[np.ndarray]:
    """Two samples: 'a' with two masks, an empty one and an overlap; 'b' with an empty masks folder."""
    masks = [box_mask((12, 16), 1, 5, 1, 6), box_mask((12, 16), 4, 10, 5, 15)]  # overlap at (4, 5)
    save(root / "a" / "images" / "a.png", RNG.integers(0, 255, (12, 16, 4), dtype=np.uint8))
    for i, mask in enumerate(masks):
        save(root / "a" / "masks" / f"m{i}.png", mask.astype(np.uint8) * 255)
    save(root / "a" / "masks" / "empty.png", np.zeros((12, 16), np.uint8))
    save(root / "b" / "images" / "b.png", RNG.integers(0, 255, (7, 9), dtype=np.uint8))
    (root / "b" / "masks").mkdir()  # an empty masks/ folder: no instances
    return masks


def test_dsb_reads_instances_drops_empty_masks_and_keeps_overlaps(tmp_path):
    expected = make_dsb(tmp_path)
    (tmp_path / "notes").mkdir()  # folders without images/ are not samples
    dataset = DsbReader(tmp_path)
    assert dataset.names == ["a", "b"] and len(dataset) == 2
    assert dataset.class_names == ["background", "nucleus"]
    a, b = dataset[0], dataset[-1]
    assert a.image.shape == (12, 16, 4) and a.masks.dtype == bool
    np.testing.assert_array_equal(a.masks, np.stack(expected))
    np.testing.assert_array_equal(a.labels, [1, 1])
    assert a.masks.sum(axis=0).max() == 2  # the overlapping pixel stays in both masks
    assert a.image_path == str(tmp_path / "a" / "images" / "a.png")
    assert b.masks.shape == (0, 7, 9) and b.labels.shape == (0,)
    with pytest.raises(IndexError):
        dataset[2]


def test_dsb_mask_of_wrong_size_names_the_mask(tmp_path):
    make_dsb(tmp_path)
    bad = save(tmp_path / "a" / "masks" / "wrong.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="5x5") as info:
        DsbReader(tmp_path)[0]
    assert info.value.path == str(bad)


def test_dsb_sample_without_masks_folder_is_refused_when_read_unless_allowed(tmp_path):
    make_dsb(tmp_path)
    save(tmp_path / "c" / "images" / "c.png", np.zeros((5, 6), np.uint8))  # a test-set sample
    dataset = open_dataset(tmp_path)  # the layout is fine: the sample is refused when read
    assert dataset.names == ["a", "b", "c"]
    assert len(dataset[0].masks) == 2 and len(dataset[1].masks) == 0
    with pytest.raises(DataError, match="no masks/ folder") as info:
        dataset[2]
    assert info.value.path == str(tmp_path / "c")
    allowed = open_dataset(tmp_path, allow_missing_masks=True)
    assert isinstance(allowed, DsbReader) and allowed[2].masks.shape == (0, 5, 6)
    assert len(allowed[0].masks) == 2  # samples with masks read as before


def test_dsb_masks_that_is_a_file_is_refused(tmp_path):
    make_dsb(tmp_path)
    (tmp_path / "b" / "masks").rmdir()
    (tmp_path / "b" / "masks").write_text("not a folder")
    with pytest.raises(DataError, match="not a folder") as info:
        DsbReader(tmp_path, allow_missing_masks=True)[1]
    assert info.value.path == str(tmp_path / "b" / "masks")


def test_dsb_reads_grey_masks_saved_in_colour_and_refuses_coloured_ones(tmp_path):
    expected = make_dsb(tmp_path)
    for i, mask in enumerate(expected):  # the same masks as an editor saves them
        grey = mask.astype(np.uint8) * 255
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)]) if i else np.dstack([grey] * 3)
        save(tmp_path / "a" / "masks" / f"m{i}.png", rgba)
    np.testing.assert_array_equal(DsbReader(tmp_path)[0].masks, np.stack(expected))
    coloured = np.dstack([expected[0].astype(np.uint8) * 255] + [np.zeros((12, 16), np.uint8)] * 2)  # red
    bad = save(tmp_path / "a" / "masks" / "m0.png", coloured)
    with pytest.raises(DataError, match="colour image whose channels differ") as info:
        DsbReader(tmp_path)[0]
    assert info.value.path == str(bad)


def test_dsb_without_samples_is_an_error(tmp_path):
    with pytest.raises(DataError, match="images"):
        DsbReader(tmp_path)


# --- labels layout -------------------------------------------------------------------------------

def test_labels_noncontiguous_ids_and_mixed_extensions(tmp_path):
    labels = np.zeros((10, 12), np.uint16)
    labels[1:4, 1:4], labels[5:9, 2:6], labels[0, 11] = 7, 300, 2
    save(tmp_path / "images" / "x.png", RNG.integers(0, 255, (10, 12), dtype=np.uint8))
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "x.tif", labels)
    dataset = LabelsReader(tmp_path)
    sample = dataset[0]
    assert sample.name == "x" and sample.masks.shape == (3, 10, 12)
    for mask, label_id in zip(sample.masks, [2, 7, 300]):  # increasing id order
        np.testing.assert_array_equal(mask, labels == label_id)
    np.testing.assert_array_equal(sample.labels, [1, 1, 1])


def test_labels_missing_mask_is_an_error_unless_allowed(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "images" / "b.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "masks" / "a.png", np.ones((4, 4), np.uint16))
    with pytest.raises(DataError, match="'b'"):
        LabelsReader(tmp_path)
    dataset = LabelsReader(tmp_path, allow_missing_masks=True)
    assert len(dataset[0].masks) == 1 and dataset[1].masks.shape == (0, 4, 4)


def test_labels_without_masks_folder(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="allow_missing_masks"):
        LabelsReader(tmp_path)
    assert len(LabelsReader(tmp_path, allow_missing_masks=True)[0].masks) == 0


def test_labels_reads_grey_label_image_saved_as_rgb(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[1:4, 1:4], labels[5:9, 2:6] = 3, 90
    save(tmp_path / "images" / "x.png", RNG.integers(0, 255, (10, 12), dtype=np.uint8))
    save(tmp_path / "masks" / "x.png", np.dstack([labels] * 3))
    masks = LabelsReader(tmp_path)[0].masks
    np.testing.assert_array_equal(masks, np.stack([labels == 3, labels == 90]))


def test_labels_size_mismatch_and_ambiguous_stems(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((4, 4), np.uint8))
    bad = save(tmp_path / "masks" / "a.png", np.ones((4, 5), np.uint16))
    with pytest.raises(DataError) as info:
        LabelsReader(tmp_path)[0]
    assert info.value.path == str(bad)
    np.save(tmp_path / "masks" / "a.npy", np.ones((4, 4), np.int32))
    with pytest.raises(DataError, match="two files named 'a'"):
        LabelsReader(tmp_path)


# --- COCO ----------------------------------------------------------------------------------------

def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    return {"size": list(mask.shape), "counts": np.diff(np.r_[0, changes]).tolist()}


def make_coco(tmp_path: Path) -> tuple[Path, dict, list[np.ndarray]]:
    """Two images; three annotations on the first (polygon, compressed and uncompressed RLE)."""
    shape = (20, 24)
    save(tmp_path / "imgs" / "one.png", RNG.integers(0, 255, (*shape, 3), dtype=np.uint8))
    save(tmp_path / "imgs" / "sub" / "two.png", RNG.integers(0, 255, shape, dtype=np.uint8))
    rle_mask = box_mask(shape, 10, 18, 3, 9) | box_mask(shape, 2, 4, 20, 23)  # two parts
    raw_mask = box_mask(shape, 12, 19, 14, 22)
    compressed = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    data = {
        "images": [{"id": 5, "file_name": "one.png", "height": 20, "width": 24},
                   {"id": 9, "file_name": "sub/two.png", "height": 20, "width": 24}],
        "categories": [{"id": 40, "name": "cell"}, {"id": 3, "name": "nucleus"}],
        "annotations": [
            # corners on pixel edges: rows 2..6 x columns 1..7, plus a part mostly off the image
            {"id": 1, "image_id": 5, "category_id": 40, "iscrowd": 0,
             "segmentation": [[1, 2, 8, 2, 8, 7, 1, 7], [22, 18, 30, 18, 30, 25, 22, 25]],
             "bbox": [1, 2, 100, 100]},
            {"id": 2, "image_id": 5, "category_id": 3, "iscrowd": 0, "segmentation": compressed},
            {"id": 3, "image_id": 5, "category_id": 40, "iscrowd": 0,
             "segmentation": uncompressed_rle(raw_mask)},
            {"id": 4, "image_id": 5, "category_id": 3, "iscrowd": 1, "segmentation": compressed},
            {"id": 5, "image_id": 9, "category_id": 3, "segmentation": [[1, 1, 2, 2]]},
        ],
    }
    polygon_mask = box_mask(shape, 2, 7, 1, 8) | box_mask(shape, 18, 20, 22, 24)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, data, [polygon_mask, rle_mask, raw_mask]


def test_coco_polygons_and_rle_round_trip(tmp_path):
    path, _, expected = make_coco(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 annotation"):
        dataset = CocoReader(path, tmp_path / "imgs")
    assert dataset.class_names == ["background", "nucleus", "cell"]  # category ids 3 < 40
    assert dataset.names == ["one", "sub/two"]
    assert dataset.skipped == [(5, "no polygon with 3 or more finite points")]
    sample = dataset[0]
    np.testing.assert_array_equal(sample.masks, np.stack(expected))
    np.testing.assert_array_equal(sample.labels, [2, 1, 2])  # crowd annotation 4 skipped
    assert dataset[1].masks.shape == (0, 20, 24)


def write_coco(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/passwd", "a/../../b.png", "C:\\x.png"])
def test_coco_file_names_escaping_the_image_folder_are_rejected(tmp_path, file_name):
    _, data, _ = make_coco(tmp_path)
    data["images"][1]["file_name"] = file_name
    with pytest.raises(DataError, match="escapes the image folder"):
        CocoReader(write_coco(tmp_path, data), tmp_path / "imgs")


@pytest.mark.parametrize("change, words", [
    (lambda d: d.pop("images"), "missing key 'images'"),
    (lambda d: d["images"][0].pop("height"), "images\\[0\\] lacks 'height'"),
    (lambda d: d["annotations"][0].pop("segmentation"), "lacks 'segmentation'"),
    (lambda d: d["annotations"][1].update(category_id=99), "unknown category_id 99"),
    (lambda d: d["annotations"][1].update(image_id=77), "unknown image_id 77"),
    (lambda d: d["categories"].append({"id": 3, "name": "again"}), "appears twice"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "x"}), "segmentation must be"),
])
def test_coco_structural_problems_raise_data_error(tmp_path, change, words):
    _, data, _ = make_coco(tmp_path)
    change(data)
    path = write_coco(tmp_path, data)
    with pytest.raises(DataError, match=words) as info:
        CocoReader(path, tmp_path / "imgs")
    assert info.value.path == str(path)


@pytest.mark.parametrize("change, words", [
    (lambda d: d["annotations"][1].update(category_id=99), "annotation 2 has unknown category_id 99"),
    (lambda d: d["annotations"][1].update(image_id=77), "annotation 2 refers to unknown image_id 77"),
])
def test_coco_skip_bad_leaves_out_annotations_with_unknown_ids_and_lists_them(tmp_path, change, words):
    _, data, expected = make_coco(tmp_path)
    change(data)
    path = write_coco(tmp_path, data)
    with pytest.raises(DataError, match="--skip-bad"):  # refused by default, with the way out
        CocoReader(path, tmp_path / "imgs")
    with pytest.warns(UserWarning) as caught:
        dataset = open_dataset(path, image_dir=tmp_path / "imgs", skip_bad=True)
    assert any("left out 1 annotation" in str(w.message) and words in str(w.message) for w in caught)
    assert isinstance(dataset, CocoReader)
    assert dataset.left_out == [("annotation 2", f"{path}: {words}")]
    sample = dataset[0]  # the image keeps its other annotations
    np.testing.assert_array_equal(sample.masks, np.stack([expected[0], expected[2]]))
    np.testing.assert_array_equal(sample.labels, [2, 2])
    assert dataset.class_names == ["background", "nucleus", "cell"]


def test_readers_without_anything_left_out_say_so(tmp_path):
    make_dsb(tmp_path / "dsb")
    path, _, _ = make_coco(tmp_path / "coco")
    with pytest.warns(UserWarning, match="skipped 1 annotation"):  # the short polygon, as always
        coco = open_dataset(path, image_dir=tmp_path / "coco" / "imgs", skip_bad=True)
    assert coco.left_out == []
    assert list(open_dataset(tmp_path / "dsb", skip_bad=True).left_out) == []


def test_coco_image_size_disagreeing_with_json_names_the_image(tmp_path):
    _, data, _ = make_coco(tmp_path)
    data["images"][0]["width"] = 25
    with pytest.warns(UserWarning):
        dataset = CocoReader(write_coco(tmp_path, data), tmp_path / "imgs")
    with pytest.raises(DataError, match="says 20x25") as info:
        dataset[0]
    assert info.value.path == str(tmp_path / "imgs" / "one.png")


@pytest.mark.parametrize("segmentation, words", [
    ({"size": [20, 24], "counts": [5, 5]}, "do not cover"),
    ({"size": [20, 24], "counts": [470, -10, 20]}, "do not cover"),
    ({"size": [20, 24], "counts": "!!!"}, "do not cover"),
    ({"size": [20, 24], "counts": "zzzzzzzzzzzzz"}, "do not cover"),
    ({"size": [24, 20], "counts": [480]}, "RLE size"),
])
def test_coco_bad_rle_is_reported_when_read(tmp_path, segmentation, words):
    _, data, _ = make_coco(tmp_path)
    data["annotations"][2]["segmentation"] = segmentation
    with pytest.warns(UserWarning):
        dataset = CocoReader(write_coco(tmp_path, data), tmp_path / "imgs")
    with pytest.raises(DataError, match=words):
        dataset[0]


def test_coco_invalid_json_and_missing_annotations(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoReader(bad, tmp_path)
    _, data, _ = make_coco(tmp_path)
    del data["annotations"]  # a test-set image list: images without instances
    dataset = CocoReader(write_coco(tmp_path, data), tmp_path / "imgs")
    assert [len(dataset[i].masks) for i in range(2)] == [0, 0]


# --- format detection ----------------------------------------------------------------------------

def test_open_dataset_detects_each_layout(tmp_path):
    make_dsb(tmp_path / "dsb")
    save(tmp_path / "labels" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "labels" / "masks" / "a.png", np.ones((4, 4), np.uint16))
    coco_path, _, _ = make_coco(tmp_path / "coco")
    assert isinstance(open_dataset(tmp_path / "dsb"), DsbReader)
    assert isinstance(open_dataset(tmp_path / "labels"), LabelsReader)
    with pytest.warns(UserWarning):
        coco = open_dataset(coco_path, image_dir=tmp_path / "coco" / "imgs")
    assert isinstance(coco, CocoReader)
    assert isinstance(open_dataset(tmp_path / "dsb", format="dsb"), DsbReader)


def test_open_dataset_asks_for_format_when_unsure(tmp_path):
    (tmp_path / "empty").mkdir()
    make_dsb(tmp_path / "both")
    (tmp_path / "both" / "images").mkdir()
    for folder in ("empty", "both"):
        with pytest.raises(DataError, match="--format"):
            open_dataset(tmp_path / folder)
    with pytest.raises(DataError, match="unknown dataset format"):
        open_dataset(tmp_path / "both", format="voc")
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "nope")


# --- real DSB2018 sample -------------------------------------------------------------------------

@pytest.mark.slow
def test_real_sample_reads_the_same_in_both_layouts():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not found at {SHARED_DATA}")
    labels = open_dataset(SHARED_DATA / "dsb2018-labels")[0]
    kaggle = open_dataset(SHARED_DATA / "dsb2018-kaggle-layout")[0]
    assert labels.name == kaggle.name and labels.image.shape == (520, 696, 3)
    np.testing.assert_array_equal(labels.image, kaggle.image)
    assert len(labels.masks) == len(kaggle.masks) == 369

    def canonical(masks: np.ndarray) -> np.ndarray:  # order instances by their first pixel
        return masks[np.argsort(masks.reshape(len(masks), -1).argmax(axis=1))]

    np.testing.assert_array_equal(canonical(labels.masks), canonical(kaggle.masks))
