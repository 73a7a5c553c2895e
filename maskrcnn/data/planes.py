"""Which 2-D plane of a multi-dimensional image to segment: ``--channel``, ``--z`` and ``--t``.

Microscopy files hold more than one plane: an OME-TIFF is up to TCZYX (time, channel, depth,
rows, columns; RGB files add S, the colour samples). :class:`Planes` is what the user chose;
:func:`select_planes` turns it, with a file's axes letters (tifffile's ``series.axes``, or the
NGFF axes of an OME-Zarr), shape and channel names, into a :class:`PlaneSelection`: the index to
take on every axis other than Y, X and S, and the z axis to project when ``z`` is ``max`` or
``mean``. The selection applies to a whole array (:meth:`PlaneSelection.apply`) or to a region of
it (:meth:`PlaneSelection.key` then :meth:`PlaneSelection.finish`), so eager and lazy reading
give the same pixels.

Defaults (an option left unset): the first time point, the first z-slice and, for an axis named
C, the first channel (channel 0, e.g. DAPI in a DAPI/GFP file); colour samples (S) are kept as
the (H, W, S) channels. Files whose axes are not known (PNG, ``.npy``, TIFFs without axes
metadata, tifffile's ``Q`` or ``I`` letters) get axes guessed from their shape as
:func:`maskrcnn.data.io.read_image` always did: a small axis (<= 4) is colour, a larger leading
one a stack whose first plane is used.

This module only computes; reading files is in :mod:`.io` and :mod:`.lazy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ConfigError
from ..errors import DataError

PROJECTIONS = ("max", "mean")
STACK = "stack"  # z: keep every z-slice, (Z, H, W[, S]) (predict --3d)
KNOWN_AXES = "TCZYXS"  # letters with a meaning here; others (Q, I, E, ...) make the layout guessed
MAX_CHANNELS = 4  # the most colour samples kept as channels (as maskrcnn.data.io)


@dataclass(frozen=True)
class Planes:
    """The plane chosen by the user; None keeps the default (see the module docstring).

    channel: a channel name (OME ``Channel Name=``, NGFF ``omero.channels[].label``) or a
    0-based index (a number that is a channel's name, e.g. 488, means that channel); z: a 0-based index, or ``"max"`` / ``"mean"`` to project all z-slices;
    t: a 0-based index. Bad values raise :class:`ConfigError` (one line).
    """

    channel: str | int | None = None
    z: int | str | None = None
    t: int | None = None

    def __post_init__(self) -> None:
        if self.channel is not None and not _index(self.channel) and not (
                isinstance(self.channel, str) and self.channel.strip()):
            raise ConfigError(f"--channel must be a channel name or an index >= 0, got {self.channel!r}")
        if self.z is not None and not _index(self.z) and self.z not in (*PROJECTIONS, STACK):
            raise ConfigError(f"--z must be an index >= 0, max or mean, got {self.z!r}")
        if self.t is not None and not _index(self.t):
            raise ConfigError(f"--t must be an index >= 0, got {self.t!r}")

    @classmethod
    def from_text(cls, channel: str | None = None, z: str | None = None, t: str | None = None) -> Planes:
        """The options as typed on the command line: digits are indices, other text a name or projection."""
        def number(text: str | None, flag: str) -> int | str | None:
            if text is None or not text.strip().lstrip("+-").isdigit():
                return text
            value = int(text)
            if value < 0:
                raise ConfigError(f"{flag} must be an index >= 0, got {value}")
            return value

        t_value = number(t, "--t")
        if isinstance(t_value, str):
            raise ConfigError(f"--t must be an index >= 0, got {t!r}")
        z_value = number(z, "--z")
        return cls(number(channel, "--channel"), z_value.lower() if isinstance(z_value, str) else z_value, t_value)

    @property
    def is_default(self) -> bool:
        """True when no option is set: files without OME axes are then read as they always were."""
        return self.channel is None and self.z is None and self.t is None


def _index(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class PlaneSelection:
    """How to turn an array of ``shape`` with ``axes`` into one (H, W) or (H, W, S) plane.

    ``picks[i]`` is the index taken on axis i, or None where the axis is kept (Y, X, S, and Z
    when ``projection`` is set).
    """

    axes: str
    shape: tuple[int, ...]
    picks: tuple[int | None, ...]
    projection: str | None = None

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """(H, W) or (H, W, S) of the result."""
        kept = {a: n for a, n, p in zip(self.axes, self.shape, self.picks) if p is None}
        return tuple(kept[a] for a in "YXS" if a in kept)

    def dtype(self, dtype: np.dtype) -> np.dtype:
        """The result's dtype for a file of ``dtype``: a mean projection is float32."""
        return np.dtype(np.float32) if self.projection == "mean" else np.dtype(dtype)

    def key(self, y: slice = slice(None), x: slice = slice(None)) -> tuple[int | slice, ...]:
        """The basic index of the array's region ``y``, ``x`` (numpy, zarr): picks and region slices."""
        region = {"Y": y, "X": x}
        return tuple(region.get(a, slice(None)) if p is None else p for a, p in zip(self.axes, self.picks))

    def finish(self, block: np.ndarray) -> np.ndarray:
        """The array indexed with :meth:`key` -> projected over Z and ordered (h, w) or (h, w, S)."""
        kept = "".join(a for a, p in zip(self.axes, self.picks) if p is None)
        if self.projection == STACK:  # every z-slice, first
            return np.moveaxis(block, [kept.index(a) for a in "ZYXS" if a in kept], range(len(kept)))
        if self.projection:
            z = kept.index("Z")
            # float32 for the mean: float64 would double the memory for no precision a model can use
            block = block.max(axis=z) if self.projection == "max" else block.mean(axis=z, dtype=np.float32)
            kept = kept.replace("Z", "")
        return np.moveaxis(block, [kept.index(a) for a in "YXS" if a in kept], range(len(kept)))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The whole array of ``shape`` -> its plane, (H, W) or (H, W, S)."""
        return self.finish(np.asarray(array[self.key()]))


def select_planes(path: Any, axes: str | None, shape: Sequence[int], channel_names: Sequence[str] = (),
                  planes: Planes | None = None) -> PlaneSelection:
    """The selection of ``planes`` in a file (``path``, for errors) of ``shape`` and ``axes``.

    ``axes``: one letter per axis (tifffile's convention: T C Z Y X S; others are unknown), or
    None when the file says nothing. Unknown layouts are guessed from the shape (module docstring).
    ``channel_names``: the names of the C axis (or of S when there is no C axis), for
    ``--channel NAME``. Raises :class:`DataError` naming the file for a name or index it does not
    have, an option for an axis it lacks, and shapes that hold no image.
    """
    planes = planes or Planes()
    shape = tuple(int(s) for s in shape)
    if axes is None or len(axes) != len(shape) or any(a not in KNOWN_AXES for a in axes) \
            or len(set(axes)) != len(axes) or not {"Y", "X"} <= set(axes):
        axes = guess_axes(path, shape)
    if 0 in shape:
        raise DataError(path, f"empty image (shape {shape})")
    size = dict(zip(axes, shape))
    channel_axis = "C" if "C" in size else "S"  # --channel picks a colour sample of RGB files
    # colour samples stay the plane's channels, unless --channel picks one or there is just one
    keep_samples = size.get("S", 1) > 1 and not (channel_axis == "S" and planes.channel is not None)
    if keep_samples and size["S"] > MAX_CHANNELS:
        raise DataError(path, f"{size['S']} colour samples per pixel (axes {axes}, shape {shape}); "
                              f"expected at most {MAX_CHANNELS}")
    projection = planes.z if planes.z in (*PROJECTIONS, STACK) and "Z" in size else None
    choice = {"T": _pick(path, "t", planes.t, size.get("T")),
              "Z": _pick(path, "z", planes.z, size.get("Z")),
              channel_axis: _channel(path, planes.channel, size.get(channel_axis), channel_names)}
    picks = tuple(None if a in "YX" or (a == "S" and keep_samples) or (a == "Z" and projection)
                  else choice.get(a) or 0 for a in axes)
    return PlaneSelection(axes, shape, picks, projection)


def guess_axes(path: Any, shape: tuple[int, ...]) -> str:
    """Axes letters for an array without (usable) axes metadata, by the rules read_image always had.

    Unit axes are ``Q`` (index 0); of the rest, (H, W) is YX, a 3-D array with a last axis <= 4
    is YXS, one with a first axis <= 4 is SYX (channels first), any other 3-D array ZYX (a stack
    of planes), and a 4-D array a Z stack of those. Other shapes raise :class:`DataError`.
    """
    dims = [s for s in shape if s != 1]
    if len(dims) < 2:  # (1, 1) and the like: keep trailing unit axes as the plane
        dims = list(shape[-2:])
    rest = _guess_plane(dims[-3:] if len(dims) == 4 else dims)
    guessed = ("Z" if len(dims) == 4 else "") + rest if rest else None
    if guessed is None:
        raise DataError(path, f"unsupported image shape {shape}; expected (H, W), (H, W, C) or (C, H, W) "
                              f"with C <= {MAX_CHANNELS}, or a stack of those")
    letters, it = [], iter(guessed)
    units = len(shape) - len(dims)
    for s in shape:
        if s == 1 and units > 0:
            letters.append("Q")
            units -= 1
        else:
            letters.append(next(it))
    return "".join(letters)


def _guess_plane(dims: list[int]) -> str | None:
    if len(dims) == 2:
        return "YX"
    if len(dims) != 3:
        return None
    if dims[-1] <= MAX_CHANNELS:
        return "YXS"
    return "SYX" if dims[0] <= MAX_CHANNELS else "ZYX"


def _pick(path: Any, axis: str, value: int | str | None, size: int | None) -> int | None:
    """The index taken on axis ``axis`` (t or z) of ``size``: None keeps it (a projection)."""
    if size is None:
        # index 0 or a projection of a missing axis is the one plane there is (2-D files mixed with stacks)
        if value is None or value == 0 or value in (*PROJECTIONS, STACK):
            return 0
        raise DataError(path, f"--{axis} {value}: the image has no {axis.upper()} axis")
    if value in (*PROJECTIONS, STACK):
        return None
    index = value or 0
    if index >= size:
        raise DataError(path, f"--{axis} {index} is out of range: the {axis.upper()} axis has {size} "
                              f"plane(s) (0..{size - 1})")
    return index


def _channel(path: Any, value: str | int | None, size: int | None, names: Sequence[str]) -> int | None:
    """The channel index of ``value`` (a name or index) on an axis of ``size`` channels. A number that
    is a channel's name is that name: channels are often named by wavelength (``--channel 488``)."""
    if not isinstance(value, str) and value is not None and str(value) in names:
        value = str(value)
    if value is None:
        return 0 if size is not None else None
    if size is None:
        if value == 0:
            return None  # a grey image is its own channel 0
        raise DataError(path, f"--channel {value}: the image has one channel")
    if isinstance(value, str):
        matches = [i for i, name in enumerate(names) if name == value]
        if not matches:
            listed = ", ".join(names) if names else "no channel names"
            raise DataError(path, f"no channel '{value}'; the file has: {listed}")
        return matches[0]
    if value >= size:
        named = f" ({', '.join(names)})" if names else ""
        raise DataError(path, f"--channel {value} is out of range: the image has {size} channel(s)"
                              f"{named}, 0..{size - 1}")
    return int(value)


def ome_channel_names(ome_xml: str | None, image: int = 0) -> list[str]:
    """The ``Channel Name=`` attributes of OME-XML image ``image``, in order ('' for unnamed ones)."""
    if not ome_xml:
        return []
    import tifffile

    try:
        ome = tifffile.xml2dict(ome_xml).get("OME", {})
    except Exception:  # damaged XML: tifffile then reads the file without OME axes too
        return []
    images = ome.get("Image", [])
    images = images if isinstance(images, list) else [images]
    if len(images) <= image:
        return []
    channels = images[image].get("Pixels", {}).get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    return [str(c.get("Name", "")) if isinstance(c, dict) else "" for c in channels]


def page_selection(selection: PlaneSelection, page_axes: str, pages: int) -> np.ndarray | None:
    """The numbers of the pages (2-D planes of ``page_axes``, e.g. YX) a selection needs, shaped as
    its kept leading axes ((Z,) for a projection, () for one plane), so that tifffile decodes only
    those; None when the series is not ``pages`` such pages in C order (read all of it then)."""
    lead = len(selection.axes) - len(page_axes)
    if lead < 0 or selection.axes[lead:] != page_axes or math.prod(selection.shape[:lead]) != pages:
        return None
    numbers = np.arange(pages).reshape(selection.shape[:lead])
    return numbers[selection.key()[:lead]]


def tiff_axes(tif: Any) -> tuple[str, tuple[str, ...], bool]:
    """(axes, channel names, is OME) of an open ``tifffile.TiffFile``'s first series: tifffile's
    axes letters, the OME ``Channel Name=`` list, and whether tifffile read its layout from OME-XML."""
    series = tif.series[0]
    ome = str(getattr(series, "kind", "")).lower() == "ome"
    names = tuple(ome_channel_names(tif.ome_metadata)) if ome else ()
    return series.axes, names, ome


def read_tiff_selection(tif: Any, selection: PlaneSelection) -> np.ndarray:
    """The selected plane of an open ``tifffile.TiffFile``'s first series, decoding only the pages
    it needs when the series is a plain stack of pages (OME-TIFF, ImageJ), else the whole series."""
    series = tif.series[0]
    page_axes = series.keyframe.axes
    numbers = page_selection(selection, page_axes, len(series.pages))
    if numbers is None:
        return selection.apply(series.asarray())
    lead = len(selection.axes) - len(page_axes)  # the axes numbering the pages (T, C, Z, ...)
    block = tif.asarray(key=numbers.ravel().tolist(), series=0)
    block = block.reshape(numbers.shape + tuple(selection.shape[lead:]))  # kept leading axes + one page
    return selection.finish(block[(Ellipsis, *selection.key()[lead:])])
