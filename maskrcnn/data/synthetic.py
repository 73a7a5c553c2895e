"""Deterministic synthetic fluorescence-nuclei images with exact instance labels.

Nuclei are ellipses of log-uniform size and random orientation, part of them placed against an
earlier one so that touching and overlapping pairs are common. A later ellipse occludes an
earlier one; an occluded nucleus split into pieces keeps only its largest piece, so every
instance is one 4-connected component. The image adds a flat-topped intensity profile with a
darker rim (so touching nuclei show a seam), chromatin-like texture, uneven background and
illumination, blur and noise. Everything is plain numpy (no scipy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .writers import write_image, write_label_image


def synth_nuclei(size: int | tuple[int, int], rng: np.random.Generator,
                 n_range: tuple[int, int] = (10, 40),
                 diameter_range: tuple[float, float] = (6.0, 60.0),
                 touch_fraction: float = 0.4, min_pixels: int = 15,
                 dtype: type[np.unsignedinteger] = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image with ``n_range`` (inclusive) nuclei before occlusion and small-piece removal.

    Args:
        size: image height and width (an int for a square image).
        rng: the only source of randomness: equal generator states give equal outputs.
        diameter_range: range of the long diameter in pixels (drawn log-uniformly).
        touch_fraction: fraction of nuclei placed against an earlier one (touching or overlapping).
        min_pixels: instances with fewer visible pixels are removed (they become background).
        dtype: ``np.uint8`` (full range) or ``np.uint16`` (12-bit camera range, 0..4095).

    Returns:
        image (H, W) ``dtype`` and labels (H, W) int32 with ids 1..N in placement order.
    """
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"dtype must be np.uint8 or np.uint16, got {dtype}")
    height, width = (size, size) if isinstance(size, int) else size
    count = int(rng.integers(n_range[0], n_range[1] + 1))
    ellipses = _place_ellipses(count, (height, width), rng, diameter_range, touch_fraction)
    labels, radius = _rasterise(ellipses, (height, width))
    labels = _relabel(_largest_pieces(labels), min_pixels)
    image = _render(labels, radius, rng)
    top = 255 if dtype == np.uint8 else 4095
    return np.round(image * top).astype(dtype), labels.astype(np.int32)


def write_synthetic_dataset(root: str | Path, n_images: int, size: int | tuple[int, int], seed: int,
                            **synth_options: Any) -> list[str]:
    """Write ``root/images/synth_NNNN.png`` + ``root/masks/synth_NNNN.png`` (16-bit labels).

    Image ``i`` depends only on ``(seed, i)``, so a larger ``n_images`` extends a smaller set.
    ``synth_options`` go to :func:`synth_nuclei`. Returns the sample names.
    """
    root = Path(root)
    names = []
    for i in range(n_images):
        name = f"synth_{i:04d}"
        image, labels = synth_nuclei(size, np.random.default_rng([seed, i]), **synth_options)
        write_image(root / "images" / f"{name}.png", image)
        write_label_image(root / "masks" / f"{name}.png", labels)
        names.append(name)
    return names


def _place_ellipses(count: int, shape: tuple[int, int], rng: np.random.Generator,
                    diameter_range: tuple[float, float], touch_fraction: float) -> np.ndarray:
    """(count, 5) ellipses as (cy, cx, semi-axis a, semi-axis b, angle)."""
    height, width = shape
    log_d = rng.uniform(np.log(diameter_range[0]), np.log(diameter_range[1]), count)
    a = np.exp(log_d) / 2
    b = a * rng.uniform(0.6, 1.0, count)
    angle = rng.uniform(0, np.pi, count)
    centers = rng.uniform(0, 1, (count, 2)) * (height, width)
    touch = rng.uniform(0, 1, count) < touch_fraction
    partner = rng.uniform(0, 1, count)  # picks an earlier nucleus
    direction = rng.uniform(0, 2 * np.pi, count)
    gap = rng.uniform(0.65, 1.0, count)  # < 1: overlap, ~1: touch
    mean_radius = (a + b) / 2
    for i in np.flatnonzero(touch[1:]) + 1:
        j = int(partner[i] * i)
        distance = gap[i] * (mean_radius[i] + mean_radius[j])
        centers[i] = centers[j] + distance * np.array([np.sin(direction[i]), np.cos(direction[i])])
    return np.column_stack([centers, a, b, angle])


def _rasterise(ellipses: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint ellipses in order (later ones on top).

    Returns labels (H, W) int64 (ellipse index + 1, 0 = background) and radius (H, W) float32:
    the squared normalised radius (0 at the centre, 1 on the rim) within the visible ellipse.
    """
    height, width = shape
    labels = np.zeros(shape, dtype=np.int64)
    radius = np.ones(shape, dtype=np.float32)
    for index, (cy, cx, a, b, angle) in enumerate(ellipses):
        cos, sin = np.cos(angle), np.sin(angle)
        reach_y = np.hypot(a * sin, b * cos)  # half extents of the rotated ellipse
        reach_x = np.hypot(a * cos, b * sin)
        y0, y1 = max(0, int(cy - reach_y)), min(height, int(np.ceil(cy + reach_y)) + 1)
        x0, x1 = max(0, int(cx - reach_x)), min(width, int(np.ceil(cx + reach_x)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # pixel centres
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        q = ((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2
        inside = q <= 1
        labels[y0:y1, x0:x1][inside] = index + 1
        radius[y0:y1, x0:x1][inside] = q[inside]
    return labels, radius


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected pieces of equal nonzero labels: (H, W) int64 piece ids >= 1, 0 = background.

    Works on horizontal runs rather than pixels (a run is connected by construction), joining
    runs that touch vertically with a vectorised union-find: roots hook to the smaller root,
    then paths are compressed, until every edge joins equal roots.
    """
    foreground = labels > 0
    starts = foreground.copy()
    starts[:, 1:] &= labels[:, 1:] != labels[:, :-1]
    run = np.cumsum(starts.reshape(-1)).reshape(labels.shape)  # run ids 1..R on foreground
    vertical = foreground[1:] & (labels[1:] == labels[:-1])
    n_runs = int(run.max()) if run.size else 0
    keys = np.unique(run[:-1][vertical] * (n_runs + 1) + run[1:][vertical])
    upper, lower = keys // (n_runs + 1), keys % (n_runs + 1)
    parent = np.arange(n_runs + 1)
    while True:
        root_u, root_l = parent[upper], parent[lower]
        if np.array_equal(root_u, root_l):
            return np.where(foreground, parent[run], 0)
        low = np.minimum(root_u, root_l)
        np.minimum.at(parent, root_u, low)
        np.minimum.at(parent, root_l, low)
        parent = _compress(parent)


def _compress(parent: np.ndarray) -> np.ndarray:
    """Point every node of a forest (parent[i] <= i) straight at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Set to 0 every piece of an instance except its largest connected piece."""
    pieces = _components(labels)
    sizes = np.bincount(pieces.reshape(-1))
    owner = np.zeros(sizes.size, dtype=labels.dtype)
    owner[pieces] = labels  # background writes 0 into piece 0
    ids = np.flatnonzero(sizes[1:]) + 1
    order = ids[np.lexsort((-sizes[ids], owner[ids]))]  # by owner, largest piece first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    keep = np.zeros(sizes.size, dtype=bool)
    keep[order[first]] = True
    return np.where(keep[pieces], labels, 0)


def _relabel(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop instances under ``min_pixels`` pixels and renumber the rest 1..N in id order."""
    counts = np.bincount(labels.reshape(-1))
    kept = np.flatnonzero(counts >= min_pixels)
    kept = kept[kept > 0]
    lut = np.zeros(counts.size, dtype=np.int64)
    lut[kept] = np.arange(1, kept.size + 1)
    return lut[labels]


def _render(labels: np.ndarray, radius: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fluorescence-like (H, W) float image in [0, 1] for the given labels."""
    shape = labels.shape
    brightness = np.r_[0.0, rng.uniform(0.35, 0.9, labels.max())]
    profile = 1 - 0.45 * radius**2  # flat top, darker rim
    texture = _gaussian_blur(rng.standard_normal(shape).astype(np.float32), 1.5)
    texture /= max(float(texture.std()), 1e-6)
    nuclei = brightness[labels] * profile * (1 + 0.12 * texture)
    background = _smooth_field(shape, rng, 0.02, 0.15)
    illumination = _smooth_field(shape, rng, 0.7, 1.0)
    image = _gaussian_blur((background + illumination * nuclei).astype(np.float32), rng.uniform(0.6, 1.4))
    image += rng.normal(0, rng.uniform(0.01, 0.035), shape).astype(np.float32)
    return np.clip(image, 0, 1)


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """(H, W) slowly varying field in [low, high]: a random 4x4 grid under Gaussian weights.

    Rows of the weight matrices sum to 1, so each pixel is a convex combination of grid values.
    """
    grid = rng.uniform(low, high, (4, 4))
    rows, cols = (_basis(n, 4) for n in shape)
    return (rows @ grid @ cols.T).astype(np.float32)


def _basis(length: int, knots: int) -> np.ndarray:
    """(length, knots) row-normalised Gaussian weights of knots spread evenly over the axis."""
    position = (np.arange(length) + 0.5) / length
    centers = np.linspace(0, 1, knots)
    weights = np.exp(-0.5 * ((position[:, None] - centers[None, :]) * knots) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) float32 image with reflected borders.

    Plain numpy (a sum of shifted slices): cheap for these small kernels and, unlike torch ops,
    free of thread start-up costs inside data-loader workers.
    """
    half = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    padded = np.pad(image, half, mode="reflect")
    height, width = image.shape
    rows = sum(t * padded[:, i:i + width] for i, t in enumerate(taps))
    return sum(t * rows[i:i + height, :] for i, t in enumerate(taps))
