"""A corpus of bad and unusual inputs, run through the ``maskrcnn`` command.

Each case builds its input under ``tmp_path`` (nothing binary is stored in the repository) and
states what the command must do with it: either handle it (``problem=None``; the handling is
listed in the README's Troubleshooting section) or fail with exit code 2 and one line on stderr
that names the file and the problem, with no traceback. Training checks every sample's files and
sizes before the first step, and with ``--check-data`` reads every sample, so a bad sample stops
``train`` at once wherever it sits in the dataset (one that passes the cheap check stops it when
first read: tests/test_data_check.py); with ``--skip-bad`` the bad samples are skipped and listed
in RUN_DIR/skipped.txt. ``predict`` reports each bad image on its own line and writes the others.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.data.io import read_label_image
from maskrcnn.data.writers import write_image, write_label_image
from maskrcnn.data.synthetic import synth_nuclei

from cli_helpers import cli
from conftest import TINY_RUN as TINY  # open thresholds: an untrained model's outputs are not all empty

FAST = ["--crop", "64", "--device", "cpu", "--no-progress"]

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.usefixtures("one_torch_thread")]


def check_one_line_error(code: int, err: str, named: object, problem: str) -> None:
    """Exit code 2; stderr is exactly one line naming the file and the problem; no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("maskrcnn: "), err
    assert "Traceback" not in err
    assert str(named) in err and problem in err, err


# --- building blocks ------------------------------------------------------------------------------
def nuclei(shape: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small uint8 image and its label image (ids 1..N)."""
    return synth_nuclei(shape, np.random.default_rng(seed), n_range=(3, 8), diameter_range=(6.0, 20.0))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


class _RunsCommand:
    """Pickles as ``os.system(command)``: unpickling it would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def marker_command(folder: Path) -> tuple[str, Path]:
    """A shell command that leaves a file behind if anything ever runs it."""
    marker = folder / "CODE_WAS_RUN"
    return f"touch {marker}", marker


# --- image files: bad ones, and unusual ones that are handled ---------------------------------------
# Each writes one image file at ``stem`` + its own extension and returns (path, its label image or None).
def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def img_png_zero_bytes(stem: Path):
    return _write(stem.with_suffix(".png"), b""), None


def img_png_truncated(stem: Path):
    return _write(stem.with_suffix(".png"), png_bytes(nuclei()[0])[:300]), None


def img_tiff_zero_bytes(stem: Path):
    return _write(stem.with_suffix(".tif"), b""), None


def img_tiff_truncated(stem: Path):
    data = tiff_bytes(nuclei()[0].astype(np.uint16) * 16)
    return _write(stem.with_suffix(".tif"), data[: len(data) // 2]), None


def img_tiff_header_only(stem: Path):
    return _write(stem.with_suffix(".tif"), tiff_bytes(nuclei()[0])[:8]), None


def img_not_an_image(stem: Path):
    return _write(stem.with_suffix(".png"), b"name,area\nnucleus,40\n"), None


def img_npy_with_code(stem: Path):
    """An object array whose pickle runs a command: refused unread (allow_pickle=False)."""
    command, _ = marker_command(stem.parent)
    path = stem.with_suffix(".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([_RunsCommand(command)], dtype=object), allow_pickle=True)
    return path, None


def img_smaller_than_stride(stem: Path):
    image = np.zeros((12, 10), np.uint8)
    image[3:9, 2:8] = 200
    labels = np.zeros((12, 10), np.int32)
    labels[3:9, 2:8] = 1
    return _write(stem.with_suffix(".png"), png_bytes(image)), labels


def img_extreme_aspect(stem: Path):
    image, labels = nuclei((16, 4000), seed=3)
    return _write(stem.with_suffix(".png"), png_bytes(image)), labels


def img_float_tiff_nan_inf(stem: Path):
    image, labels = nuclei(seed=4)
    values = image.astype(np.float32) / 255
    values[:5] = np.nan  # a masked stripe, as stitched float mosaics have
    values[10, 10], values[20, 30] = np.inf, -np.inf
    return _write(stem.with_suffix(".tif"), tiff_bytes(values)), labels


def img_sixteen_bit_tiny_range(stem: Path):
    image, labels = nuclei(seed=5)
    return _write(stem.with_suffix(".tif"), tiff_bytes((image // 64).astype(np.uint16) + 1000)), labels


@dataclass(frozen=True)
class ImageCase:
    write: Callable[[Path], tuple[Path, np.ndarray | None]]
    problem: str | None  # None: handled


IMAGE_CASES = {
    "png_zero_bytes": ImageCase(img_png_zero_bytes, "empty file (0 bytes)"),
    "png_truncated": ImageCase(img_png_truncated, "cannot read image"),
    "tiff_zero_bytes": ImageCase(img_tiff_zero_bytes, "empty file (0 bytes)"),
    "tiff_truncated": ImageCase(img_tiff_truncated, "cannot read image"),
    "tiff_header_only": ImageCase(img_tiff_header_only, "cannot read image"),
    "not_an_image": ImageCase(img_not_an_image, "cannot read image"),
    "npy_with_code": ImageCase(img_npy_with_code, "cannot read image"),
    "smaller_than_stride": ImageCase(img_smaller_than_stride, None),
    "extreme_aspect_16x4000": ImageCase(img_extreme_aspect, None),
    "float_tiff_nan_inf": ImageCase(img_float_tiff_nan_inf, None),
    "sixteen_bit_narrow_range": ImageCase(img_sixteen_bit_tiny_range, None),
}
BAD_IMAGES = [name for name, case in IMAGE_CASES.items() if case.problem]


# --- datasets: one sample each (a single image trains on a band of itself, validates on the rest) ---
def labels_layout(root: Path, image_case: ImageCase) -> Path:
    """ROOT/images/x.EXT + ROOT/masks/x.png from an image case; returns the image path."""
    image_path, labels = image_case.write(root / "images" / "x")
    if labels is None:
        labels = nuclei()[1]
    write_label_image(root / "masks" / "x.png", labels.astype(np.uint16))
    return image_path


def labels_sample(root: Path, image: np.ndarray, mask_path: str = "x.png") -> Path:
    write_image(root / "images" / "x.png", image)
    return root / "masks" / mask_path


def ds_mask_size_mismatch(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image)
    write_label_image(mask, labels[:60].astype(np.uint16))
    return [root], mask


def ds_label_image_rgb_grey(root: Path):
    """A grey label image saved as RGB by an image editor (R == G == B): read as its ids."""
    image, labels = nuclei()
    mask = labels_sample(root, image)
    _write(mask, png_bytes(np.stack([labels.astype(np.uint8)] * 3, axis=-1)))
    return [root], mask


def ds_label_image_rgba_grey(root: Path):
    """The same as RGBA: opaque instances on a transparent background that stores white."""
    image, labels = nuclei()
    mask = labels_sample(root, image)
    grey = np.where(labels > 0, labels, 255).astype(np.uint8)
    alpha = np.where(labels > 0, 255, 0).astype(np.uint8)
    _write(mask, png_bytes(np.stack([grey, grey, grey, alpha], axis=-1)))
    return [root], mask


def ds_label_image_colour_coded(root: Path):
    """A label image drawn with one colour per instance: the channels differ, refused."""
    image, labels = nuclei()
    mask = labels_sample(root, image)
    palette = np.array([[0, 0, 0]] + [[40 * i % 256, 255 - 30 * i, 90] for i in range(1, labels.max() + 1)],
                       dtype=np.uint8)
    _write(mask, png_bytes(palette[labels]))
    return [root], mask


def ds_label_image_fractional(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image, "x.tif")
    _write(mask, tiff_bytes(labels.astype(np.float32) * 1.5))
    return [root], mask


def ds_label_image_truncated(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image)
    _write(mask, png_bytes(labels.astype(np.uint16))[:120])
    return [root], mask


def ds_empty_label_image(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image)
    write_label_image(mask, np.zeros_like(labels, dtype=np.uint16))
    return [root], mask


def ds_noncontiguous_ids(root: Path):
    image, labels = nuclei()
    ids = np.array([0, 3, 70, 1000, 65535, 9, 12, 40, 41])
    mask = labels_sample(root, image)
    write_label_image(mask, ids[labels].astype(np.uint16))
    return [root], mask


def dsb_sample(root: Path, masks: list[np.ndarray], image: np.ndarray | None = None) -> list[Path]:
    write_image(root / "x" / "images" / "x.png", nuclei()[0] if image is None else image)
    paths = []
    for i, mask in enumerate(masks):
        paths.append(_write(root / "x" / "masks" / f"m{i}.png", png_bytes(mask.astype(np.uint8) * 255)))
    return paths


def dsb_masks() -> list[np.ndarray]:
    labels = nuclei()[1]
    return [labels == i for i in range(1, labels.max() + 1)]


def ds_dsb_mask_size_mismatch(root: Path):
    masks = dsb_masks()
    masks[1] = masks[1][:, :50]
    return [root, "--format", "dsb"], dsb_sample(root, masks)[1]


def ds_dsb_mask_not_an_image(root: Path):
    paths = dsb_sample(root, dsb_masks())
    paths[0].write_text("not a mask")
    return [root, "--format", "dsb"], paths[0]


def ds_dsb_empty_mask(root: Path):
    masks = dsb_masks()
    masks.append(np.zeros_like(masks[0]))
    return [root, "--format", "dsb"], dsb_sample(root, masks)[-1]


def dsb_colour(mask: np.ndarray, colour: tuple[int, ...]) -> bytes:
    """A DSB instance mask as an image editor saves it: ``colour`` on the instance, black elsewhere
    (with an opaque alpha when ``colour`` has four values)."""
    pixels = np.zeros((*mask.shape, len(colour)), np.uint8)
    pixels[mask] = colour
    if len(colour) == 4:
        pixels[..., 3] = 255
    return png_bytes(pixels)


def ds_dsb_masks_rgb_grey(root: Path):
    paths = dsb_sample(root, masks := dsb_masks())
    for i, (path, mask) in enumerate(zip(paths, masks)):
        path.write_bytes(dsb_colour(mask, (255, 255, 255) if i % 2 else (255, 255, 255, 255)))
    return [root, "--format", "dsb"], paths[0]


def ds_dsb_mask_coloured(root: Path):
    paths = dsb_sample(root, masks := dsb_masks())
    paths[1].write_bytes(dsb_colour(masks[1], (255, 0, 0)))
    return [root, "--format", "dsb"], paths[1]


def ds_dsb_no_masks_folder(root: Path):
    """A test-set sample (no masks/) given as training data."""
    write_image(root / "x" / "images" / "x.png", nuclei()[0])
    return [root, "--format", "dsb"], root / "x"


def ds_dsb_empty_masks_folder(root: Path):
    """An existing but empty masks/ folder: an image with no instances."""
    write_image(root / "x" / "images" / "x.png", nuclei()[0])
    (root / "x" / "masks").mkdir()
    return [root, "--format", "dsb"], root / "x" / "masks"


def ds_dsb_holes_and_components(root: Path):
    ring = np.zeros((64, 64), bool)
    ring[10:30, 10:30] = True
    ring[15:25, 15:25] = False  # a hole
    pieces = np.zeros((64, 64), bool)
    pieces[40:50, 5:15] = pieces[40:50, 45:60] = True  # two components of one instance
    image = ((ring | pieces) * 180 + 20).astype(np.uint8)
    return [root, "--format", "dsb"], dsb_sample(root, [ring, pieces], image)[0]


# --- COCO ------------------------------------------------------------------------------------------
def coco_data(root: Path, image_shape: tuple[int, int] = (64, 64)) -> dict:
    """A valid COCO dataset of one image with two polygon instances; the JSON is not yet written."""
    image, _ = nuclei(image_shape)
    write_image(root / "images" / "a.png", image)
    h, w = image_shape
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "nucleus"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10],
             "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 12, 8],
             "segmentation": [[30, 30, 42, 30, 42, 38, 30, 38]]},
        ],
    }


def coco(root: Path, data: dict | str) -> tuple[list, Path]:
    path = root / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return [path, "--images", root / "images"], path


def ds_coco_missing_categories(root: Path):
    data = coco_data(root)
    del data["categories"]
    return coco(root, data)


def ds_coco_annotation_lacks_segmentation(root: Path):
    data = coco_data(root)
    del data["annotations"][1]["segmentation"]
    return coco(root, data)


def ds_coco_unknown_category(root: Path):
    data = coco_data(root)
    data["annotations"][0]["category_id"] = 99
    return coco(root, data)


def ds_coco_unhashable_category(root: Path):
    data = coco_data(root)
    data["annotations"][0]["category_id"] = [1]
    return coco(root, data)


def ds_coco_height_not_a_number(root: Path):
    data = coco_data(root)
    data["images"][0]["height"] = "64"
    return coco(root, data)


def ds_coco_not_json(root: Path):
    coco_data(root)
    return coco(root, '{"images": [')


def ds_coco_file_name_escapes(root: Path):
    data = coco_data(root)
    data["images"][0]["file_name"] = "../../x.png"
    return coco(root, data)


def ds_coco_image_missing(root: Path):
    data = coco_data(root)
    data["images"][0]["file_name"] = "gone.png"
    args, _ = coco(root, data)
    return args, root / "images" / "gone.png"


def ds_coco_image_size_disagrees(root: Path):
    data = coco_data(root)
    data["images"][0]["height"] = 50
    args, _ = coco(root, data)
    return args, root / "images" / "a.png"


def ds_coco_bad_rle(root: Path):
    data = coco_data(root)
    data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": [100, 20]}
    return coco(root, data)


def ds_coco_boxes_outside_image(root: Path):
    data = coco_data(root)
    data["annotations"][0].update(bbox=[50, 50, 400, 400],  # bbox is ignored; masks give the boxes
                                  segmentation=[[50, 50, 300, 50, 300, 300, 50, 300]])  # clipped
    data["annotations"].append({"id": 3, "image_id": 1, "category_id": 1, "bbox": [-90, -90, 10, 10],
                                "segmentation": [[-90, -90, -80, -90, -80, -80]]})  # wholly outside: dropped
    return coco(root, data)


def ds_coco_polygon_two_points(root: Path):
    data = coco_data(root)
    data["annotations"][1]["segmentation"] = [[30, 30, 42, 30]]  # skipped, with a warning
    return coco(root, data)


# --- configuration -----------------------------------------------------------------------------------
def config_case(text: str):
    def build(root: Path):
        image, labels = nuclei()
        write_image(root / "data" / "images" / "x.png", image)
        write_label_image(root / "data" / "masks" / "x.png", labels.astype(np.uint16))
        path = root / "bad.yaml"
        path.write_text(text.replace("MARKER", str(root / "CODE_WAS_RUN")))
        return [root / "data", "--config", path], path
    return build


@dataclass(frozen=True)
class DataCase:
    build: Callable[[Path], tuple[list, Path]]  # -> (--data VALUE [more flags], the file to be named)
    problem: str | None  # None: handled
    per_sample: bool = False  # --skip-bad skips it


def image_data_case(name: str) -> DataCase:
    case = IMAGE_CASES[name]
    return DataCase(lambda root: ([root], labels_layout(root, case)), case.problem, per_sample=bool(case.problem))


DATA_CASES = {
    **{f"image_{name}": image_data_case(name) for name in IMAGE_CASES},
    "mask_size_mismatch": DataCase(ds_mask_size_mismatch, "mask is 60x64 (HxW) but its image is 64x64", True),
    "label_image_rgb_grey": DataCase(ds_label_image_rgb_grey, None),
    "label_image_rgba_grey": DataCase(ds_label_image_rgba_grey, None),
    "label_image_colour_coded": DataCase(ds_label_image_colour_coded, "mask is a colour image whose channels differ",
                                         True),
    "label_image_fractional": DataCase(ds_label_image_fractional, "non-integer values", True),
    "label_image_truncated": DataCase(ds_label_image_truncated, "cannot read image", True),
    "empty_label_image": DataCase(ds_empty_label_image, None),
    "noncontiguous_ids": DataCase(ds_noncontiguous_ids, None),
    "dsb_mask_size_mismatch": DataCase(ds_dsb_mask_size_mismatch, "mask is 64x50 (HxW) but its image is 64x64", True),
    "dsb_mask_not_an_image": DataCase(ds_dsb_mask_not_an_image, "cannot read image", True),
    "dsb_empty_mask": DataCase(ds_dsb_empty_mask, None),
    "dsb_holes_and_components": DataCase(ds_dsb_holes_and_components, None),
    "dsb_masks_rgb_grey": DataCase(ds_dsb_masks_rgb_grey, None),
    "dsb_mask_coloured": DataCase(ds_dsb_mask_coloured, "mask is a colour image whose channels differ", True),
    "dsb_no_masks_folder": DataCase(ds_dsb_no_masks_folder, "sample has no masks/ folder", True),
    "dsb_empty_masks_folder": DataCase(ds_dsb_empty_masks_folder, None),
    "coco_missing_categories": DataCase(ds_coco_missing_categories, "missing key 'categories'"),
    "coco_annotation_lacks_segmentation": DataCase(ds_coco_annotation_lacks_segmentation, "lacks 'segmentation'"),
    "coco_unknown_category": DataCase(ds_coco_unknown_category, "unknown category_id 99"),
    "coco_unhashable_category": DataCase(ds_coco_unhashable_category, "category_id"),
    "coco_height_not_a_number": DataCase(ds_coco_height_not_a_number, "height"),
    "coco_not_json": DataCase(ds_coco_not_json, "not valid JSON"),
    "coco_file_name_escapes": DataCase(ds_coco_file_name_escapes, "escapes the image folder"),
    "coco_image_missing": DataCase(ds_coco_image_missing, "no such file", True),
    "coco_image_size_disagrees": DataCase(ds_coco_image_size_disagrees, "ann.json says 50x64", True),
    "coco_bad_rle": DataCase(ds_coco_bad_rle, "bad RLE", True),
    "coco_boxes_outside_image": DataCase(ds_coco_boxes_outside_image, None),
    "coco_polygon_two_points": DataCase(ds_coco_polygon_two_points, None),
    "config_wrong_type": DataCase(config_case("fpn_channels: wide\n"), "fpn_channels has the wrong type"),
    "config_impossible_threshold": DataCase(config_case("rpn_train_fg_thresh_low: 1.5\n"), "rpn_train_fg_thresh_low"),
    "config_negative_size": DataCase(config_case("mask_size: -28\n"), "mask_size"),
    "config_level_lists_disagree": DataCase(config_case("rpn_scales: [4, 8]\n"), "rpn_scales"),
    "config_unknown_field": DataCase(config_case("fpn_chanels: 64\n"), "unknown field(s) fpn_chanels"),
    "config_not_a_mapping": DataCase(config_case("- resnet18\n"), "expected a mapping"),
    "config_not_yaml": DataCase(config_case("backbone: [resnet18\n"), "not valid YAML"),
    "config_python_object": DataCase(config_case("backbone: !!python/object/apply:os.system ['touch MARKER']\n"),
                                     "not valid YAML"),
}


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# a case that training handles trains a step (a second or two): slow; a refused one stops before the first step
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if case.problem is None else name
                                  for name, case in DATA_CASES.items()])
def test_train_on_corpus_case(name, tiny_yaml, tmp_path, capsys):
    case = DATA_CASES[name]
    root = tmp_path / "case"
    data_args, named = case.build(root)
    config = [] if "--config" in data_args else ["--config", tiny_yaml]
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", *data_args, "--out", run, *config, "--iters", "1",
                         "--batch-size", "1", "--val-every", "1000", *FAST)
    assert not (root / "CODE_WAS_RUN").exists()
    if case.problem is None:
        assert code == 0, err
        assert "Traceback" not in err
        assert "trained 1 steps" in out
        assert load_checkpoint(run / "last.pt").step == 1
    else:
        check_one_line_error(code, err, named, case.problem)
        assert not (run / "last.pt").exists()


# --- --skip-bad: every per-sample case in one dataset ---------------------------------------------------
def merged_labels_dataset(tmp_path: Path, names: list[str], good: int = 2) -> Path:
    """One labels-layout dataset holding sample NAME for each labels-layout case, plus ``good`` good samples."""
    root = tmp_path / "merged"
    for name in names:
        case_root = tmp_path / "cases" / name
        DATA_CASES[name].build(case_root)
        for folder in ("images", "masks"):
            for file in (case_root / folder).iterdir():
                _write(root / folder / f"{name}{file.suffix}", file.read_bytes())
    for i in range(good):
        image, labels = nuclei(seed=10 + i)
        write_image(root / "images" / f"good{i}.png", image)
        write_label_image(root / "masks" / f"good{i}.png", labels.astype(np.uint16))
    return root


LABELS_LAYOUT_BAD = [name for name, case in DATA_CASES.items()
                     if case.problem and case.per_sample and name.startswith(("image_", "label_", "mask_"))]


def test_train_fails_fast_on_a_bad_sample_it_has_not_reached_yet(tmp_path, tiny_yaml, capsys):
    """The --check-data scan before the first step finds the bad sample, whichever batch it would be in."""
    root = merged_labels_dataset(tmp_path, ["image_png_truncated"], good=6)
    code, _, err = cli(capsys, "train", "--data", root, "--out", tmp_path / "run", "--config", tiny_yaml,
                       "--iters", "1", "--batch-size", "1", "--check-data", *FAST)
    check_one_line_error(code, err, root / "images" / "image_png_truncated.png", "cannot read image")
    assert "--skip-bad" in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_train_skip_bad_skips_and_lists_every_bad_sample(tmp_path, tiny_yaml, capsys):
    root = merged_labels_dataset(tmp_path, LABELS_LAYOUT_BAD)
    val = merged_labels_dataset(tmp_path / "val", ["image_tiff_truncated"], good=1)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipped {len(LABELS_LAYOUT_BAD)} unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", root, "--val", val, "--out", run, "--config", tiny_yaml,
                             "--iters", "1", "--batch-size", "2", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    listed = dict(line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines())
    assert sorted(listed) == sorted(LABELS_LAYOUT_BAD)
    for name, line in listed.items():
        assert DATA_CASES[name].problem in line, line
    assert (run / "skipped_val.txt").read_text().startswith("image_tiff_truncated\t")
    assert load_checkpoint(run / "last.pt").step == 1


@pytest.mark.slow
def test_train_skip_bad_skips_bad_coco_images(tmp_path, tiny_yaml, capsys):
    root = tmp_path / "coco"
    data = coco_data(root)
    good = data["images"][0]
    for i, (name, change) in enumerate([("gone", {"file_name": "gone.png"}), ("short", {"height": 50}),
                                        ("good2", {})], start=2):
        if not change:
            write_image(root / "images" / "good2.png", nuclei(seed=i)[0])
        data["images"].append({**good, "id": i, "file_name": f"{name}.png", **change})
    write_image(root / "images" / "short.png", nuclei(seed=9)[0])
    bad_rle = {**data["annotations"][0], "id": 9, "image_id": 4, "segmentation": {"size": [64, 64], "counts": [5]}}
    data["annotations"].append(bad_rle)  # image 4 ("good2") now has a bad RLE
    args, _ = coco(root, data)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 3 unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", *args, "--out", run, "--config", tiny_yaml, "--iters", "1",
                             "--batch-size", "1", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    listed = (run / "skipped.txt").read_text()
    assert "gone\t" in listed and "no such file" in listed
    assert "short\t" in listed and "says 50x64" in listed
    assert "good2\t" in listed and "bad RLE" in listed


@pytest.mark.slow
def test_train_skip_bad_skips_and_lists_bad_dsb_samples(tmp_path, tiny_yaml, capsys):
    """A DSB folder holding every per-sample DSB case (one sample folder each) and two good ones."""
    root = tmp_path / "dsb"
    bad = [name for name, case in DATA_CASES.items() if case.problem and case.per_sample and name.startswith("dsb_")]
    assert "dsb_no_masks_folder" in bad and "dsb_mask_coloured" in bad
    root.mkdir()
    for name in bad + ["dsb_holes_and_components", "dsb_empty_masks_folder"]:
        DATA_CASES[name].build(tmp_path / "cases" / name)
        (tmp_path / "cases" / name / "x").rename(root / name)  # the sample folder is named after its case
    code, _, err = cli(capsys, "train", "--data", root, "--format", "dsb", "--out", tmp_path / "refused",
                       "--config", tiny_yaml, "--iters", "1", "--batch-size", "1", "--check-data", *FAST)
    check_one_line_error(code, err, root, "(train --skip-bad skips bad samples)")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipped {len(bad)} unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", root, "--format", "dsb", "--out", run, "--config", tiny_yaml,
                             "--iters", "1", "--batch-size", "1", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    listed = dict(line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines())
    assert sorted(listed) == sorted(bad)
    for name, line in listed.items():
        assert DATA_CASES[name].problem in line, line
    assert f"{root / 'dsb_no_masks_folder'}: sample has no masks/ folder" in listed["dsb_no_masks_folder"]
    assert load_checkpoint(run / "last.pt").step == 1


@pytest.mark.slow
def test_train_skip_bad_leaves_out_coco_annotations_of_unknown_categories_and_lists_them(tmp_path, tiny_yaml,
                                                                                         capsys):
    """Needs the training setup to pass skip_bad to open_dataset and list reader.left_out."""
    root = tmp_path / "coco"
    data = coco_data(root)
    data["annotations"][0]["category_id"] = 99  # annotation 1; annotation 2 stays good
    args, path = coco(root, data)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="left out 1 annotation"):
        code, out, err = cli(capsys, "train", "--data", *args, "--out", run, "--config", tiny_yaml, "--iters", "1",
                             "--batch-size", "1", "--skip-bad", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    assert (run / "skipped.txt").read_text() == f"annotation 1\t{path}: annotation 1 has unknown category_id 99\n"
    assert load_checkpoint(run / "last.pt").step == 1


# --- predict on every image case -----------------------------------------------------------------------
# torch runs the model: what these tests check (reading, skipping, one-line errors) comes before the
# engine, and a graph engine's compilation would cost each test seconds (engines: test_engines.py)
PREDICT = ["--device", "cpu", "--no-progress", "--engine", "torch"]


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_predict_on_corpus_image(name, untrained_weights, tmp_path, capsys):
    case = IMAGE_CASES[name]
    image, _ = case.write(tmp_path / "in" / name)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "predict", image, "--weights", untrained_weights, "--out", out, *PREDICT)
    assert not (tmp_path / "in" / "CODE_WAS_RUN").exists()
    if case.problem is None:
        assert code == 0, err
        assert "Traceback" not in err and "1 image(s) segmented" in stdout
        labels = read_label_image(out / f"{name}_labels.png")
        assert labels.shape == (case.write(tmp_path / "again" / name)[1]).shape
    else:
        check_one_line_error(code, err, image, case.problem)
        assert err.startswith(f"maskrcnn: skipped {image}: ")
        assert "0 image(s) segmented" in stdout
        assert (out / "failed.txt").read_text().startswith(f"{image}\t")
        assert not list(out.glob(f"{name}_*"))


def test_predict_folder_with_the_whole_corpus_writes_the_good_and_lists_the_bad(untrained_weights, tmp_path, capsys):
    folder = tmp_path / "in"
    images = {name: case.write(folder / name)[0] for name, case in IMAGE_CASES.items()}
    code, stdout, err = cli(capsys, "predict", folder, "--weights", untrained_weights, "--out", tmp_path / "out",
                            *PREDICT)
    assert code == 2 and "Traceback" not in err
    good = [name for name in IMAGE_CASES if name not in BAD_IMAGES]
    assert f"{len(good)} image(s) segmented" in stdout
    assert sorted(err.splitlines()) == sorted(
        f"maskrcnn: skipped {images[name]}: " + next(line.split(": ", 2)[2] for line in err.splitlines()
                                                      if str(images[name]) in line) for name in BAD_IMAGES)
    for name in BAD_IMAGES:
        assert IMAGE_CASES[name].problem in next(line for line in err.splitlines() if str(images[name]) in line)
    for name in good:
        assert (tmp_path / "out" / f"{name}_labels.png").is_file(), name
    assert len((tmp_path / "out" / "failed.txt").read_text().splitlines()) == len(BAD_IMAGES)


# --- untrusted files: nothing in them is ever run ----------------------------------------------------------
def test_predict_refuses_a_checkpoint_that_would_run_a_command(tmp_path, capsys):
    command, marker = marker_command(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "maskrcnn-checkpoint/1", "config": {}, "model": {}, "hook": _RunsCommand(command)}, evil)
    image = _write(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", evil, "--out", tmp_path / "out", *PREDICT)
    check_one_line_error(code, err, evil, "refused to load")
    assert not marker.exists()


def test_train_resume_refuses_a_last_checkpoint_that_would_run_a_command(tmp_path, tiny_yaml, capsys):
    command, marker = marker_command(tmp_path)
    root = tmp_path / "data"
    image, labels = nuclei()
    write_image(root / "images" / "x.png", image)
    write_label_image(root / "masks" / "x.png", labels.astype(np.uint16))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "maskrcnn-checkpoint/1", "hook": _RunsCommand(command)}, run / "last.pt")
    code, _, err = cli(capsys, "train", "--data", root, "--out", run, "--config", tiny_yaml, "--resume",
                       "--iters", "1", *FAST)
    check_one_line_error(code, err, run / "last.pt", "refused to load")
    assert not marker.exists()


def test_predict_refuses_a_fake_torchscript_archive_whose_pickles_would_run_a_command(tmp_path, capsys):
    """A zip laid out like TorchScript (``constants.pkl``) whose pickles call os.system."""
    import pickle
    import zipfile

    command, marker = marker_command(tmp_path)
    evil = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/constants.pkl", pickle.dumps((_RunsCommand(command),), protocol=2))
        archive.writestr("archive/data.pkl", pickle.dumps(_RunsCommand(command), protocol=2))
        archive.writestr("archive/version", "3\n")
    image = _write(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", evil, "--out", tmp_path / "out", *PREDICT)
    check_one_line_error(code, err, evil, "")
    assert "TorchScript" in err or "checkpoint" in err
    assert not marker.exists()


# --- flags and the file system ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named, problem", [
    (["--lr", "-1"], "--lr", "must be a finite number > 0, got -1.0"),
    (["--lr", "inf"], "--lr", "must be a finite number > 0, got inf"),
    (["--iters", "ten"], "--iters", "expected a whole number >= 1, got 'ten'"),
    (["--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
    (["--format", "voc"], "--format", "invalid choice: 'voc'"),
], ids=["negative_lr", "infinite_lr", "iters_not_a_number", "zero_batch", "unknown_format"])
def test_bad_flags_are_one_line_errors(flags, named, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    _, err = capsys.readouterr()
    check_one_line_error(info.value.code, err, named, problem)
    assert "maskrcnn train --help" in err


def test_an_output_folder_that_cannot_be_created_is_a_one_line_error(untrained_weights, tmp_path, capsys):
    blocker = _write(tmp_path / "taken", b"a file, not a folder")
    image = _write(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", untrained_weights, "--out", blocker / "out", *PREDICT)
    check_one_line_error(code, err, blocker, "Not a directory")
