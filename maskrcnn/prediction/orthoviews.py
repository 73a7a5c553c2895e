"""Z-stacks from three orthogonal views: YX planes, and ZX and ZY slices of the stack resampled in z.

Cellpose's other 3-D mode segments the stack along all three axes and combines the views. A Mask
R-CNN gives instances, not flows, so the views are combined by what they say about neighbouring
voxels. :func:`view_labels` segments the YX planes and, after resampling z by the anisotropy (z
step / pixel size: nuclei are then as round in the side views as in the planes), every ZX and ZY
slice with the same 2-D predictor and resize; the side views' labels are sampled back onto the
stack's planes. :func:`combine_views` then keeps a voxel that the YX view and a side view call
nucleus, and joins two neighbouring voxels into one nucleus when both views that contain the step
between them (x: YX and ZX; y: YX and ZY; z: ZX and ZY) put them in one instance; the 3-D nuclei
are the connected parts of that graph. A boundary either view draws separates two nuclei, and z is
judged by the side views rather than by how much consecutive planes overlap. (Joining where one
view agrees and none disagrees merged nuclei stacked in z through the side views' blurred blobs:
pooled acc@0.5 0.395 against 0.472 on benchmarks/volume.py's stacks.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# the views that contain each axis of a (Z, H, W) stack: YX planes (0), ZX slices (1), ZY slices (2)
VIEWS_OF_AXIS = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


def resample_depth(stack: torch.Tensor, anisotropy: float) -> torch.Tensor:
    """(C, Z, H, W) normalised stack -> (C, round(Z * anisotropy), H, W), linear in z."""
    depth = max(1, round(stack.shape[1] * anisotropy))
    if depth == stack.shape[1]:
        return stack
    return F.interpolate(stack[None], size=(depth, *stack.shape[2:]), mode="trilinear", align_corners=False)[0]


def _plane_index(depth: int, resampled: int) -> np.ndarray:
    """For each plane of a stack of ``depth``, the nearest plane of its resampling to ``resampled``."""
    return np.minimum(((np.arange(depth) + 0.5) * resampled / depth).astype(np.int64), resampled - 1)


def view_labels(predict, stack: torch.Tensor, anisotropy: float) -> np.ndarray:
    """(C, Z, H, W) normalised stack -> (3, Z, H, W) int64 labels of the YX, ZX and ZY views.

    ``predict``: a normalised 2-D image (C, h, w) -> its (h, w) label image. Each slice's ids are
    made unique within its view (offset by the ids used so far), so that equal ids mean one
    instance of one slice."""
    channels, depth, height, width = stack.shape
    out = np.zeros((3, depth, height, width), np.int64)
    used = 0
    for z in range(depth):
        used = _place(out[0, z], predict(stack[:, z]), used)
    tall = resample_depth(stack, anisotropy)
    rows = _plane_index(depth, tall.shape[1])
    for y in range(height):
        used = _place(out[1, :, y, :], predict(tall[:, :, y, :])[rows], used)
    for x in range(width):
        used = _place(out[2, :, :, x], predict(tall[:, :, :, x])[rows], used)
    return out


def _place(target: np.ndarray, labels: np.ndarray, used: int) -> int:
    """Write ``labels`` (ids from 1) into ``target`` offset by ``used``; returns the ids used after."""
    labels = np.asarray(labels, np.int64)
    target[...] = np.where(labels > 0, labels + used, 0)
    return used + int(labels.max(initial=0))


def combine_views(views: np.ndarray) -> np.ndarray:
    """(3, Z, H, W) labels of the YX, ZX and ZY views -> (Z, H, W) int32 3-D labels, ids 1..N
    (see the module). A voxel is nucleus when the YX view and a side view call it so."""
    labels = torch.from_numpy(np.ascontiguousarray(views))
    # the planes are the views at the stack's own resolution: the side views, interpolated in z, show
    # streaks of noise that the model outlines as large dim nuclei (benchmarks/volume.py: 2 of 3 votes
    # left those in where both side views agreed)
    foreground = (labels[0] > 0) & ((labels[1] > 0) | (labels[2] > 0))
    joins = [_joins(labels, foreground, axis) for axis in range(3)]
    ids = torch.arange(1, foreground.numel() + 1, dtype=torch.int64).reshape(foreground.shape)
    ids = torch.where(foreground, ids, torch.zeros_like(ids))
    while True:  # spread the largest id along the joins until nothing changes
        before = ids
        for axis, join in enumerate(joins):
            ids = _spread(ids, join, axis)
        if torch.equal(ids, before):
            break
    _, dense = torch.unique(ids, return_inverse=True)  # 0 stays 0: it is the smallest id
    return dense.to(torch.int32).numpy()


def _joins(labels: torch.Tensor, foreground: torch.Tensor, axis: int) -> torch.Tensor:
    """(Z, H, W) bool with the last index along ``axis`` dropped: whether each voxel is joined to its
    next neighbour along ``axis`` (both nucleus; one instance in both views containing ``axis``)."""
    n = labels.shape[axis + 1]
    here = [labels[v].narrow(axis, 0, n - 1) for v in VIEWS_OF_AXIS[axis]]
    there = [labels[v].narrow(axis, 1, n - 1) for v in VIEWS_OF_AXIS[axis]]
    both = foreground.narrow(axis, 0, n - 1) & foreground.narrow(axis, 1, n - 1)
    same = torch.ones_like(both)
    for a, b in zip(here, there):
        same &= (a > 0) & (a == b)
    return both & same


def _spread(ids: torch.Tensor, join: torch.Tensor, axis: int) -> torch.Tensor:
    """One step of label spreading along ``axis`` in both directions across joined pairs."""
    n = ids.shape[axis]
    low, high = ids.narrow(axis, 0, n - 1), ids.narrow(axis, 1, n - 1)
    best = torch.where(join, torch.maximum(low, high), torch.zeros_like(low))
    ids = ids.clone()
    ids.narrow(axis, 0, n - 1).copy_(torch.maximum(low, best))
    ids.narrow(axis, 1, n - 1).copy_(torch.maximum(ids.narrow(axis, 1, n - 1), best))
    return ids
