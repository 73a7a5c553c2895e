"""Region sources: an image read rectangle by rectangle, so that a slide never has to fit in memory.

A :class:`RegionSource` is the contract between readers (``maskrcnn.data.lazy.open_regions`` for
tiled/pyramidal TIFF and OME-Zarr; :class:`ArraySource` for an image already in memory) and the
streaming prediction (``maskrcnn.prediction.large``):

- ``shape``: (H, W) of the full-resolution plane;
- ``channels``: 0 when :meth:`RegionSource.read` gives (h, w) regions, else C of (h, w, C), C <= 4;
- ``dtype``: the file's pixel type, which ``read`` and ``sample`` keep (normalisation depends on it);
- ``read(y0, y1, x0, x1)``: the half-open rectangle [y0, y1) x [x0, x1) at full resolution;
  bounds must satisfy ``0 <= y0 < y1 <= H`` and ``0 <= x0 < x1 <= W`` (:func:`check_region`);
- ``sample(max_pixels)``: the whole plane at reduced resolution, at most about ``max_pixels``
  pixels, for intensity statistics (percentiles) computed once for the whole image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import DataError

MAX_CHANNELS = 4


@runtime_checkable
class RegionSource(Protocol):
    """An image plane read by rectangles; see the module docstring for the contract."""

    path: Path
    shape: tuple[int, int]
    channels: int
    dtype: np.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """[y0, y1) x [x0, x1) -> (h, w) or (h, w, C) in the file's dtype."""
        ...

    def sample(self, max_pixels: int) -> np.ndarray:
        """The whole plane at reduced resolution: (h, w[, C]) with h * w <= about ``max_pixels``."""
        ...


def check_region(source: RegionSource, y0: int, y1: int, x0: int, x1: int) -> None:
    """Raise ValueError unless [y0, y1) x [x0, x1) is a non-empty rectangle inside ``source``."""
    height, width = source.shape
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"region [{y0}:{y1}, {x0}:{x1}] is empty or outside the image of shape "
                         f"{(height, width)} ({source.path})")


def sample_step(shape: tuple[int, int], max_pixels: int) -> int:
    """The stride s such that every s-th row and column of ``shape`` gives <= ``max_pixels`` pixels.

    Striding (not averaging) keeps real pixel values, so percentiles of the sample estimate
    those of the image (averaging would shrink the tails that ``high_percentile`` looks at).
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    height, width = shape
    step = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    while math.ceil(height / step) * math.ceil(width / step) > max_pixels:
        step += 1
    return step


class ArraySource:
    """A :class:`RegionSource` over an (H, W) or (H, W, C) array already in memory (C <= 4).

    Regions are views of the array (no copy); ``path`` names where the array came from, for
    error messages (default ``<array>``).
    """

    def __init__(self, array: np.ndarray, path: str | Path = "<array>") -> None:
        self.path = Path(path)
        array = np.asarray(array)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= MAX_CHANNELS)) or 0 in array.shape:
            raise DataError(self.path, f"unsupported image shape {array.shape}; expected (H, W) or "
                                       f"(H, W, C) with C <= {MAX_CHANNELS}")
        self.array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.channels = int(array.shape[2]) if array.ndim == 3 else 0
        self.dtype = array.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """[y0, y1) x [x0, x1) -> a view (h, w) or (h, w, C) of the array."""
        check_region(self, y0, y1, x0, x1)
        return self.array[y0:y1, x0:x1]

    def sample(self, max_pixels: int) -> np.ndarray:
        """Every s-th row and column (:func:`sample_step`): <= ``max_pixels`` pixels."""
        step = sample_step(self.shape, max_pixels)
        return self.array[::step, ::step]

    def __repr__(self) -> str:
        return f"ArraySource({self.path}, shape={self.shape}, channels={self.channels}, dtype={self.dtype})"
