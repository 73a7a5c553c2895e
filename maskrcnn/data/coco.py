"""COCO instances JSON: polygons, compressed and uncompressed RLE, and a folder of images."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError
from .io import read_image, read_image_size
from .planes import Planes
from .reader import InstanceReader, Sample, existing_dir


class CocoReader(InstanceReader):
    """COCO instances JSON (polygons, compressed and uncompressed RLE) + a folder of images.

    Categories map to labels 1..K-1 in increasing category-id order. Crowd annotations are
    skipped. An annotation whose polygons all have < 3 points is skipped and recorded in
    ``skipped`` as ``(annotation id, reason)`` (one warning for all of them). The ``bbox`` field
    is ignored: boxes come from the rasterised masks, which are clipped to the image, and
    annotations that rasterise to nothing are dropped. A file without ``annotations`` (e.g. a
    test-set image list) gives images with no instances. ``file_name`` must stay inside
    ``image_dir``. Sample names are file names without extension.

    An annotation whose ``category_id`` or ``image_id`` is not in the file refuses the whole
    file with :class:`DataError`, unless ``skip_bad``: then it is left out, with one warning for
    all of them, and listed in ``left_out`` as ``("annotation ID", "JSON: annotation ID has
    unknown category_id C")`` for the caller to report (``train --skip-bad`` lists them in
    RUN_DIR/skipped.txt). The image keeps its other annotations. ``planes``: which plane of
    multi-dimensional images to read (:mod:`maskrcnn.data.planes`).
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, skip_bad: bool = False,
                 planes: Planes | None = None):
        self.json_path = Path(json_path)
        self.planes = planes
        self.skip_bad = skip_bad
        self.image_dir = existing_dir(image_dir)
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
        self.left_out: list[tuple[str, str]] = []
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
        if self.left_out:
            warnings.warn(f"{self.json_path}: left out {len(self.left_out)} annotation(s) with an unknown "
                          f"category or image (skip_bad), e.g. {self.left_out[0][1]}", stacklevel=2)

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
            return self._refuse_or_leave_out(ann, f"refers to unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in self._label_of:
            return self._refuse_or_leave_out(ann, f"has unknown category_id {ann['category_id']!r}")
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

    def _refuse_or_leave_out(self, ann: dict[str, Any], problem: str) -> None:
        """Raise the annotation's problem, or with ``skip_bad`` record it in ``left_out``."""
        error = DataError(self.json_path, f"annotation {ann['id']} {problem}")
        if not self.skip_bad:
            raise DataError(error.path, f"{error.problem} (train --skip-bad leaves such annotations out)")
        self.left_out.append((f"annotation {ann['id']}", str(error)))

    def _load(self, index: int) -> Sample:
        entry = self._images[index]
        path = self.image_dir / entry["file_name"]
        image = read_image(path, self.planes)
        height, width = self._check_size(path, image.shape[:2], entry)
        masks, labels = [], []
        for ann in self._annotations[entry["id"]]:
            mask = self._decode(ann, height, width)
            if mask.any():
                masks.append(mask)
                labels.append(self._label_of[ann["category_id"]])
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return Sample(self.names[index], image, stacked, np.asarray(labels, dtype=np.int64), str(path))

    def _check_header(self, index: int) -> None:
        """The image exists and its header's size is the JSON's (annotations are checked when read)."""
        entry = self._images[index]
        path = self.image_dir / entry["file_name"]
        self._check_size(path, read_image_size(path, self.planes), entry)

    def _check_size(self, path: Path, size: tuple[int, int], entry: dict[str, Any]) -> tuple[int, int]:
        """``size`` (H, W), after checking that it is the size the JSON gives the image."""
        height, width = size
        if (height, width) != (entry["height"], entry["width"]):
            raise DataError(path, f"image is {height}x{width} (HxW) but {self.json_path.name} says "
                                  f"{entry['height']}x{entry['width']}")
        return height, width

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
