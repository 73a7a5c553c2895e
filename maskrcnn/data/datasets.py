"""Dataset readers: Kaggle DSB2018 folders, image + label-image folders, and COCO JSON.

All readers share one interface (``len``, ``reader[i] -> Sample``, ``names``, ``class_names``
with "background" first, ``left_out``). File lists are resolved when a reader is built, so
layout problems show up at once; pixels are read lazily, one sample per ``__getitem__``, and a
bad sample raises :class:`~maskrcnn.errors.DataError` when it is read. ``check_header(i)`` checks
a sample without decoding pixels (its files exist, their headers agree on the size).

The readers live in :mod:`.dsb`, :mod:`.labels` and :mod:`.coco` (the shared parts in
:mod:`.reader`); this module opens them and re-exports them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .coco import CocoReader
from .dsb import DsbReader
from .labels import LabelsReader
from .planes import Planes
from .reader import DEFAULT_CLASS_NAMES, InstanceReader, Sample

__all__ = ["CocoReader", "DEFAULT_CLASS_NAMES", "DsbReader", "FORMATS", "InstanceReader", "LabelsReader",
           "Sample", "open_dataset"]

FORMATS = ("dsb", "labels", "coco")


def open_dataset(path: str | Path, format: str | None = None, image_dir: str | Path | None = None,
                 allow_missing_masks: bool = False, skip_bad: bool = False,
                 planes: Planes | None = None) -> InstanceReader:
    """Open a dataset in one of :data:`FORMATS`, detecting the format when ``format`` is None.

    Detection: a ``.json`` file is COCO (images in ``image_dir``, default the JSON's folder);
    a folder with ``images/`` is the labels layout; a folder whose subfolders hold ``images/``
    is the DSB layout. Anything else, or a folder matching both, asks for ``--format``.
    ``allow_missing_masks`` applies to the labels and DSB layouts (images without annotations
    have no instances instead of being errors). ``skip_bad`` applies to COCO: annotations with
    an unknown category or image are left out and listed in the reader's ``left_out`` instead
    of refusing the file. Bad samples of any layout raise when read, whatever ``skip_bad`` says.
    ``planes``: the channel / z-slice / time point of multi-dimensional images (``--channel``,
    ``--z``, ``--t``; see :mod:`maskrcnn.data.planes`), for every layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    format = format or _detect_format(path)
    if format == "coco":
        return CocoReader(path, image_dir if image_dir is not None else path.parent, skip_bad=skip_bad,
                          planes=planes)
    if format == "labels":
        return LabelsReader(path, allow_missing_masks=allow_missing_masks, planes=planes)
    if format == "dsb":
        return DsbReader(path, allow_missing_masks=allow_missing_masks, planes=planes)
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
