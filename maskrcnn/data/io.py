"""Reading images and label images, with one-line errors for bad files (writing: ``writers``).

Every problem with a file (missing, empty, truncated, not an image, wrong shape) raises
:class:`maskrcnn.errors.DataError` naming the file, so the CLI can report it and exit 2.

:func:`read_image_size` and :func:`read_mask_size` give the (H, W) that the readers would give
from the file's header alone, without decoding pixels: the cheap check ``train`` makes of every
sample before its first step (a file whose pixel data is damaged passes it and fails when read).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
from PIL import Image

from ..errors import DataError
from .planes import Planes, PlaneSelection, read_tiff_selection, select_planes, tiff_axes

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + TIFF_EXTENSIONS + (".npy",)
MAX_CHANNELS = 4  # an axis this small is taken as channels, a larger one as pages or pixels

# Pillow modes converted to a plain array layout; the others ("L", "LA", "RGB", "RGBA", "I;16",
# "I", "F", ...) map to numpy directly.
_PIL_CONVERSIONS = {"1": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def image_stem(path: str | Path) -> str:
    """The name outputs and pairings use for an image file or zarr folder: its name without the
    extension, OME's double extension counted as one (``cells.ome.tif`` and ``cells.ome.zarr`` are
    ``cells``)."""
    stem = Path(path).stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def read_image(path: str | Path, planes: Planes | None = None) -> np.ndarray:
    """Read an image as (H, W) or (H, W, C) in the file's dtype (C <= 4).

    PNG/JPEG/BMP/GIF go through Pillow (palette images are expanded to RGB(A), the first frame
    of an animation is used), TIFF through tifffile and ``.npy`` through ``np.load`` without
    pickles. Channel-first (C, H, W) with C <= 4 is moved to channels-last; a stack of such
    planes (pages, z-slices, time points: 3-D with no small axis, or 4-D) gives its first plane.
    Other shapes (1-D, 5-D, ...) raise :class:`DataError`.

    OME-TIFFs, and any file when ``planes`` sets an option, are read by their axes instead (see
    :mod:`maskrcnn.data.planes`): one channel (``planes.channel``, default the first), one
    z-slice or a max/mean projection of all (``planes.z``, default the first; a mean is float32),
    one time point (``planes.t``, default the first); colour samples stay the C of (H, W, C).
    Only the TIFF pages the plane needs are decoded.
    """
    path = Path(path)
    suffix = _checked_file(path)
    if suffix in TIFF_EXTENSIONS:
        with _unreadable(path), _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            header = _tiff_header(tif)
            if _legacy(header, planes):
                return _image_plane(path, tif.series[0].asarray())
            return read_tiff_selection(tif, _selection(path, header, planes))
    array = _decode(path, suffix, keep_palette=False)
    header = _Header(array.shape, array.dtype)
    if _legacy(header, planes):
        return _image_plane(path, array)
    return _selection(path, header, planes).apply(array)


def read_image_size(path: str | Path, planes: Planes | None = None) -> tuple[int, int]:
    """The (H, W) of the image :func:`read_image` gives, read from the file's header: no pixel is
    decoded (Pillow opens lazily, tifffile reads the page structure, ``.npy`` is memory-mapped).
    Raises :class:`DataError` as :func:`read_image` would for a missing, empty or unreadable
    file, for an unsupported shape and for ``planes`` the file does not have; damaged pixel data
    is found only by reading the image."""
    path = Path(path)
    header = _header(path, keep_palette=False)
    if _legacy(header, planes):
        return _image_plane(path, _shape_only(header.shape, header.dtype)).shape[:2]
    return _selection(path, header, planes).plane_shape[:2]


class _Header(NamedTuple):
    """What a file's header says: the decoded array's shape and dtype and, for TIFF, its axes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str | None = None  # tifffile's series axes letters (None: not a TIFF)
    channel_names: tuple[str, ...] = ()  # OME Channel Name= of each channel
    ome: bool = False  # the layout comes from OME-XML


def _tiff_header(tif: tifffile.TiffFile) -> _Header:
    series = tif.series[0]
    axes, names, ome = tiff_axes(tif)
    return _Header(tuple(series.shape), series.dtype, axes, names, ome)


def _legacy(header: _Header, planes: Planes | None) -> bool:
    """Read as read_image always did (first plane, small axis = colour): not OME, no option set."""
    return not header.ome and (planes is None or planes.is_default)


def _selection(path: Path, header: _Header, planes: Planes | None) -> PlaneSelection:
    if header.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported pixel type {header.dtype}")
    return select_planes(path, header.axes, header.shape, header.channel_names, planes)


def read_mask_size(path: str | Path) -> tuple[int, int]:
    """The (H, W) of the mask :func:`read_binary_mask` or :func:`read_label_image` gives, from the
    file's header (see :func:`read_image_size`). Channel values (colour masks, fractional ids)
    are not checked: they need the pixels."""
    path = Path(path)
    shape = _header(path, keep_palette=True).shape
    return _mask_layout(path, _drop_unit_axes(_shape_only(shape, np.dtype(np.uint8))).shape)


def _image_plane(path: Path, array: np.ndarray) -> np.ndarray:
    """The (H, W) or (H, W, C) plane :func:`read_image` returns of a decoded ``array``; also run on
    a pixel-less array of the header's shape, so that sizes from headers agree with reads."""
    if array.dtype.kind not in "biuf":
        raise DataError(path, f"unsupported pixel type {array.dtype}")
    array = _drop_unit_axes(array)
    if array.ndim == 4 or (array.ndim == 3 and min(array.shape[0], array.shape[-1]) > MAX_CHANNELS):
        array = array[0]  # a stack of planes (pages, z-slices, time points): use the first
    if array.ndim == 3 and array.shape[-1] > MAX_CHANNELS >= array.shape[0]:
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= MAX_CHANNELS)) or 0 in array.shape:
        raise DataError(path, f"unsupported image shape {array.shape}; expected (H, W), (H, W, C) "
                              f"or (C, H, W) with C <= {MAX_CHANNELS}, or a stack of those")
    return array


def _shape_only(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` that holds no memory (one broadcast zero): shape logic only."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def read_binary_mask(path: str | Path) -> np.ndarray:
    """Read a one-instance mask file as (H, W) bool: every nonzero pixel is the instance.

    Grey masks saved in colour (R == G == B, with or without alpha) read as their one channel;
    see :func:`mask_channel` for what alpha means and which colour masks are refused.
    """
    path = Path(path)
    return mask_channel(path, _drop_unit_axes(_load(path, keep_palette=True))) != 0


def read_label_image(path: str | Path) -> np.ndarray:
    """Read an instance label image as (H, W) int64 ids, 0 = background.

    Accepts 8/16/32-bit integer PNG/TIFF/npy (palette PNGs give their palette indices, the usual
    way label maps are stored), boolean images, float images holding whole numbers, and grey
    images saved in colour (R == G == B, alpha as in :func:`mask_channel`). Colour-coded label
    images (channels that differ), negative ids and fractional values raise :class:`DataError`.
    """
    path = Path(path)
    labels = mask_channel(path, _drop_unit_axes(_load(path, keep_palette=True)))
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DataError(path, "label image holds non-integer values; expected integer ids")
    elif labels.dtype.kind not in "biu":
        raise DataError(path, f"label image has unsupported pixel type {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(path, f"label image holds negative ids (min {labels.min()})")
    if labels.size and labels.max() > np.iinfo(np.int64).max:
        raise DataError(path, "label ids do not fit in int64")
    return labels.astype(np.int64)


def _load(path: Path, keep_palette: bool) -> np.ndarray:
    """Decode a file into an array of any shape, turning every failure into a DataError."""
    return _decode(path, _checked_file(path), keep_palette)


def _decode(path: Path, suffix: str, keep_palette: bool) -> np.ndarray:
    """:func:`_load` of a file :func:`_checked_file` has passed (``suffix``: its lower-case suffix)."""
    with _unreadable(path):
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in TIFF_EXTENSIONS:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                return tif.series[0].asarray()
        return _load_pil(path, keep_palette)


def _header(path: Path, keep_palette: bool) -> _Header:
    """The shape and dtype of the array :func:`_load` would decode (and a TIFF's axes), from the
    file's header only. Pillow gives no dtype before decoding: uint8 stands for it (every Pillow
    mode is numeric)."""
    suffix = _checked_file(path)
    with _unreadable(path):
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)  # maps, reads nothing; refuses objects
            shape, dtype = array.shape, array.dtype
            del array
            return _Header(shape, dtype)
        if suffix in TIFF_EXTENSIONS:
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                return _tiff_header(tif)
        with Image.open(path) as image:  # lazy: reads the header, decodes nothing
            mode = image.mode
            if mode == "P" and not keep_palette:
                mode = "RGBA" if "transparency" in image.info else "RGB"
            mode = _PIL_CONVERSIONS.get(mode, mode)
            bands = Image.getmodebands(mode)
            width, height = image.size
        return _Header((height, width) if bands == 1 else (height, width, bands), np.dtype(np.uint8))


def _checked_file(path: Path) -> str:
    """The file's lower-case suffix, after checking it is a non-empty file of a known type."""
    try:
        info = path.stat()  # one system call: the cheap check makes this for every file of a dataset
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF):  # what Path.exists ignores
            raise
        raise DataError(path, "no such file") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(path, "not a file")
    if info.st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(path, f"unsupported file type '{suffix}'; expected one of "
                              f"{', '.join(IMAGE_EXTENSIONS)}")
    return suffix


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """Turn whatever a decoder raises into one DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    # Decoders raise many unrelated types (OSError, ValueError, SyntaxError, struct.error,
    # zlib.error, ...) for corrupt input; all of them mean "this file cannot be read".
    except Exception as exc:
        raise DataError(path, f"cannot read image ({type(exc).__name__}: {exc}); "
                              "the file is corrupt, truncated or not an image") from exc


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's log while it reads: it logs damaged structures to stderr itself, and the
    problem reaches the user once, as the DataError, instead of as an extra line before it."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_pil(path: Path, keep_palette: bool) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # decode now so truncation surfaces here, not later
        if image.mode == "P" and not keep_palette:
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in _PIL_CONVERSIONS:
            image = image.convert(_PIL_CONVERSIONS[image.mode])
        return np.array(image)


def mask_channel(path: str | Path, array: np.ndarray) -> np.ndarray:
    """The one (H, W) channel of a mask or label image read from ``path``.

    Image editors often save a grey mask in colour. Channels-last arrays are read as:

    - (H, W, 3) RGB: the channels must be equal at every pixel; the result is that value.
    - (H, W, 2) grey + alpha and (H, W, 4) RGBA: the last channel is alpha. A fully transparent
      pixel (alpha 0) shows nothing, so it is background (0) whatever colour it stores, and its
      colour is not checked. Every other pixel, partly transparent ones included, takes its
      colour value (R == G == B required for RGBA). A fully opaque image thus reads as if it
      had no alpha, and a white shape on a transparent canvas as that shape.

    Refused with :class:`DataError` naming the file: colour channels that differ at a visible
    pixel (a coloured drawing or a colour-coded label image: save grey values or integer ids),
    a mask drawn only in alpha (every visible pixel is 0 while others are transparent, e.g. a
    black shape on a transparent canvas: the shape would be read as nothing), and other shapes.
    """
    if array.ndim == 2:
        return array
    _mask_layout(path, array.shape)
    has_alpha = array.shape[-1] in (2, 4)
    colour = array[..., :-1] if has_alpha else array
    visible = array[..., -1] != 0 if has_alpha else np.ones(array.shape[:2], dtype=bool)
    differ = np.any(colour != colour[..., :1], axis=-1) & visible
    if differ.any():
        y, x = np.unravel_index(np.argmax(differ), differ.shape)
        raise DataError(path, f"mask is a colour image whose channels differ (shape {array.shape}; "
                              f"e.g. {tuple(array[y, x].tolist())} at row {y}, column {x}); expected "
                              "one channel of instance ids or 0/nonzero values, or R = G = B")
    value = np.where(visible, colour[..., 0], np.zeros((), dtype=array.dtype))
    if has_alpha and not visible.all() and visible.any() and not value.any():
        raise DataError(path, "mask is drawn only in its alpha channel (every visible pixel is 0, "
                              "the others transparent); save the instance in a nonzero colour, "
                              "e.g. white on black")
    return value


def _mask_layout(path: str | Path, shape: tuple[int, ...]) -> tuple[int, int]:
    """The (H, W) of a mask array of ``shape`` (after unit axes are dropped): 2-D, or channels-last
    with 2 to 4 channels (grey + alpha, RGB, RGBA); anything else is refused."""
    if len(shape) == 2:
        return tuple(shape)
    if len(shape) != 3 or shape[-1] not in (2, 3, 4):
        raise DataError(path, f"mask is not 2-D (shape {tuple(shape)}); expected one channel "
                              "of instance ids or 0/nonzero values")
    return tuple(shape[:2])


def _drop_unit_axes(array: np.ndarray) -> np.ndarray:
    """Remove size-1 leading/trailing axes of arrays above 2-D, e.g. (1, H, W) or (H, W, 1)."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return array
