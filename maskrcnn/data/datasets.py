"""Dataset readers: Kaggle DSB2018 folders, image + label-image folders, and COCO JSON.

All readers share one interface (``len``, ``reader[i] -> Sample``, ``names``, ``class_names``
with "background" first). File lists are resolved when a reader is built, so layout problems
show up at once; pixels are read lazily, one sample per ``__getitem__``.
"""

from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError
from .io import IMAGE_EXTENSIONS, read_binary_mask, read_image, read_label_image

FORMATS = ("dsb", "labels", "coco")
DEFAULT_CLASS_NAMES = ["background", "nucleus"]


@dataclass
class Sample:
    """One image and its instances.

    image: raw (H, W) or (H, W, C) array in the file's dtype; masks: (G, H, W) bool;
    labels: (G,) int64 class labels in 1..K-1.
    """

    name: str
    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    image_path: str


class InstanceReader(ABC):
    """Common interface of the readers; subclasses fill ``names`` and ``class_names``."""

    names: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return self._load(index % len(self))

    @abstractmethod
    def _load(self, index: int) -> Sample:
        """Read sample ``index`` (already in range) from disk."""


class DsbDataset(InstanceReader):
    """Kaggle DSB2018 layout: ``ROOT/ID/images/ID.png`` and ``ROOT/ID/masks/*.png``.

    Each mask file is one instance (nonzero pixels). Masks are kept exactly as given, so
    overlapping masks (a few exist in DSB2018) stay overlapping. Empty mask files are dropped.
    An ``ID/`` without ``masks/`` is an image with no instances (prediction-only data).
    """

    def __init__(self, root: str | Path):
        self.root = _existing_dir(root)
        self.class_names = list(DEFAULT_CLASS_NAMES)
        self.names = []
        self._images: list[Path] = []
        for folder in sorted(p for p in self.root.iterdir()
                             if not p.name.startswith(".") and (p / "images").is_dir()):
            self.names.append(folder.name)
            self._images.append(_dsb_image(folder))
        if not self.names:
            raise DataError(self.root, "no ID/images/ folders found (expected the Kaggle DSB2018 "
                                       "layout ROOT/ID/images/ID.png + ROOT/ID/masks/*.png)")

    def _load(self, index: int) -> Sample:
        image_path = self._images[index]
        image = read_image(image_path)
        mask_dir = image_path.parent.parent / "masks"
        mask_files = _image_files(mask_dir) if mask_dir.is_dir() else []
        masks = [_binary_mask(f, image.shape[:2]) for f in mask_files]
        masks = [m for m in masks if m.any()]
        stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)
        return Sample(self.names[index], image, stacked, np.ones(len(masks), dtype=np.int64),
                      str(image_path))


class LabelsDataset(InstanceReader):
    """``ROOT/images/NAME.ext`` + ``ROOT/masks/NAME.ext2`` integer label images (0 = background).

    Images and masks pair by file stem; the extensions may differ. Every distinct nonzero id is
    one instance of class 1 (ids need not be contiguous). A missing mask file is an error unless
    ``allow_missing_masks``, in which case the image has no instances.
    """

    def __init__(self, root: str | Path, allow_missing_masks: bool = False):
        self.root = _existing_dir(root)
        self.class_names = list(DEFAULT_CLASS_NAMES)
        self._images = _files_by_stem(_existing_dir(self.root / "images"))
        mask_dir = self.root / "masks"
        if not mask_dir.is_dir() and not allow_missing_masks:
            raise DataError(mask_dir, "missing folder of label images (pass allow_missing_masks "
                                      "to read images without annotations)")
        self._masks = _files_by_stem(mask_dir) if mask_dir.is_dir() else {}
        self.names = sorted(self._images)
        if not self.names:
            raise DataError(self.root / "images", "no image files found")
        missing = [n for n in self.names if n not in self._masks]
        if missing and not allow_missing_masks:
            raise DataError(mask_dir, f"no label image for {len(missing)} image(s), "
                                      f"e.g. '{missing[0]}'")

    def _load(self, index: int) -> Sample:
        name = self.names[index]
        image = read_image(self._images[name])
        if name in self._masks:
            masks = _label_masks(self._masks[name], image.shape[:2])
        else:
            masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        return Sample(name, image, masks, np.ones(len(masks), dtype=np.int64), str(self._images[name]))


class CocoDataset(InstanceReader):
    """COCO instances JSON (polygons, compressed and uncompressed RLE) + a folder of images.

    Categories map to labels 1..K-1 in increasing category-id order. Crowd annotations are
    skipped. An annotation whose polygons all have < 3 points is skipped and recorded in
    ``skipped`` as ``(annotation id, reason)`` (one warning for all of them). The ``bbox`` field
    is ignored: boxes come from the rasterised masks, which are clipped to the image, and
    annotations that rasterise to nothing are dropped. A file without ``annotations`` (e.g. a
    test-set image list) gives images with no instances. ``file_name`` must stay inside
    ``image_dir``. Sample names are file names without extension.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path):
        self.json_path = Path(json_path)
        self.image_dir = _existing_dir(image_dir)
        data = _load_json(self.json_path)
        categories = _entries(data, "categories", self.json_path, ("id", "name"))
        _check_ids(categories, "categories", self.json_path, ("id",))
        categories = sorted(categories, key=lambda c: (isinstance(c["id"], str), c["id"]))
        self._label_of = _unique_ids(categories, "categories", self.json_path)
        self.class_names = ["background"] + [str(c["name"]) for c in categories]
        images = _entries(data, "images", self.json_path, ("id", "file_name", "height", "width"))
        _check_ids(images, "images", self.json_path, ("id",))
        _check_sizes(images, self.json_path)
        _unique_ids(images, "images", self.json_path)
        self._images = images
        self.names = [str(PurePosixPath(self._safe_file_name(im)).with_suffix("")) for im in images]
        if len(set(self.names)) != len(self.names):
            raise DataError(self.json_path, "two images share a file name (extensions aside)")
        self.skipped: list[tuple[Any, str]] = []
        self._annotations: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in images}
        annotations = _entries(data, "annotations", self.json_path,
                               ("id", "image_id", "category_id", "segmentation"), required=False)
        _check_ids(annotations, "annotations", self.json_path, ("id", "image_id", "category_id"))
        for ann in annotations:
            self._add_annotation(ann)
        if self.skipped:
            warnings.warn(f"{self.json_path}: skipped {len(self.skipped)} annotation(s) with "
                          f"unusable polygons, e.g. id {self.skipped[0][0]}: {self.skipped[0][1]}",
                          stacklevel=2)

    def _safe_file_name(self, image: dict[str, Any]) -> str:
        """The entry's file_name, checked not to leave the image folder."""
        name = image["file_name"]
        if not isinstance(name, str) or not name:
            raise DataError(self.json_path, f"image {image['id']}: file_name must be a non-empty string")
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
            raise DataError(self.json_path, f"image {image['id']}: file_name '{name}' escapes the "
                                            "image folder")
        return name

    def _add_annotation(self, ann: dict[str, Any]) -> None:
        """Validate one annotation and file it under its image (crowds and bad polygons skipped)."""
        if ann["image_id"] not in self._annotations:
            raise DataError(self.json_path, f"annotation {ann['id']} refers to unknown image_id "
                                            f"{ann['image_id']!r}")
        if ann["category_id"] not in self._label_of:
            raise DataError(self.json_path, f"annotation {ann['id']} has unknown category_id "
                                            f"{ann['category_id']!r}")
        if ann.get("iscrowd", 0):
            return
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if _valid_polygon(p)]
            if not polygons:
                self.skipped.append((ann["id"], "no polygon with 3 or more finite points"))
                return
            segmentation = polygons
        elif not (isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys()):
            raise DataError(self.json_path, f"annotation {ann['id']}: segmentation must be a list "
                                            "of polygons or an RLE with 'size' and 'counts'")
        self._annotations[ann["image_id"]].append({**ann, "segmentation": segmentation})

    def _load(self, index: int) -> Sample:
        entry = self._images[index]
        path = self.image_dir / entry["file_name"]
        image = read_image(path)
        height, width = image.shape[:2]
        if (height, width) != (entry["height"], entry["width"]):
            raise DataError(path, f"image is {height}x{width} (HxW) but {self.json_path.name} says "
                                  f"{entry['height']}x{entry['width']}")
        masks, labels = [], []
        for ann in self._annotations[entry["id"]]:
            mask = self._decode(ann, height, width)
            if mask.any():
                masks.append(mask)
                labels.append(self._label_of[ann["category_id"]])
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return Sample(self.names[index], image, stacked, np.asarray(labels, dtype=np.int64), str(path))

    def _decode(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        """Rasterise one annotation's segmentation to an (H, W) bool mask."""
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        else:
            rle = self._checked_rle(ann, height, width)
        with warnings.catch_warnings():  # pycocotools' numpy-2 "copy keyword" deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)

    def _checked_rle(self, ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
        """The annotation's RLE in compressed form, after checking it covers its image exactly.

        pycocotools trusts RLE counts and writes out of bounds on bad ones, hence the check.
        """
        segmentation = ann["segmentation"]
        if segmentation["size"] != [height, width]:
            raise DataError(self.json_path, f"annotation {ann['id']}: RLE size {segmentation['size']} "
                                            f"differs from its image ({height}, {width})")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            counts = _rle_string_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes)
                                        else counts)
        if (not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts)
                or sum(counts) != height * width):
            raise DataError(self.json_path, f"annotation {ann['id']}: bad RLE: counts do not cover "
                                            f"the {height}x{width} image")
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def open_dataset(path: str | Path, format: str | None = None, image_dir: str | Path | None = None,
                 allow_missing_masks: bool = False) -> InstanceReader:
    """Open a dataset in one of :data:`FORMATS`, detecting the format when ``format`` is None.

    Detection: a ``.json`` file is COCO (images in ``image_dir``, default the JSON's folder);
    a folder with ``images/`` is the labels layout; a folder whose subfolders hold ``images/``
    is the DSB layout. Anything else, or a folder matching both, asks for ``--format``.
    ``allow_missing_masks`` applies to the labels layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    format = format or _detect_format(path)
    if format == "coco":
        return CocoDataset(path, image_dir if image_dir is not None else path.parent)
    if format == "labels":
        return LabelsDataset(path, allow_missing_masks=allow_missing_masks)
    if format == "dsb":
        return DsbDataset(path)
    raise DataError(path, f"unknown dataset format '{format}'; use one of {', '.join(FORMATS)}")


def _detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise DataError(path, "cannot tell the dataset format of this file; pass --format")
    labels = (path / "images").is_dir()
    dsb = any((sub / "images").is_dir() for sub in path.iterdir() if sub.is_dir())
    if labels == dsb:
        reason = "it matches both the labels and the dsb layout" if labels else "no known layout"
        raise DataError(path, f"cannot tell the dataset format ({reason}); pass --format "
                              f"({', '.join(FORMATS)})")
    return "labels" if labels else "dsb"


# --- folder helpers ----------------------------------------------------------------------------

def _existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "no such folder" if not path.exists() else "not a folder")
    return path


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files are ignored."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Map file stem -> image file; two files with one stem are ambiguous."""
    by_stem: dict[str, Path] = {}
    for file in _image_files(folder):
        if file.stem in by_stem:
            raise DataError(file, f"two files named '{file.stem}' ({by_stem[file.stem].name} "
                                  f"and {file.name}); keep one")
        by_stem[file.stem] = file
    return by_stem


def _dsb_image(folder: Path) -> Path:
    """The image of a DSB sample folder: ``images/ID.*``, or the only image file there."""
    files = _image_files(folder / "images")
    named = [f for f in files if f.stem == folder.name]
    if len(named) == 1 or len(files) == 1:
        return (named or files)[0]
    raise DataError(folder / "images", f"expected one image file named {folder.name}.png, found "
                                       f"{len(files)} image files")


def _binary_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one DSB instance file (nonzero = instance), checked against ``shape``."""
    mask = read_binary_mask(path)
    _check_shape(path, mask.shape, shape)
    return mask


def _label_masks(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(G, H, W) bool masks, one per distinct nonzero id of a label image, in increasing id order."""
    labels = read_label_image(path)
    _check_shape(path, labels.shape, shape)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    first = 1 if ids[0] == 0 else 0  # index of the first nonzero id
    masks = np.zeros((len(ids) - first, *shape), dtype=bool)
    rows, cols = np.nonzero(labels)
    masks[inverse[rows, cols] - first, rows, cols] = True  # one pass instead of G comparisons
    return masks


def _check_shape(path: Path, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise DataError(path, f"mask is {got[0]}x{got[1]} (HxW) but its image is "
                              f"{expected[0]}x{expected[1]}")


# --- COCO helpers ------------------------------------------------------------------------------

def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(path, "expected a COCO JSON object with 'images' and 'categories'")
    return data


def _entries(data: dict[str, Any], key: str, path: Path, fields: tuple[str, ...],
             required: bool = True) -> list[dict[str, Any]]:
    """``data[key]`` as a list of objects that all have ``fields``."""
    if key not in data and not required:
        return []
    entries = data.get(key)
    if not isinstance(entries, list):
        raise DataError(path, f"'{key}' must be a list" if key in data else f"missing key '{key}'")
    for i, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise DataError(path, f"{key}[{i}] lacks {', '.join(repr(m) for m in missing)}")
    return entries


def _check_ids(entries: list[dict[str, Any]], key: str, path: Path, fields: tuple[str, ...]) -> None:
    """COCO ids are integers (strings are accepted too); a list, object or number with a fraction
    cannot be matched between images, annotations and categories."""
    for i, entry in enumerate(entries):
        for name in fields:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise DataError(path, f"{key}[{i}] has {name} {value!r}; expected an integer id")


def _check_sizes(images: list[dict[str, Any]], path: Path) -> None:
    for i, image in enumerate(images):
        for name in ("height", "width"):
            value = image[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(path, f"images[{i}] has {name} {value!r}; expected a positive integer")


def _unique_ids(entries: list[dict[str, Any]], key: str, path: Path) -> dict[Any, int]:
    """Map each entry's id to its 1-based position; duplicate ids raise."""
    positions: dict[Any, int] = {}
    for entry in entries:
        if entry["id"] in positions:
            raise DataError(path, f"{key} id {entry['id']!r} appears twice")
        positions[entry["id"]] = len(positions) + 1
    return positions


def _valid_polygon(polygon: Any) -> bool:
    """A flat [x1, y1, x2, y2, ...] list of at least 3 finite points."""
    return (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon))


def _rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString); None if malformed.

    Each count is 5-bit groups in characters offset by 48, bit 0x20 meaning "more groups";
    from the third count on, values are stored as differences to the count two places back.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text) or not 48 <= ord(text[position]) < 48 + 64:
                return None
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts
