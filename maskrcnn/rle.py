"""Run-length encodings of label images, for COCO results and Kaggle DSB2018 submissions.

Both encode each instance in column-major (Fortran) pixel order, from the label image in one pass
rather than from one full-image mask per instance.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


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


def coco_rle(starts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> dict:
    """Compressed COCO RLE ({'size', 'counts'}) of one instance's runs."""
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
