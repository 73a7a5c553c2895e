"""The Kaggle DSB2018 layout: one folder per sample, one mask file per instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .io import read_binary_mask, read_image, read_image_size, read_mask_size
from .planes import Planes
from .reader import DEFAULT_CLASS_NAMES, InstanceReader, Sample, check_shape, existing_dir, image_files


class DsbReader(InstanceReader):
    """Kaggle DSB2018 layout: ``ROOT/ID/images/ID.png`` and ``ROOT/ID/masks/*.png``.

    Each mask file is one instance (nonzero pixels; grey masks saved as RGB or RGBA are read as
    :func:`maskrcnn.data.io.mask_channel` describes). Masks are kept exactly as given, so
    overlapping masks (a few exist in DSB2018) stay overlapping. Empty mask files are dropped,
    and an empty ``masks/`` folder is an image with no instances.

    An ``ID/`` without ``masks/`` (a test-set sample given as training data) raises
    :class:`DataError` naming ``ROOT/ID`` when that sample is read, so a training run stops on
    it, or skips and lists it with ``--skip-bad``. With ``allow_missing_masks`` it is an image
    with no instances instead (prediction-only data). ``planes``: which plane of multi-dimensional
    images to read (:mod:`maskrcnn.data.planes`).
    """

    def __init__(self, root: str | Path, allow_missing_masks: bool = False, planes: Planes | None = None):
        self.root = existing_dir(root)
        self.planes = planes
        self.allow_missing_masks = allow_missing_masks
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
        image = read_image(image_path, self.planes)
        masks = [m for m in (_binary_mask(f, image.shape[:2]) for f in self._mask_files(image_path.parent.parent))
                 if m.any()]
        stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)
        return Sample(self.names[index], image, stacked, np.ones(len(masks), dtype=np.int64),
                      str(image_path))

    def _check_header(self, index: int) -> None:
        image_path = self._images[index]
        size = read_image_size(image_path, self.planes)
        for file in self._mask_files(image_path.parent.parent):
            check_shape(file, read_mask_size(file), size)

    def _mask_files(self, folder: Path) -> list[Path]:
        """The mask files of sample folder ``folder``; see the class docstring when it has none."""
        mask_dir = folder / "masks"
        if mask_dir.is_dir():
            return image_files(mask_dir)
        if mask_dir.exists():
            raise DataError(mask_dir, "not a folder; expected a folder of one mask file per instance")
        if self.allow_missing_masks:
            return []
        raise DataError(folder, "sample has no masks/ folder, so its instances are unknown (a test-set "
                                "sample?); an empty masks/ folder means no instances")


def _dsb_image(folder: Path) -> Path:
    """The image of a DSB sample folder: ``images/ID.*``, or the only image file there."""
    files = image_files(folder / "images")
    named = [f for f in files if f.stem == folder.name]
    if len(named) == 1 or len(files) == 1:
        return (named or files)[0]
    raise DataError(folder / "images", f"expected one image file named {folder.name}.png, found "
                                       f"{len(files)} image files")


def _binary_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one DSB instance file (nonzero = instance), checked against ``shape``."""
    mask = read_binary_mask(path)
    check_shape(path, mask.shape, shape)
    return mask
