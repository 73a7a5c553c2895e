"""Sample data for napari (File > Open Sample > Mask R-CNN): synthetic nuclei with their true labels,
drawn by ``maskrcnn.data.synthetic.synth_nuclei`` from a fixed seed (no file, no download)."""

from __future__ import annotations

import numpy as np

from ..data.synthetic import synth_nuclei


def _layers(image: np.ndarray, labels: np.ndarray, name: str) -> list[tuple]:
    return [(image, {"name": name}, "image"),
            (labels, {"name": f"{name} truth", "opacity": 0.5, "visible": False}, "labels")]


def synthetic_nuclei() -> list[tuple]:
    """A 256x256 8-bit image of touching and overlapping nuclei (6-60 px) and its true label image."""
    image, labels = synth_nuclei(256, np.random.default_rng(0))
    return _layers(image, labels, "synthetic nuclei")


def synthetic_nuclei_large() -> list[tuple]:
    """A 2304x2304 image of about 750 nuclei (8-30 px): large enough to be segmented in tiles."""
    image, labels = synth_nuclei(2304, np.random.default_rng(0), n_range=(700, 800), diameter_range=(8.0, 30.0))
    return _layers(image, labels, "synthetic nuclei (large)")
