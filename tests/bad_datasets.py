"""Bad and unusual datasets (labels, DSB2018 and COCO layouts) and configuration files for
tests/test_bad_inputs.py: each case builds one dataset under a test's folder and says what
``maskrcnn train`` must do with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from maskrcnn.data.writers import write_image, write_label_image

from bad_images import IMAGE_CASES, ImageCase, nuclei, png_bytes, tiff_bytes, write_bytes



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
    write_bytes(mask, png_bytes(np.stack([labels.astype(np.uint8)] * 3, axis=-1)))
    return [root], mask


def ds_label_image_rgba_grey(root: Path):
    """The same as RGBA: opaque instances on a transparent background that stores white."""
    image, labels = nuclei()
    mask = labels_sample(root, image)
    grey = np.where(labels > 0, labels, 255).astype(np.uint8)
    alpha = np.where(labels > 0, 255, 0).astype(np.uint8)
    write_bytes(mask, png_bytes(np.stack([grey, grey, grey, alpha], axis=-1)))
    return [root], mask


def ds_label_image_colour_coded(root: Path):
    """A label image drawn with one colour per instance: the channels differ, refused."""
    image, labels = nuclei()
    mask = labels_sample(root, image)
    palette = np.array([[0, 0, 0]] + [[40 * i % 256, 255 - 30 * i, 90] for i in range(1, labels.max() + 1)],
                       dtype=np.uint8)
    write_bytes(mask, png_bytes(palette[labels]))
    return [root], mask


def ds_label_image_fractional(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image, "x.tif")
    write_bytes(mask, tiff_bytes(labels.astype(np.float32) * 1.5))
    return [root], mask


def ds_label_image_truncated(root: Path):
    image, labels = nuclei()
    mask = labels_sample(root, image)
    write_bytes(mask, png_bytes(labels.astype(np.uint16))[:120])
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
        paths.append(write_bytes(root / "x" / "masks" / f"m{i}.png", png_bytes(mask.astype(np.uint8) * 255)))
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
