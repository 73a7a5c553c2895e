"""Run-length encodings of instance masks: COCO RLEs (results files, COCOeval) and Kaggle DSB2018 rows.

Both encode each instance in column-major (Fortran) pixel order. A label image is encoded in one
pass over its pixels rather than from one full-image mask per instance, which keeps images with
thousands of instances fast and small.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..errors import UserError

RLE = dict[str, Any]  # a compressed COCO RLE: {"size": [H, W], "counts": str}
Masks = np.ndarray | Sequence[RLE]  # (N, H, W) bool array, or N COCO RLEs
# pycocotools' area() overflows a uint8 count for lists longer than this under numpy 2
_AREA_CHUNK = 255


def check_label_image(labels: np.ndarray) -> None:
    """Raise UserError unless ``labels`` is an (H, W) integer array with no negative ids."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"a label image must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise UserError("a label image must not hold negative ids")


def label_runs(label_image: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(H, W) int label image -> {id: (starts, lengths)} of its runs in column-major order (0-based)."""
    flat = np.asarray(label_image).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    fg = values > 0
    starts, lengths, values = starts[fg], lengths[fg], values[fg]
    order = np.argsort(values, kind="stable")
    ids, first = np.unique(values[order], return_index=True)
    groups = np.split(order, first[1:])
    return {int(i): (starts[g], lengths[g]) for i, g in zip(ids, groups)}


def coco_rle(starts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> RLE:
    """Compressed COCO RLE ({'size', 'counts'}) of one instance's runs; counts is a str, JSON-ready."""
    ends = starts + lengths
    gaps = starts - np.concatenate([[0], ends[:-1]])
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2], counts[1::2] = gaps, lengths
    counts[-1] = height * width - (ends[-1] if len(ends) else 0)
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def kaggle_rle(starts: np.ndarray, lengths: np.ndarray) -> str:
    """DSB2018 submission encoding: 1-based 'start length' pairs, column-major."""
    return " ".join(f"{s + 1} {n}" for s, n in zip(starts.tolist(), lengths.tolist()))


def encode_label_image(label_image: np.ndarray) -> tuple[np.ndarray, list[RLE]]:
    """(H, W) int label image -> its non-zero ids (N,), ascending, and each one's COCO RLE."""
    check_label_image(label_image)
    runs = label_runs(label_image)
    ids = np.fromiter(runs, dtype=np.int64, count=len(runs))
    return ids, [coco_rle(*runs[i], *label_image.shape) for i in runs]


def encode_masks(masks: np.ndarray) -> list[RLE]:
    """COCO RLEs of instance masks (N, H, W) bool: the memory-bounded form predictions may take."""
    if masks.ndim != 3:
        raise UserError(f"instance masks must be (N, H, W), got shape {masks.shape}")
    return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))


def as_rles(masks: Masks) -> list[RLE]:
    """The masks as a list of RLEs, encoding an (N, H, W) array."""
    return encode_masks(masks) if isinstance(masks, np.ndarray) else list(masks)


def rle_areas(rles: Sequence[RLE]) -> np.ndarray:
    """(N,) pixel counts of N RLEs."""
    chunks = (list(rles[i:i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK))
    return np.concatenate([np.zeros(0), *map(coco_mask.area, chunks)])
