"""Region-by-region reading of large images: tiled/pyramidal (Big)TIFF, OME-TIFF and OME-Zarr.

:func:`open_regions` gives a :class:`~maskrcnn.data.regions.RegionSource` whose ``read`` decodes
only the TIFF tiles/strips or zarr chunks a rectangle touches (through tifffile's ``aszarr``
store and zarr), so a whole-slide image never has to fit in memory. The plane is chosen as
:func:`maskrcnn.data.io.read_image` chooses it (:mod:`.planes`: ``--channel``, ``--z``, ``--t``);
a ``--z max|mean`` region reads that rectangle of every z-slice. ``sample`` reads a pyramid level
(TIFF SubIFDs / OME levels, NGFF multiscales datasets) for whole-image statistics.

Needs the ``slides`` extra (``pip install 'maskrcnn[slides]'``: zarr >= 3, ome-zarr). Files that
are missing, corrupt or laid out in a way this cannot read raise :class:`DataError` naming them.
Uncompressed TIFFs whose pages tifffile does not split into tiles or strips are read a page
(plane) at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .io import TIFF_EXTENSIONS, _quiet_tifffile
from .planes import Planes, PlaneSelection, select_planes, tiff_axes
from .regions import RegionSource, check_region, sample_step

ZARR_SUFFIX = ".zarr"  # also .ome.zarr
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")  # a folder holding one of these is zarr


def is_lazy_candidate(path: str | Path) -> bool:
    """True for what :func:`open_regions` reads: a TIFF file or a zarr folder (no pixel is read)."""
    path = Path(path)
    if path.is_dir():
        return path.suffix.lower() == ZARR_SUFFIX or any((path / m).is_file() for m in ZARR_MARKERS)
    return path.suffix.lower() in TIFF_EXTENSIONS and path.is_file()


def open_regions(path: str | Path, planes: Planes | None = None) -> RegionSource:
    """A region source over the plane of ``path`` chosen by ``planes`` (see :mod:`.planes`).

    TIFF files (tiled or striped, pyramidal or not, BigTIFF, OME-TIFF) and zarr folders
    (OME-Zarr with NGFF ``multiscales`` metadata, v0.4 or v0.5, or a plain zarr array). Raises
    :class:`DataError` naming the file when it is missing, unreadable or not such an image.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if not is_lazy_candidate(path):
        raise DataError(path, f"cannot read by regions: expected a TIFF file ({', '.join(TIFF_EXTENSIONS)}) "
                              "or an OME-Zarr folder (.zarr)")
    _zarr(path)  # the optional dependency, checked first for a clear message
    with _reading(path, "cannot open image"):
        return _open_zarr(path, planes) if path.is_dir() else _open_tiff(path, planes)


@dataclasses.dataclass(eq=False)
class LevelRegions:
    """A :class:`RegionSource` over zarr arrays: ``levels[0]`` the full-resolution array, the others
    a pyramid (same axes, smaller Y and X), and the selection of the plane in them.

    ``closer`` is called by :meth:`close` (the open TIFF file); reads after it fail.
    """

    path: Path
    levels: Sequence[Any]  # zarr.Array, one per pyramid level, finest first
    selection: PlaneSelection
    closer: Any = None

    def __post_init__(self) -> None:
        height, width, *samples = self.selection.plane_shape
        self.shape = (height, width)
        self.channels = samples[0] if samples else 0
        self.dtype = self.selection.dtype(self.levels[0].dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """[y0, y1) x [x0, x1) at full resolution -> (h, w) or (h, w, C); only the chunks it touches
        are read and decoded (of every z-slice for a projection)."""
        check_region(self, y0, y1, x0, x1)
        with _reading(self.path, f"cannot read region [{y0}:{y1}, {x0}:{x1}]"):
            block = self.levels[0][self.selection.key(slice(y0, y1), slice(x0, x1))]
        return self.selection.finish(np.asarray(block))

    def sample(self, max_pixels: int) -> np.ndarray:
        """The whole plane with <= about ``max_pixels`` pixels: the finest pyramid level that small,
        else every s-th row and column of the coarsest level (:func:`sample_step`)."""
        level, selection = self._levels()[-1]
        for candidate, candidate_selection in self._levels():
            height, width = candidate_selection.plane_shape[:2]
            if height * width <= max_pixels:
                level, selection = candidate, candidate_selection
                break
        step = sample_step(selection.plane_shape[:2], max_pixels)
        with _reading(self.path, "cannot read a reduced image"):
            block = level[selection.key(slice(None, None, step), slice(None, None, step))]
        return self.selection.finish(np.asarray(block))

    def _levels(self) -> list[tuple[Any, PlaneSelection]]:
        """(level, its selection) for the levels that differ from level 0 in Y and X only."""
        usable = []
        for level in self.levels:
            others = [(a, n) for a, n in zip(self.selection.axes, level.shape) if a not in "YX"]
            if len(level.shape) == len(self.selection.shape) and others == [
                    (a, n) for a, n in zip(self.selection.axes, self.selection.shape) if a not in "YX"]:
                usable.append((level, dataclasses.replace(self.selection, shape=tuple(level.shape))))
        return usable

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    def __repr__(self) -> str:
        return (f"LevelRegions({self.path}, shape={self.shape}, channels={self.channels}, dtype={self.dtype}, "
                f"levels={len(self.levels)}, axes={self.selection.axes})")


def _open_tiff(path: Path, planes: Planes | None) -> LevelRegions:
    """A TIFF's first series through tifffile's zarr store, one zarr array per pyramid level."""
    import tifffile
    zarr = _zarr(path)

    with _quiet_tifffile():  # tifffile logs damaged structures itself; the DataError says it once
        tif = tifffile.TiffFile(path)
    try:
        with _quiet_tifffile():
            series = tif.series[0]
            axes, names, ome = tiff_axes(tif)
        if series.dtype is None or series.dtype.kind not in "biuf":
            raise DataError(path, f"unsupported pixel type {series.dtype}")
        # not OME and no option: guess the layout as read_image does, so both give the same plane
        usable_axes = axes if ome or not (planes is None or planes.is_default) else None
        selection = select_planes(path, usable_axes, series.shape, names, planes)
        levels = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
    except BaseException:
        tif.close()
        raise
    return LevelRegions(path, levels, selection, tif.close)


def _open_zarr(path: Path, planes: Planes | None) -> LevelRegions:
    """An OME-Zarr image (NGFF multiscales: axes, datasets, omero channel labels) or a plain zarr array."""
    zarr = _zarr(path)
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return LevelRegions(path, [node], select_planes(path, None, node.shape, (), planes))
    attrs = node.attrs.asdict()
    meta = attrs.get("ome", attrs)  # NGFF 0.5 keeps its metadata under "ome", 0.4 at the top
    multiscales = meta.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not multiscales[0].get("datasets"):
        raise DataError(path, "zarr folder without OME-Zarr 'multiscales' metadata (expected an OME-NGFF "
                              "image, e.g. written by ome-zarr or bioformats2raw's NAME.zarr/0)")
    scale = multiscales[0]
    levels = [node[d["path"]] for d in scale["datasets"]]
    axes = _ngff_axes(scale.get("axes"))
    names = [str(c.get("label", "")) for c in meta.get("omero", {}).get("channels", []) if isinstance(c, dict)]
    return LevelRegions(path, levels, select_planes(path, axes, levels[0].shape, names, planes))


def _ngff_axes(axes: Any) -> str | None:
    """NGFF axes (0.4+: objects with a name; 0.3: names) -> letters, e.g. "TCZYX"; None if absent."""
    if not isinstance(axes, list):
        return None
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    # names other than t, c, z, y, x become Q: select_planes then guesses the whole layout
    return "".join(n.upper() if isinstance(n, str) and n.lower() in "tczyx" and len(n) == 1 else "Q"
                   for n in names)


def _zarr(path: Path) -> Any:
    """The zarr module (zarr >= 3), or a DataError saying how to install it."""
    try:
        import zarr
    except ImportError:
        raise DataError(path, "reading by regions needs zarr: pip install 'maskrcnn[slides]'") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise DataError(path, f"reading by regions needs zarr >= 3 (installed: {zarr.__version__}); "
                              "pip install 'maskrcnn[slides]'")
    return zarr


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn what tifffile, zarr or a codec raises into one DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    # corrupt tiles, truncated files and bad metadata raise many unrelated types (ValueError,
    # KeyError, OSError, zlib.error, json errors, zarr's own); all mean "cannot read this file"
    except Exception as exc:
        raise DataError(path, f"{what} ({type(exc).__name__}: {exc}); the file is corrupt, truncated "
                              "or not a supported image") from exc
