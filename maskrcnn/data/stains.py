"""Brightfield stains as optical densities (Ruifrok & Johnston's colour deconvolution).

A brightfield slide absorbs light: each stain (haematoxylin, eosin, DAB) adds an optical density
``d`` along its own colour vector, and the transmitted light is ``white * 10 ** -(d @ vectors)``
(Beer-Lambert). :func:`stains_to_rgb` draws that (the synthetic slides); :func:`rgb_to_stains`
inverts it (the ``he`` model's input). ``STAIN_VECTORS`` are scikit-image's ``rgb_from_hed``, so
``rgb_to_stains(x) / 6`` is ``skimage.color.rgb2hed(x)`` (it measures density in units of
ln(1e6) / ln(10) = 6 absorbance units); the tests check that.
"""

from __future__ import annotations

import numpy as np

# rows: the RGB absorbance of one unit of haematoxylin, eosin and DAB (skimage.color.rgb_from_hed)
STAIN_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAIN_NAMES = ("haematoxylin", "eosin", "DAB")
MIN_TRANSMISSION = 1e-6  # darker pixels are clipped here before the logarithm


def stains_to_rgb(density: np.ndarray, vectors: np.ndarray = STAIN_VECTORS,
                  white: np.ndarray | float = 1.0) -> np.ndarray:
    """(H, W, 3) densities (absorbance) of the three stains -> (H, W, 3) float32 RGB in [0, 1]."""
    absorbance = density.astype(np.float32) @ vectors.astype(np.float32)
    return np.clip(np.asarray(white, np.float32) * 10.0 ** -absorbance, 0.0, 1.0)


def rgb_to_stains(rgb: np.ndarray, vectors: np.ndarray = STAIN_VECTORS) -> np.ndarray:
    """(H, W, 3) RGB transmission in [0, 1] -> (H, W, 3) float32 stain densities (absorbance),
    negative densities (colours no stain mix makes) clipped to 0 as scikit-image does."""
    absorbance = -np.log10(np.maximum(rgb.astype(np.float32), MIN_TRANSMISSION))
    return np.maximum(absorbance @ np.linalg.inv(vectors).astype(np.float32), 0.0)
