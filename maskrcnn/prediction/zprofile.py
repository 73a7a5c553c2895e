"""What a 3-D instance's profile along z says about it, for instances built from 2-D planes.

A 2-D model segments each plane of a stack alone, and four things are only visible along z:

- **Out-of-focus light.** The microscope's blur is longer in z than in the plane, so the planes
  beyond a nucleus's caps show a dim, wide copy of it, which the 2-D model outlines as more of the
  nucleus (stitched instances were 2.4 planes longer than the truth on average). Along z, the
  instance's contrast against its surroundings rises to a peak and falls off; its z-extent is kept
  to the planes around the peak where the contrast is at least half of it (the half-maximum: where
  a symmetric blur puts any edge).
- **Flat background.** In planes far from any nucleus the model outlines patches of noise; an
  instance whose contrast never reaches ``MIN_CONTRAST`` of the stack's intensity range (nuclei
  stand out by 0.2 to 1) is dropped.
- **Nuclei stacked in z.** Stitching joins two nuclei lying one on the other; their cross-section
  area narrows between them, and an instance is split where a plane's area is under ``WAIST`` of
  the largest area on both sides.
- **Nuclei stacked at a slant.** Where one nucleus lies partly over another, the planes between
  them show both as one blob (the 2-D model outlines them as one mask), and stitching joins them.
  A nucleus's cross-sections share one centre; here the centre travels from one nucleus to the
  other. An instance whose first and last large sections (at least ``SECTION`` of its largest)
  lie more than ``DRIFT`` of its largest radius apart is split where its centre passes halfway.

:class:`Profiles` collects each plane's per-instance area, contrast and centre as planes are
labelled (one plane in memory at a time) and returns a :class:`Relabel` that maps every plane's
ids to the final instances 1..N. Measured on synthetic stacks (benchmarks/volume.py; the
thresholds were chosen on other seeds): see docs/benchmarks.md#z-stacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HALF = 0.5  # an instance's planes keep at least this fraction of its peak contrast
MIN_CONTRAST = 0.05  # in the normalised image's units (0..1 over the stack's intensity range)
WAIST = 0.7  # a plane's area under this fraction of the largest on both sides splits the instance
DRIFT = 0.8  # centres of the end sections further apart than this many largest radii split the instance
SECTION = 0.3  # the end sections DRIFT compares: the first and last of at least this fraction of the largest
RING = 3  # pixels around an instance's mask in a plane that give its local background
CENTRE_ROWS = 128  # rows of a plane whose coordinates are summed at a time


@dataclass
class PlaneProfile:
    """The instances of one labelled plane: ids (K,), area in pixels (K,), contrast (K,): the
    absolute difference of the mean image inside the mask and in the ring of background around it,
    and centre (K, 2): the mask's mean (row, column)."""

    ids: np.ndarray
    area: np.ndarray
    contrast: np.ndarray
    centre: np.ndarray


def plane_profile(labels: np.ndarray, image: np.ndarray) -> PlaneProfile:
    """(H, W) integer ids and the (H, W) image the model saw -> each instance's area, contrast and
    centre. The ring of an instance: background pixels within RING of it (where two instances share
    one, the larger id takes it; an instance with none is compared to all rings of the plane)."""
    flat = labels.reshape(-1).astype(np.int64)
    values = image.reshape(-1).astype(np.float64)
    size = int(flat.max(initial=0)) + 1
    area = np.bincount(flat, minlength=size)
    inside = np.bincount(flat, values, minlength=size)
    ids = np.flatnonzero(area[1:]) + 1
    if not len(ids):
        return PlaneProfile(ids, area[ids], np.zeros(0), np.zeros((0, 2)))
    # float64 max-pooling dilates the ids exactly (ids < 2**53)
    near = F.max_pool2d(torch.from_numpy(labels.astype(np.float64))[None, None], 2 * RING + 1, 1, RING)
    near = near.reshape(-1).numpy().astype(np.int64)
    ring = (flat == 0) & (near > 0)
    ring_area = np.bincount(near[ring], minlength=size)
    ring_sum = np.bincount(near[ring], values[ring], minlength=size)
    everywhere = ring_sum.sum() / max(int(ring_area.sum()), 1)
    around = np.where(ring_area[ids] > 0, ring_sum[ids] / np.maximum(ring_area[ids], 1), everywhere)
    contrast = np.abs(inside[ids] / area[ids] - around)
    return PlaneProfile(ids, area[ids], contrast, _centres(labels, size, ids, area[ids]))


def _centres(labels: np.ndarray, size: int, ids: np.ndarray, area: np.ndarray) -> np.ndarray:
    """The mean (row, column) of each of ``ids`` (with ``area`` pixels) in the (H, W) ``labels``
    (ids < ``size``) -> (K, 2). Summed over blocks of rows: a large plane's coordinates are never
    all in memory at once."""
    height, width = labels.shape
    sums = np.zeros((2, size))
    columns = np.arange(width, dtype=np.float64)
    for top in range(0, height, CENTRE_ROWS):
        block = labels[top:top + CENTRE_ROWS].reshape(-1).astype(np.int64)
        rows = np.arange(top, min(top + CENTRE_ROWS, height), dtype=np.float64)
        sums[0] += np.bincount(block, np.repeat(rows, width), minlength=size)
        sums[1] += np.bincount(block, np.tile(columns, len(rows)), minlength=size)
    return sums[:, ids].T / area[:, None]


@dataclass
class Relabel:
    """Every plane's ids (as labelled) -> the final ids 1..count (0: dropped); ``planes[z]`` holds
    plane z's (ids, final ids). Call as ``relabel(z, plane)``."""

    planes: list[tuple[np.ndarray, np.ndarray]]
    size: int  # ids as labelled are < size
    count: int

    def __call__(self, z: int, plane: np.ndarray) -> np.ndarray:
        lut = np.zeros(max(self.size, int(plane.max(initial=0)) + 1), np.int32)
        ids, final = self.planes[z]
        lut[ids] = final
        return lut[plane]


class Profiles:
    """Per-plane profiles of a stack's 3-D instances, fed a plane at a time; ``relabel`` decides."""

    def __init__(self):
        self.planes: list[PlaneProfile] = []

    def add(self, labels: np.ndarray, image: np.ndarray | None) -> None:
        """The next plane's (H, W) 3-D ids and its (H, W) normalised image (None: areas only, and
        ``relabel`` then only drops thin instances)."""
        if image is None:  # nothing is refined: the centres are not needed
            ids, area = np.unique(labels[labels > 0], return_counts=True)
            self.planes.append(PlaneProfile(ids.astype(np.int64), area, np.full(len(ids), np.nan),
                                            np.full((len(ids), 2), np.nan)))
        else:
            self.planes.append(plane_profile(labels, image))

    def relabel(self, min_planes: int) -> Relabel:
        """Split where the centre drifts and at waists, trim to the half-maximum, drop the faint and
        those in fewer than ``min_planes`` planes (not in a stack of fewer planes); number the rest
        1..N in order of their first appearance."""
        min_planes = min_planes if len(self.planes) >= min_planes > 1 else 1
        z = np.concatenate([np.full(len(p.ids), k) for k, p in enumerate(self.planes)] + [np.zeros(0, int)])
        ids = np.concatenate([p.ids for p in self.planes] + [np.zeros(0, np.int64)])
        area = np.concatenate([p.area for p in self.planes] + [np.zeros(0)]).astype(np.float64)
        contrast = np.concatenate([p.contrast for p in self.planes] + [np.zeros(0)])
        centre = np.concatenate([p.centre for p in self.planes] + [np.zeros((0, 2))])
        order = np.lexsort((z, ids))
        final = np.zeros(len(ids), np.int32)
        starts = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]]) if len(ids) else []
        count = 0
        for begin, end in zip(starts, [*starts[1:], len(ids)]):
            rows = order[begin:end]
            for lo, hi in _pieces(z[rows], area[rows], contrast[rows], centre[rows], min_planes):
                count += 1
                final[rows[lo:hi + 1]] = count
        size = int(ids.max(initial=0)) + 1
        return Relabel([(ids[z == k], final[z == k]) for k in range(len(self.planes))], size, count)


def _pieces(z: np.ndarray, area: np.ndarray, contrast: np.ndarray, centre: np.ndarray,
            min_planes: int) -> list[tuple[int, int]]:
    """One stitched instance's rows (its planes in order) -> the (first, last) rows of the 3-D
    instances it makes (see the module); contrast NaN: only the thin rule applies."""
    runs = np.split(np.arange(len(z)), np.flatnonzero(np.diff(z) != 1) + 1)  # planes in a row
    pieces = [(int(r[0]), int(r[-1])) for r in runs]
    if not np.isnan(contrast).any():
        pieces = [part for lo, hi in pieces for part in _split_drift(area, centre, lo, hi)]
        pieces = [part for lo, hi in pieces for part in _split_waists(area, lo, hi)]
        pieces = [kept for lo, hi in pieces if (kept := _half_maximum(contrast, lo, hi)) is not None]
    return [(lo, hi) for lo, hi in pieces if hi - lo + 1 >= min_planes]


def _split_drift(area: np.ndarray, centre: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows lo..hi split recursively while the centres of their first and last sections of at
    least SECTION of the largest area lie more than DRIFT largest radii apart: the second part
    begins at the first row whose centre has passed halfway from the one to the other."""
    if hi - lo < 3:
        return [(lo, hi)]
    seg = area[lo:hi + 1]
    large = np.flatnonzero(seg >= SECTION * seg.max())
    first, axis = centre[lo + large[0]], centre[lo + large[-1]] - centre[lo + large[0]]
    gap = float(np.hypot(*axis))
    if gap <= DRIFT * math.sqrt(seg.max() / math.pi):
        return [(lo, hi)]
    along = (centre[lo:hi + 1] - first) @ axis / gap**2  # 0 at the first large section, 1 at the last
    after = large[0] + 1  # the cut comes after the first large section, at the latest at the last
    cut = lo + after + int(np.argmax(along[after:] >= 0.5))
    return _split_drift(area, centre, lo, cut - 1) + _split_drift(area, centre, cut, hi)


def _split_waists(area: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows lo..hi split recursively at their narrowest plane while it is under WAIST of the
    largest area on both sides; the waist plane joins the side of its smaller neighbour (it is
    that nucleus's cap)."""
    if hi - lo < 2:
        return [(lo, hi)]
    seg = area[lo:hi + 1]
    before, after = np.maximum.accumulate(seg), np.maximum.accumulate(seg[::-1])[::-1]
    ratio = seg[1:-1] / np.minimum(before[:-2], after[2:])
    j = int(np.argmin(ratio)) + 1
    if ratio[j - 1] >= WAIST:
        return [(lo, hi)]
    cut = lo + j if seg[j + 1] < seg[j - 1] else lo + j + 1  # first row of the second part
    return _split_waists(area, lo, cut - 1) + _split_waists(area, cut, hi)


def _half_maximum(contrast: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
    """The rows around the peak of contrast[lo..hi] with at least HALF of it; None when the peak
    is under MIN_CONTRAST."""
    peak = lo + int(np.argmax(contrast[lo:hi + 1]))
    floor = HALF * contrast[peak]
    if contrast[peak] < MIN_CONTRAST:
        return None
    first, last = peak, peak
    while first > lo and contrast[first - 1] >= floor:
        first -= 1
    while last < hi and contrast[last + 1] >= floor:
        last += 1
    return first, last
