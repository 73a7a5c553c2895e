"""Z-stacks: nuclei as 3-D objects, from the 2-D instances of each plane.

:func:`segment_stack` segments every plane of a (Z, H, W) stack with a 2-D predictor, all planes
scaled alike (the stack's intensity range, one resize chosen on a few of its planes: deep,
dim planes and planes between nuclei are not stretched into noise), and :func:`stitch_planes`
joins the planes' instances into 3-D ones as Cellpose's ``stitch_threshold`` does: each instance of
plane z takes the id of the instance of plane z - 1 it overlaps most (mask IoU at least the
threshold; one-to-one, best pairs first, so two nuclei touching in one plane keep two ids), or a
new id. The stitched instances are then refined along z by their profiles (maskrcnn.prediction.zprofile:
split where their centre drifts and at waists, trimmed to the half-maximum of their contrast, faint
ones dropped).
:func:`volume_table` measures the 3-D instances, :func:`volume_overlaps` matches them against 3-D
truth (the metrics of ``maskrcnn.metrics`` on voxels).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..metrics import Overlaps, label_overlaps
from ..runtime.memory import bound_heap, plan_inference, release_free_memory, resident_bytes
from .diameter import AutoScale, Scaling
from .orthoviews import combine_views, view_labels
from .plane_store import PlaneStore, labels_fit
from .zprofile import Profiles

SCALE_PLANES = 5  # planes a stack's nucleus diameter is estimated on (stack_scaling)
METHODS = ("stitch", "ortho")  # plane by plane, stitched; or the three orthogonal views combined
STITCH_THRESHOLD = 0.25  # the mask IoU at which an instance continues the one in the plane before
# 3-D instances in fewer planes are dropped: on 12 synthetic stacks (benchmarks/volume.py, 2026-12-06) the
# one-plane pieces were mostly false positives (pooled acc@0.5 0.533 -> 0.659, TP 112 -> 112, FP 71 -> 31)
MIN_PLANES = 2


@dataclass
class VolumeResult:
    """A stack's 3-D instances: labels (Z, H, W) int32 with ids 1..N (an array, or for a large stack
    predicted with ``spill`` a PlaneStore on disk), and how its planes were resized."""

    labels: np.ndarray | PlaneStore
    scaling: Scaling
    plane_instances: list[int]  # 2-D instances found in each plane, before stitching


def segment_stack(predictor, stack: np.ndarray, threshold: float = STITCH_THRESHOLD,
                  min_planes: int = MIN_PLANES, method: str = "stitch", anisotropy: float = 1.0,
                  spill: Path | None = None, refine: bool = True) -> VolumeResult:
    """(Z, H, W) or (Z, H, W, C) raw stack -> its 3-D instances (see the module); ``method``
    "ortho": from the YX, ZX and ZY views instead (maskrcnn.prediction.orthoviews; ``anisotropy``:
    z step / pixel size). Each plane is segmented whole or in tiles, as the predictor's memory
    budget allows; ``spill``: a folder where stitched labels that would not fit that budget are
    kept on disk (the result's labels are then a PlaneStore, which the caller closes).
    ``refine=False``: no refinement along z (maskrcnn.prediction.zprofile), only the thin rule."""
    if stack.ndim not in (3, 4):
        raise ValueError(f"expected a (Z, H, W) or (Z, H, W, C) stack, got shape {stack.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown 3-D method {method!r}: expected one of {', '.join(METHODS)}")
    normalizer = predictor.normalizer
    intensity = stack_intensity(normalizer, stack)
    scaling = stack_scaling(predictor.scale, stack, lambda plane: normalizer(plane, intensity))
    cfg, budget = predictor.model.cfg, predictor.max_memory
    in_memory = spill is None or method == "ortho" or labels_fit(stack.shape[:3], cfg, scaling.scale, budget)
    stitched_bytes = 4 * stack.shape[0] * stack.shape[1] * stack.shape[2] if method == "stitch" and in_memory else 0
    held = resident_bytes() + stitched_bytes  # the label volume, whose pages are taken as planes are written
    plan = plan_inference(cfg, stack.shape[1:3], budget, scale=scaling.scale, in_memory=True, resident=held)

    def predict(image: torch.Tensor) -> np.ndarray:
        tile = plan.tile if tuple(image.shape[1:]) == tuple(stack.shape[1:3]) else None  # side views: whole
        return predictor.predict_planned(image, tile, scale=scaling.scale).label_image.numpy()

    if method == "ortho":
        _check_views_fit(stack, anisotropy, budget)
        normalised = torch.stack([normalizer(plane, intensity) for plane in stack], dim=1)  # (C, Z, H, W)
        views = view_labels(predict, normalised, anisotropy)
        counts = [int(len(np.unique(p)) - 1) for p in views[0]]
        images = normalised.mean(0).numpy() if refine else None
        return VolumeResult(refine_volume(combine_views(views), images, min_planes), scaling, counts)
    if not in_memory:
        bound_heap()  # each plane's tensors go back to the OS when freed, as streamed tiles' do
    labels = np.zeros(stack.shape[:3], np.int32) if in_memory else PlaneStore(stack.shape[:3], spill)
    stitcher, counts = Stitcher(threshold), []
    for z, plane in enumerate(stack):
        image = normalizer(plane, intensity)
        found = predict(image)
        counts.append(int(len(np.unique(found)) - 1))
        labels[z] = stitcher.add(found, image.mean(0).numpy() if refine else None)
        release_free_memory()  # without it a 100-plane stack's heap fragments grew its peak by 0.3 GB
    return VolumeResult(relabel_volume(labels, stitcher.profiles, min_planes), scaling, counts)


def stack_intensity(normalizer, stack: np.ndarray) -> tuple[float, float]:
    """The intensity range all of a stack's planes are normalised with (from a sample of its rows)."""
    return normalizer.intensity_range(_sample_planes(stack))


def refine_volume(labels: np.ndarray, images: np.ndarray | None, min_planes: int = MIN_PLANES) -> np.ndarray:
    """(Z, H, W) 3-D instances (any integer ids) refined along z by their profiles in the (Z, H, W)
    normalised ``images`` (None: only the thin rule), relabelled 1..N in place; int32."""
    profiles = Profiles()
    for z, plane in enumerate(labels):
        profiles.add(plane, None if images is None else images[z])
    return relabel_volume(labels, profiles, min_planes).astype(np.int32, copy=False)


def relabel_volume(labels, profiles: Profiles, min_planes: int = MIN_PLANES):
    """``labels`` (Z, H, W) as labelled, an array (relabelled in place, a plane at a time) or a
    PlaneStore (relabelled on reading), given the final instances by their ``profiles``."""
    relabel = profiles.relabel(min_planes)
    if isinstance(labels, PlaneStore):
        labels.relabel = relabel
    else:
        for z, plane in enumerate(labels):
            plane[...] = relabel(z, plane)
    return labels


def choice_plane(stack: np.ndarray) -> np.ndarray:
    """The plane on which a stack's model (nuclei or he) is chosen: its middle one. Not the maximum
    projection: that of a thick fluorescence stack is bright all over, like a brightfield image (a
    100-plane synthetic stack was given the he model, which found 14517 pieces of its 5160 nuclei)."""
    return stack[len(stack) // 2]


def stack_scaling(scale, stack: np.ndarray, normalise, planes: int = SCALE_PLANES) -> Scaling:
    """The one resize of all of a stack's planes: fixed, or under AutoScale the estimate of the
    plane with the median nucleus diameter among ``planes`` evenly spaced ones (those where nuclei
    were found). Planes, not the maximum projection: in a thick stack the projection piles the
    nuclei of every depth into one blanket, and it shows every nucleus at its widest while the model
    sees planes cutting them anywhere. ``normalise``: raw plane -> (C, H, W)."""
    if not isinstance(scale, AutoScale):
        return Scaling(scale)
    depth = len(stack)
    picks = sorted({min(depth - 1, int((i + 0.5) * depth / planes)) for i in range(min(planes, depth))})
    found = [s for s in (scale.choose(normalise(stack[z])) for z in picks) if s.source == "objects"]
    if not found:
        return Scaling(1.0, None, 0, "none")
    return sorted(found, key=lambda s: s.diameter)[(len(found) - 1) // 2]


def _check_views_fit(stack: np.ndarray, anisotropy: float, budget: int) -> None:
    """Warn when the orthogonal views of ``stack`` will not fit the memory budget: they hold the
    normalised stack, its z-resampled copy and three int64 label volumes at once."""
    voxels = stack.shape[0] * stack.shape[1] * stack.shape[2]
    channels = stack.shape[3] if stack.ndim == 4 else 1
    need = voxels * (4 * channels * (1 + anisotropy) + 3 * 8 + 4)
    if resident_bytes() + need > budget:
        warnings.warn(f"--3d-method ortho holds about {need / 1e9:.1f} GB for this {stack.shape[:3]} stack, past "
                      f"the memory budget of {budget / 1e9:.1f} GB: stitching (the default) keeps to it")


def _sample_planes(stack, values: int = 1 << 24) -> np.ndarray:
    """The rows of all of ``stack``'s planes as one image, for its intensity range: every row when
    the stack is small, else evenly spaced rows of about ``values`` pixels in all (percentiles over
    a large stack's every voxel would copy the whole stack). A stack read a plane at a time
    (maskrcnn.data.lazy_stack) gives the rows of evenly spaced planes."""
    if not isinstance(stack, np.ndarray):
        depth, height, width = stack.shape[:3]
        count = max(1, min(depth, values // (height * width)))
        stack = np.stack([stack[int(z)] for z in np.linspace(0, depth - 1, count).round()])
    rows = stack.reshape(-1, *stack.shape[2:])  # (Z * H, W[, C]): every row of every plane
    step = max(1, rows.shape[0] * rows.shape[1] // values)
    return rows[::step] if step > 1 else rows


class Stitcher:
    """Joins the instances of a stack's planes, fed one plane at a time (see :func:`stitch_planes`)."""

    def __init__(self, threshold: float = STITCH_THRESHOLD):
        self.threshold, self.next_id, self.previous = threshold, 1, None
        self.profiles = Profiles()  # each plane's instances: area, contrast, centre (maskrcnn.prediction.zprofile)

    def add(self, plane: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """One plane's label image (its own ids) and the (H, W) normalised image it was found in
        (None: no refinement along z) -> the same plane in stitched 3-D ids (int32)."""
        ids = np.unique(plane[plane > 0])
        mapping = {}
        if self.previous is not None and len(ids) and self.previous.any():
            mapping = _continued(label_overlaps(self.previous, plane), self.threshold)
        lut = np.zeros(int(plane.max(initial=0)) + 1, np.int32)
        for i in ids:
            if int(i) in mapping:
                lut[i] = mapping[int(i)]
            else:
                lut[i], self.next_id = self.next_id, self.next_id + 1
        out = lut[plane]
        self.profiles.add(out, image)
        self.previous = out
        return out


def stitch_planes(planes: np.ndarray, threshold: float = STITCH_THRESHOLD, min_planes: int = MIN_PLANES,
                  images: np.ndarray | None = None) -> np.ndarray:
    """(Z, H, W) per-plane label images (ids per plane) -> (Z, H, W) int32 3-D labels, ids 1..N;
    instances in fewer than ``min_planes`` planes are dropped (not in a stack of fewer planes).
    ``images``: the (Z, H, W) normalised planes, to refine the instances along z (see the module)."""
    stitcher = Stitcher(threshold)
    out = np.zeros(planes.shape, np.int32)
    for z, plane in enumerate(planes):
        out[z] = stitcher.add(plane, None if images is None else images[z])
    return relabel_volume(out, stitcher.profiles, min_planes)


def _continued(overlaps: Overlaps, threshold: float) -> dict[int, int]:
    """{id in this plane: id in the plane before} for pairs of IoU >= threshold, one-to-one, best first."""
    order = np.argsort(-overlaps.iou, kind="stable")
    taken_before, mapping = set(), {}
    for k in order:
        if overlaps.iou[k] < threshold:
            break
        before, now = int(overlaps.true_ids[overlaps.true_index[k]]), int(overlaps.pred_ids[overlaps.pred_index[k]])
        if before not in taken_before and now not in mapping:
            taken_before.add(before)
            mapping[now] = before
    return mapping


def volume_overlaps(truth, pred) -> Overlaps:
    """Pairwise 3-D IoU (voxels) of the instances of two (Z, H, W) label volumes: arrays, or
    volumes read a plane at a time (LazyStack, PlaneStore). Counted plane by plane, so that a
    100 x 1024 x 1024 pair needs memory for a plane's counts, not the volume's (a whole-volume
    joint histogram would take several GB of index arrays)."""
    if tuple(truth.shape[:3]) != tuple(pred.shape[:3]):
        raise ValueError(f"label volumes differ in size: truth {tuple(truth.shape)}, prediction {tuple(pred.shape)}")
    areas_t, areas_p, pairs = [], [], []
    for z in range(truth.shape[0]):
        t, p = np.asarray(truth[z]).astype(np.int64, copy=False), np.asarray(pred[z]).astype(np.int64, copy=False)
        areas_t.append(np.unique(t[t > 0], return_counts=True))
        areas_p.append(np.unique(p[p > 0], return_counts=True))
        both = (t > 0) & (p > 0)
        pairs.append(np.unique(t[both] * PAIR_STRIDE + p[both], return_counts=True))
    true_ids, true_area = _summed(areas_t)
    pred_ids, pred_area = _summed(areas_p)
    keys, intersection = _summed(pairs)
    t_index = np.searchsorted(true_ids, keys // PAIR_STRIDE)
    p_index = np.searchsorted(pred_ids, keys % PAIR_STRIDE)
    iou = intersection / (true_area[t_index] + pred_area[p_index] - intersection)
    return Overlaps(true_ids, pred_ids, t_index, p_index, iou)


PAIR_STRIDE = 1 << 32  # a (true id, predicted id) pair as one int64 key: ids below 2**32


def _summed(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane (keys, counts) -> every key once, ascending, with its counts summed."""
    keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([c for _, c in parts]) if parts else np.zeros(0, np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), counts, minlength=len(unique)).astype(np.int64)


def volume_table(labels) -> list[dict]:
    """One row per 3-D instance: id, volume (voxels), centroid (z, y, x) and bounding box (z0, y0,
    x0, z1, y1, x1; exclusive ends). ``labels``: (Z, H, W) ids, an array or a PlaneStore, read a
    plane at a time."""
    count = int(labels.max()) + 1 if len(labels) else 1
    height, width = labels.shape[1:]
    grid = [torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)]  # y, x per pixel
    volume = torch.zeros(count, dtype=torch.float64)
    sums = torch.zeros(3, count, dtype=torch.float64)
    lows = torch.full((3, count), 1 << 30, dtype=torch.int64)
    highs = torch.full((3, count), -1, dtype=torch.int64)
    for z, plane in enumerate(labels):
        flat = torch.from_numpy(np.asarray(plane).reshape(-1).astype(np.int64))
        here = torch.bincount(flat, minlength=count).double()
        volume += here
        sums[0] += z * here
        present = here > 0
        lows[0][present] = torch.minimum(lows[0][present], torch.tensor(z))
        highs[0][present] = z
        for axis, coords in enumerate(grid, start=1):
            sums[axis] += torch.bincount(flat, weights=coords.double(), minlength=count)
            lows[axis].scatter_reduce_(0, flat, coords, "amin")
            highs[axis].scatter_reduce_(0, flat, coords, "amax")
    rows = []
    for k in (torch.nonzero(volume[1:] > 0).flatten() + 1).tolist():
        rows.append({"id": k, "volume": int(volume[k]),
                     **{f"centroid_{a}": round(float(sums[i, k] / volume[k]), 2) for i, a in enumerate("zyx")},
                     **{f"{a}0": int(lows[i, k]) for i, a in enumerate("zyx")},
                     **{f"{a}1": int(highs[i, k]) + 1 for i, a in enumerate("zyx")}})
    return rows
