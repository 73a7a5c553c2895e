"""What every dataset reader shares: the Sample record, the InstanceReader interface and the
folder helpers of the folder layouts. The readers live in dsb.py, labels.py and coco.py;
:mod:`maskrcnn.data.datasets` opens them."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .io import IMAGE_EXTENSIONS, image_stem

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
    """Common interface of the readers; subclasses fill ``names`` and ``class_names``.

    ``left_out`` lists what a reader opened with ``skip_bad`` dropped while it was built (e.g.
    COCO annotations with an unknown category) as ``(name, message)`` pairs, ``message`` being
    the one-line error it would otherwise have raised; ``train --skip-bad`` lists them in
    RUN_DIR/skipped.txt as ``name<TAB>message``. Bad samples are not in it: reading one raises
    :class:`DataError`, whatever ``skip_bad`` says.
    """

    names: list[str]
    class_names: list[str]
    left_out: Sequence[tuple[str, str]] = ()

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        return self._load(self._in_range(index))

    def check_header(self, index: int) -> None:
        """Check sample ``index`` without decoding its pixels: its files exist and their headers
        agree (an image and its masks have one size). Raises :class:`DataError` as reading the
        sample would; a sample that passes may still fail when read (damaged pixel data, colour
        masks, bad RLE). ``train`` checks every sample so before its first step."""
        self._check_header(self._in_range(index))

    def _check_header(self, index: int) -> None:
        """What :meth:`check_header` does; a reader without a cheaper check reads the sample."""
        self._load(index)

    def _in_range(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return index % len(self)

    @abstractmethod
    def _load(self, index: int) -> Sample:
        """Read sample ``index`` (already in range) from disk."""


def existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "no such folder" if not path.exists() else "not a folder")
    return path


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files are ignored."""
    with os.scandir(folder) as entries:  # file types from the listing: no system call per file on most systems
        return sorted(folder / e.name for e in entries
                      if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
                      and e.is_file())


def files_by_stem(folder: Path) -> dict[str, Path]:
    """Map file stem -> image file; two files with one stem are ambiguous. OME-TIFF's double
    extension counts as one (``cells.ome.tif`` pairs with ``cells.png``)."""
    by_stem: dict[str, Path] = {}
    for file in image_files(folder):
        stem = image_stem(file)
        if stem in by_stem:
            raise DataError(file, f"two files named '{stem}' ({by_stem[stem].name} and {file.name}); keep one")
        by_stem[stem] = file
    return by_stem


def check_shape(path: Path, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """A mask read from ``path`` must be as large as its image."""
    if tuple(got) != tuple(expected):
        raise DataError(path, f"mask is {got[0]}x{got[1]} (HxW) but its image is "
                              f"{expected[0]}x{expected[1]}")
