"""Z-stacks and 3-D label images: reading them, and their planes as 2-D training samples.

The layout is the labels layout with stacks: ``ROOT/images/NAME.ext`` Z-stacks (multi-page TIFF,
OME-TIFF, OME-Zarr; ``--channel`` / ``--t`` pick as for 2-D) and ``ROOT/masks/NAME.ext2`` 3-D label
images of the same (Z, H, W) shape (0 background, one id per nucleus). ``evaluate --3d`` scores
against it; ``train --3d`` learns from it through :class:`StackPlanesReader`: every z-plane that
shows a nucleus is one 2-D sample (a nucleus cut by the plane is one instance there), and with
``side_views`` also slices of the ZX and ZY views, resampled in z by the anisotropy (z step / pixel
size) so that nuclei keep their shape, as ``predict --3d-method ortho`` sees them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .io import image_stem, read_image
from .planes import STACK, Planes
from .labels import label_masks
from .reader import DEFAULT_CLASS_NAMES, InstanceReader, Sample, files_by_stem
from .voxels import stack_anisotropy

VIEW_NAMES = ("z", "y", "x")  # a sample's name ends with the axis it cuts and the index: "cells[z=3]"


def read_stack(path: Path, planes: Planes | None = None) -> np.ndarray:
    """(Z, H, W) or (Z, H, W, C) of a file or an OME-Zarr folder: every z-slice of the channel and
    time point chosen."""
    if Path(path).is_dir():  # OME-Zarr (or a zarr array): read through maskrcnn.data.lazy, whole
        from .lazy import open_regions

        return read_whole(open_regions(Path(path), stack_planes(planes)))
    return _with_z(read_image(path, stack_planes(planes)))


def stack_planes(planes: Planes | None) -> Planes:
    """``planes`` (the user's --channel and --t) with every z-slice kept."""
    return Planes(planes.channel, STACK, planes.t) if planes else Planes(z=STACK)


def read_whole(source) -> np.ndarray:
    """All of a region source opened with every z-slice (maskrcnn.data.lazy), as read_stack gives
    it; the source is closed."""
    try:
        return _with_z(source.read(0, source.shape[0], 0, source.shape[1]))
    finally:
        source.close()


def _with_z(stack: np.ndarray) -> np.ndarray:
    """A stack read with every z-slice -> (Z, H, W[, C]): an image with no Z axis is one plane."""
    flat = stack.ndim == 2 or (stack.ndim == 3 and stack.shape[-1] <= 4)
    return stack[None] if flat else stack


def read_label_stack(path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(Z, H, W) integer ids of a 3-D label image; ``shape``: the (Z, H, W) of its stack, checked."""
    return check_label_stack(path, read_stack(path), shape)


def check_label_stack(path: Path, labels, shape: tuple[int, ...] | None = None):
    """``labels`` (an array, or a LazyStack: maskrcnn.data.lazy_stack) read from ``path``, checked as
    a 3-D label image of the (Z, H, W) ``shape``; DataError naming the file otherwise."""
    if labels.ndim != 3 or labels.dtype.kind not in "iub":
        raise DataError(path, f"not a 3-D label image (shape {tuple(labels.shape)}, {labels.dtype})")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise DataError(path, f"labels of shape {tuple(labels.shape)} for a stack of {tuple(shape)} (ZYX)")
    return labels


def stack_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, stack file, 3-D label file) of a labels-layout folder, paired by file stem (OME-Zarr
    folders, ``NAME.zarr`` or ``NAME.ome.zarr``, count as files)."""
    root = Path(root)
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DataError(root / sub, "missing folder (3-D data are ROOT/images stacks and ROOT/masks labels)")
    images, masks = _stacks_by_stem(root / "images"), _stacks_by_stem(root / "masks")
    if not images:
        raise DataError(root / "images", "no image files found")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(root / "masks", f"no 3-D label image for {len(missing)} stack(s), e.g. '{missing[0]}'")
    return [(name, images[name], masks[name]) for name in sorted(images)]


def _stacks_by_stem(folder: Path) -> dict[str, Path]:
    """files_by_stem with the zarr folders of ``folder`` too."""
    found = files_by_stem(folder)
    for path in sorted(folder.glob("*.zarr")):
        if not path.is_dir():
            continue
        stem = image_stem(path)
        if stem in found:
            raise DataError(path, f"two stacks named '{stem}' ({found[stem].name} and {path.name}); keep one")
        found[stem] = path
    return found


def anisotropy_of(path: Path, given: float | None) -> float:
    """The z step / pixel size of a stack: ``given`` (--anisotropy), else its file's voxel size
    (maskrcnn.data.voxels), else 1."""
    return given if given is not None else stack_anisotropy(path) or 1.0


class StackPlanesReader(InstanceReader):
    """The 2-D samples of a folder of Z-stacks with 3-D labels (see the module).

    Only slices that show a nucleus are samples (the empty planes above and below the cells teach
    nothing the rest does not). Side views (``side_views``) take every ``stride``-th row (ZX) and
    column (ZY) slice, the stride making each view about as many samples as the stack's z-planes:
    neighbouring side slices are nearly the same image. ``stacks``: which stacks of the folder (by
    index in name order) to use, e.g. the training split. ``columns``: only this part of every
    stack's width, as fractions [start, stop) (one stack split into a training and a validation
    band: the ZY slices of the other band are not used either). The label images are read once
    here, to know which slices to use; pixels are read per sample, one stack cached.
    """

    def __init__(self, root: str | Path, planes: Planes | None = None, side_views: bool = False,
                 anisotropy: float | None = None, stacks: list[int] | None = None,
                 columns: tuple[float, float] = (0.0, 1.0)):
        pairs = stack_pairs(root)
        self.pairs = [pairs[i] for i in stacks] if stacks is not None else pairs
        self.planes, self.columns, self.class_names = planes, columns, list(DEFAULT_CLASS_NAMES)
        self.slices: list[tuple[int, int, int]] = []  # (pair, axis, index)
        self.anisotropy: list[float] = []
        for pair, (name, image_path, mask_path) in enumerate(self.pairs):
            labels = self._band(read_label_stack(mask_path))
            self.slices += [(pair, 0, z) for z in np.flatnonzero(labels.any(axis=(1, 2)))]
            self.anisotropy.append(anisotropy_of(image_path, anisotropy))
            if side_views and labels.shape[0] > 1:
                for axis in (1, 2):
                    stride = max(1, math.ceil(labels.shape[axis] / labels.shape[0]))
                    shown = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
                    self.slices += [(pair, axis, int(i)) for i in shown if i % stride == 0]
        band = "" if columns == (0.0, 1.0) else f"[{columns[0]:.2f}:{columns[1]:.2f}]"
        self.names = [f"{self.pairs[p][0]}{band}[{VIEW_NAMES[axis]}={i}]" for p, axis, i in self.slices]
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _band(self, stack: np.ndarray) -> np.ndarray:
        width = stack.shape[2]
        return stack[:, :, round(self.columns[0] * width):round(self.columns[1] * width)]

    def _stack(self, pair: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != pair:
            _, image_path, mask_path = self.pairs[pair]
            image = read_stack(image_path, self.planes)
            labels = read_label_stack(mask_path, image.shape[:3])
            self._cached = (pair, self._band(image), self._band(labels))
        return self._cached[1], self._cached[2]

    def _check_header(self, index: int) -> None:
        self._stack(self.slices[index][0])  # the stack is readable and of its labels' shape

    def _load(self, index: int) -> Sample:
        pair, axis, i = self.slices[index]
        image, labels = self._stack(pair)
        if axis == 0:
            plane, ids = image[i], labels[i]
        else:  # (Z, W[, C]) or (Z, H[, C]) slice, z stretched to the x-y pixel size
            plane, ids = stretch_depth(np.take(image, i, axis=axis), np.take(labels, i, axis=axis),
                                       self.anisotropy[pair])
        masks = label_masks(ids)
        return Sample(self.names[index], plane, masks, np.ones(len(masks), np.int64), str(self.pairs[pair][1]))


def stretch_depth(plane: np.ndarray, ids: np.ndarray, anisotropy: float) -> tuple[np.ndarray, np.ndarray]:
    """A side slice (Z, L[, C]) and its ids (Z, L), z resampled to round(Z * anisotropy) rows:
    the image linearly (back in its own dtype, which a fixed-range normaliser reads), the ids by
    the nearest row."""
    depth = plane.shape[0]
    rows = max(1, round(depth * anisotropy))
    if rows == depth:
        return plane, ids
    pixels = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # (Z, L, C)
    tall = F.interpolate(pixels.permute(2, 0, 1)[None], size=(rows, plane.shape[1]), mode="bilinear",
                         align_corners=False)[0].permute(1, 2, 0).numpy()
    nearest = np.minimum(((np.arange(rows) + 0.5) * depth / rows).astype(np.int64), depth - 1)
    tall = tall[..., 0] if plane.ndim == 2 else tall
    if plane.dtype.kind in "iub":
        tall = np.rint(tall)
    return tall.astype(plane.dtype), ids[nearest]

