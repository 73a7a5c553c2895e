"""The image + label-image layout: one integer label image per image."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..components import component_labels
from ..errors import DataError
from .io import read_image, read_image_size, read_label_image, read_mask_size
from .planes import Planes
from .reader import DEFAULT_CLASS_NAMES, InstanceReader, Sample, check_shape, existing_dir, files_by_stem


class LabelsReader(InstanceReader):
    """``ROOT/images/NAME.ext`` + ``ROOT/masks/NAME.ext2`` integer label images (0 = background).

    Images and masks pair by file stem; the extensions may differ. Every distinct nonzero id is
    one instance of class 1 (ids need not be contiguous); an id that marks separate regions of
    similar size stays one instance, with a warning naming the file (:func:`split_ids`). Grey
    label images saved as RGB or RGBA are read as :func:`maskrcnn.data.io.mask_channel`
    describes. A missing mask file is an error unless ``allow_missing_masks``, in which case the
    image has no instances. ``planes``: which plane of multi-dimensional images to read
    (:mod:`maskrcnn.data.planes`).
    """

    def __init__(self, root: str | Path, allow_missing_masks: bool = False, planes: Planes | None = None):
        self.root = existing_dir(root)
        self.planes = planes
        self.class_names = list(DEFAULT_CLASS_NAMES)
        self._images = files_by_stem(existing_dir(self.root / "images"))
        mask_dir = self.root / "masks"
        if not mask_dir.is_dir() and not allow_missing_masks:
            raise DataError(mask_dir, "missing folder of label images (pass allow_missing_masks "
                                      "to read images without annotations)")
        self._masks = files_by_stem(mask_dir) if mask_dir.is_dir() else {}
        self.names = sorted(self._images)
        if not self.names:
            raise DataError(self.root / "images", "no image files found")
        missing = [n for n in self.names if n not in self._masks]
        if missing and not allow_missing_masks:
            raise DataError(mask_dir, f"no label image for {len(missing)} image(s), "
                                      f"e.g. '{missing[0]}'")

    def _load(self, index: int) -> Sample:
        name = self.names[index]
        image = read_image(self._images[name], self.planes)
        if name in self._masks:
            masks = _label_masks(self._masks[name], image.shape[:2])
        else:
            masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        return Sample(name, image, masks, np.ones(len(masks), dtype=np.int64), str(self._images[name]))

    def _check_header(self, index: int) -> None:
        name = self.names[index]
        size = read_image_size(self._images[name], self.planes)
        if name in self._masks:
            check_shape(self._masks[name], read_mask_size(self._masks[name]), size)


def _label_masks(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(G, H, W) bool masks of the label image in ``path``, checked to be of ``shape``."""
    labels = read_label_image(path)
    check_shape(path, labels.shape, shape)
    split = split_ids(labels)
    if split:
        shown = ", ".join(map(str, split[:5])) + (", ..." if len(split) > 5 else "")
        warnings.warn(f"{path}: {len(split)} label id(s) each mark separate regions (id {shown}); each id is "
                      "one instance, so give separate nuclei or cells their own ids")
    return label_masks(labels)


def split_ids(labels: np.ndarray, share: float = 0.25) -> list[int]:
    """The ids of an (H, W) label image that mark two or more separate (8-connected) regions, each at
    least ``share`` of the id's largest: separate objects given one id, as a label reused in an
    annotation tool leaves them (one training image of mnfinder-nuclei gave 19 ids to two nuclei
    each; docs/experiments.md). Stray specks left with an id do not count. Each id is labelled
    in its own bounding box, so the work is the objects' area, not the image's."""
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    if not len(ids):
        return []
    order = np.argsort(ids, kind="stable")
    ids, rows, cols = ids[order], rows[order], cols[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # each id's first pixel in that order
    found = []
    for start, stop in zip(starts, np.r_[starts[1:], len(ids)]):
        r, c = rows[start:stop] - rows[start:stop].min(), cols[start:stop] - cols[start:stop].min()
        box = np.zeros((r.max() + 1, c.max() + 1), dtype=bool)
        box[r, c] = True
        parts = component_labels(torch.from_numpy(box)[None])[0]
        sizes = torch.unique(parts[parts > 0], return_counts=True)[1]
        if int((sizes >= share * sizes.max()).sum()) >= 2:
            found.append(int(ids[start]))
    return found


def label_masks(labels: np.ndarray) -> np.ndarray:
    """(G, H, W) bool masks, one per distinct nonzero id of an (H, W) label image, in id order."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    first = 1 if ids[0] == 0 else 0  # index of the first nonzero id
    masks = np.zeros((len(ids) - first, *labels.shape), dtype=bool)
    rows, cols = np.nonzero(labels)
    masks[inverse[rows, cols] - first, rows, cols] = True  # one pass instead of G comparisons
    return masks
