"""A Z-stack read a plane at a time (``predict --3d`` of stacks larger than memory should hold).

:func:`open_stack` gives the stack as an array when it is small, else a :class:`LazyStack`: a
TIFF (multi-page, OME-TIFF, BigTIFF) or OME-Zarr stack whose planes are decoded when indexed,
through maskrcnn.data.lazy (tifffile's zarr store, zarr >= 3: the ``slides`` extra), so a stack of
several GB is never in memory whole. A LazyStack answers what segmenting a stack asks of it:
``shape``, ``dtype``, ``ndim``, ``len``, ``stack[z]`` and iteration over planes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .lazy import is_lazy_candidate, open_regions
from .planes import Planes
from .stack_reader import read_stack, read_whole, stack_planes


class LazyStack:
    """(Z, H, W) or (Z, H, W, C) planes of a region source opened with every z-slice (see the module)."""

    def __init__(self, source):
        selection = source.selection
        self.source, self.selection = source, selection
        self.z_axis = selection.axes.index("Z")
        depth = selection.shape[self.z_axis]
        self.shape = (depth, *source.shape, *([source.channels] if source.channels else []))
        self.dtype, self.ndim = np.dtype(source.dtype), len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z: int) -> np.ndarray:
        """Plane ``z`` (H, W) or (H, W, C), decoded from the file now."""
        if not -len(self) <= z < len(self):
            raise IndexError(f"plane {z} of a stack of {len(self)}")
        z %= len(self)
        key = list(self.selection.key())
        key[self.z_axis] = slice(z, z + 1)
        block = self.source.levels[0][tuple(key)]
        return self.selection.finish(np.asarray(block))[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[z] for z in range(len(self)))

    def close(self) -> None:
        self.source.close()


def max_projection(stack: np.ndarray | LazyStack) -> np.ndarray:
    """The maximum over z of a stack, a plane at a time (a LazyStack is never read whole)."""
    out = np.array(stack[0])
    for plane in stack:
        np.maximum(out, plane, out=out)
    return out


def open_stack(path: Path, planes: Planes | None = None, lazy_from: int = 1 << 30) -> np.ndarray | LazyStack:
    """``path``'s stack (as :func:`maskrcnn.data.stack_reader.read_stack` reads it): a LazyStack when
    it holds more than ``lazy_from`` bytes and maskrcnn.data.lazy can read it a plane at a time
    (a TIFF or zarr with a Z axis, zarr installed), else an array. The caller closes a LazyStack."""
    if importlib.util.find_spec("zarr") is None or not is_lazy_candidate(path):
        return read_stack(path, planes)
    source = open_regions(Path(path), stack_planes(planes))
    selection = source.selection
    in_z = "Z" in selection.axes and selection.picks[selection.axes.index("Z")] is None
    size = int(np.prod([n for n, p in zip(selection.shape, selection.picks) if p is None])) * source.dtype.itemsize
    if in_z and size > lazy_from:
        return LazyStack(source)
    if Path(path).is_dir():  # read_stack would open the zarr folder again
        return read_whole(source)
    source.close()  # a TIFF read whole goes through read_image, as everywhere else
    return read_stack(path, planes)
