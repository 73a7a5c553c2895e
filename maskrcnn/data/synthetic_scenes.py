"""Synthetic fluorescence-microscopy scenes: the training data of the built-in ``nuclei`` model.

:func:`synth_nuclei` draws ellipses under one look; a scene first draws what a real acquisition
varies between images (:class:`Scene`): nucleus size and density, outlines (elongated,
kidney-shaped, irregular), a 3-50x brightness range between nuclei, out-of-focus dim nuclei beside
sharp ones, small bright condensed (mitotic or apoptotic) nuclei, chromatin texture and nucleoli,
uneven background and vignetting, Poisson-Gaussian noise, 8-, 12- or 16-bit output, and debris
that is not a nucleus (unlabelled). Everything is plain numpy; per-pixel work stays vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reader import DEFAULT_CLASS_NAMES, InstanceReader, Sample
from .synthetic import _gaussian_blur, _largest_pieces, _relabel, _smooth_field

# 8-bit images fill the byte; 16-bit ones come from 10-, 12- and 16-bit cameras with a dark offset
BIT_DEPTH_TOPS = {8: 255, 10: 1023, 12: 4095, 16: 65535}


@dataclass(frozen=True)
class Scene:
    """What one image shows. Drawn by :meth:`draw`; every field is a per-image setting."""

    diameter: float  # typical long diameter of a nucleus, pixels
    size_spread: float  # sigma of the per-nucleus log-diameter
    coverage: float  # nucleus area / image area before occlusion
    touch_fraction: float  # nuclei placed against an earlier one
    min_aspect: float  # short / long axis of the most elongated nuclei
    irregularity: float  # amplitude of the outline's 2nd..5th harmonics
    kidney_fraction: float  # nuclei with a dent in their outline
    condensed_fraction: float  # small bright (mitotic / apoptotic) nuclei
    dynamic_range: float  # brightest / dimmest ordinary nucleus
    defocus_fraction: float  # dim, blurred out-of-focus nuclei
    texture: float  # chromatin texture amplitude
    nucleoli: float  # nucleoli per 100 nucleus pixels (dark or bright by ``nucleoli_sign``)
    nucleoli_sign: float
    background: float  # mean background level (fraction of the brightest nucleus)
    vignetting: float  # fractional fall-off of illumination at the corners
    blur: float  # optical blur sigma of in-focus structures, pixels
    photons: float  # photons at full brightness: Poisson noise scale
    read_noise: float  # Gaussian noise sigma, fraction of full range
    debris: int  # unlabelled specks and fibres per 256 x 256 pixels
    bits: int  # 8, 10, 12 or 16

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Scene":
        def log_uniform(low: float, high: float) -> float:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))

        return cls(
            diameter=log_uniform(7.0, 60.0), size_spread=rng.uniform(0.08, 0.3),
            coverage=rng.uniform(0.05, 0.75), touch_fraction=rng.uniform(0.1, 0.7),
            min_aspect=rng.uniform(0.35, 0.85), irregularity=rng.uniform(0.0, 0.12),
            kidney_fraction=rng.uniform(0.0, 0.3), condensed_fraction=rng.uniform(0.0, 0.08),
            dynamic_range=log_uniform(2.0, 50.0), defocus_fraction=rng.uniform(0.0, 0.5),
            texture=rng.uniform(0.03, 0.3), nucleoli=rng.uniform(0.0, 1.5), nucleoli_sign=rng.choice([-1.0, 1.0]),
            background=log_uniform(0.005, 0.15), vignetting=rng.uniform(0.0, 0.5), blur=rng.uniform(0.5, 1.8),
            photons=log_uniform(15.0, 3000.0), read_noise=log_uniform(0.002, 0.03),
            debris=int(rng.integers(0, 8)), bits=int(rng.choice([8, 8, 10, 12, 16])))


def synth_scene(size: int | tuple[int, int], rng: np.random.Generator,
                scene: Scene | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image of a scene (drawn from ``rng`` when None).

    Returns image (H, W) uint8 for 8-bit scenes or uint16 otherwise, and labels (H, W) int32
    with ids 1..N, every instance one 4-connected piece of at least a few pixels.
    """
    height, width = (size, size) if isinstance(size, int) else size
    scene = scene or Scene.draw(rng)
    nuclei = _draw_nuclei(scene, (height, width), rng)
    labels, radius = rasterise_shapes(nuclei, (height, width))
    pieces = _largest_pieces(labels)
    min_pixels = max(8, int(0.05 * scene.diameter**2))
    labels = _relabel(pieces, min_pixels)
    # _relabel keeps id order, so new id k is the k-th shape with enough visible pixels
    counts = np.bincount(pieces.reshape(-1), minlength=len(nuclei) + 1)[1:]
    image = _render(scene, labels, radius, nuclei[counts >= min_pixels], rng)
    image = _add_debris(image, scene, rng)
    return _digitise(_noisy(image, scene, rng), scene, rng), labels.astype(np.int32)


# columns of the shape table
CY, CX, A, B, ANGLE, KIND, BRIGHT = range(7)
HARMONICS = slice(7, 15)  # amplitude and phase of harmonics 2..5
DENT = slice(15, 17)  # dent depth and direction
ORDINARY, CONDENSED, DEFOCUSED = 0.0, 1.0, 2.0


def _draw_nuclei(scene: Scene, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(N, 17) shapes: centre, semi-axes, angle, kind, brightness, harmonics, dent."""
    height, width = shape
    mean_area = np.pi / 4 * scene.diameter**2 * (0.5 + scene.min_aspect / 2)
    count = int(np.clip(rng.poisson(scene.coverage * height * width / mean_area), 1, height * width // 40))
    kind = np.where(rng.uniform(size=count) < scene.condensed_fraction, CONDENSED,
                    np.where(rng.uniform(size=count) < scene.defocus_fraction, DEFOCUSED, ORDINARY))
    long_axis = scene.diameter * np.exp(rng.normal(0, scene.size_spread, count))
    long_axis = np.clip(np.where(kind == CONDENSED, long_axis * rng.uniform(0.35, 0.7, count), long_axis), 4, None)
    aspect = rng.uniform(scene.min_aspect, 1.0, count)
    aspect = np.where(kind == CONDENSED, rng.uniform(0.3, 0.9, count), aspect)
    a, b = long_axis / 2, long_axis / 2 * aspect
    # ordinary brightness spans the dynamic range; condensed chromatin is 1.5-3x the brightest
    bright = np.exp(rng.uniform(-np.log(scene.dynamic_range), 0, count))
    bright = np.where(kind == CONDENSED, rng.uniform(1.5, 3.0, count), bright)
    bright = np.where(kind == DEFOCUSED, bright * rng.uniform(0.3, 0.7, count), bright)
    centers = _touching_centers(rng.uniform(0, 1, (count, 2)) * (height, width), (a + b) / 2, scene, rng)
    amplitude = scene.irregularity * rng.uniform(0, 1, (count, 4)) / np.arange(1, 5)
    phase = rng.uniform(0, 2 * np.pi, (count, 4))
    dent = np.where(rng.uniform(size=count) < scene.kidney_fraction, rng.uniform(0.15, 0.35, count), 0.0)
    return np.column_stack([centers, a, b, rng.uniform(0, np.pi, count), kind, bright,
                            amplitude, phase, dent, rng.choice([np.pi / 2, -np.pi / 2], count)])


def _touching_centers(centers: np.ndarray, radius: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    count = len(centers)
    touch = rng.uniform(0, 1, count) < scene.touch_fraction
    partner, direction = rng.uniform(0, 1, count), rng.uniform(0, 2 * np.pi, count)
    gap = rng.uniform(0.75, 1.05, count)  # < 1: overlap (the later one occludes), ~1: touch
    for i in np.flatnonzero(touch[1:]) + 1:
        j = int(partner[i] * i)
        step = gap[i] * (radius[i] + radius[j])
        centers[i] = centers[j] + step * np.array([np.sin(direction[i]), np.cos(direction[i])])
    return centers


def rasterise_shapes(shapes: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint star-shaped outlines in order (later ones on top).

    A shape is an ellipse whose radius is scaled by ``1 + sum_k a_k cos(k t + p_k)`` (harmonics
    2..5) and by ``1 - d exp(-(t - t_d)^2 / 0.18)`` (a kidney dent), t the angle in the ellipse's
    own frame. Returns labels (H, W) int64 (row + 1) and the squared normalised radius (H, W)
    float32 (0 at the centre, 1 on the outline) within the visible shape.
    """
    height, width = shape
    labels = np.zeros(shape, dtype=np.int64)
    radius = np.ones(shape, dtype=np.float32)
    k = np.arange(2, 6, dtype=np.float32)
    for index, row in enumerate(shapes):
        cy, cx, a, b, angle = row[:5]
        amplitude, phase = row[HARMONICS][:4], row[HARMONICS][4:]
        depth, toward = row[DENT]
        reach = a * (1 + amplitude.sum())
        y0, y1 = max(0, int(cy - reach)), min(height, int(np.ceil(cy + reach)) + 1)
        x0, x1 = max(0, int(cx - reach)), min(width, int(np.ceil(cx + reach)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = (dx * cos + dy * sin) / a, (dy * cos - dx * sin) / b
        t = np.arctan2(v, u)
        scale = 1 + (amplitude[:, None, None] * np.cos(k[:, None, None] * t + phase[:, None, None])).sum(0)
        wrapped = np.angle(np.exp(1j * (t - toward)))
        scale = scale * (1 - depth * np.exp(-wrapped**2 / 0.18))
        q = (u * u + v * v) / np.maximum(scale, 0.2) ** 2
        inside = q <= 1
        labels[y0:y1, x0:x1][inside] = index + 1
        radius[y0:y1, x0:x1][inside] = q[inside]
    return labels, radius


def _render(scene: Scene, labels: np.ndarray, radius: np.ndarray, nuclei: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Noise-free (H, W) float image; 1.0 is the brightest ordinary nucleus."""
    shape = labels.shape
    bright = np.r_[0.0, nuclei[:, BRIGHT]]
    kind = np.r_[ORDINARY, nuclei[:, KIND]]
    texture_gain = np.where(kind == CONDENSED, 3 * scene.texture + 0.2, scene.texture)
    fine = _unit_noise(shape, rng, 1.0)
    coarse = _unit_noise(shape, rng, max(1.5, scene.diameter / 8))
    spots = _gaussian_blur((rng.uniform(size=shape) < scene.nucleoli / 100).astype(np.float32),
                           max(0.8, scene.diameter / 25))
    spots /= max(float(spots.max()), 1e-6)
    profile = 1 - 0.4 * radius**2  # flat top, darker rim: touching nuclei show a seam
    body = bright[labels] * profile * np.clip(1 + texture_gain[labels] * (0.6 * coarse + 0.4 * fine)
                                              + 0.6 * scene.nucleoli_sign * spots, 0.1, None)
    defocused = kind[labels] == DEFOCUSED
    sharp = _gaussian_blur(np.where(defocused, 0, body).astype(np.float32), scene.blur)
    soft = _gaussian_blur(np.where(defocused, body, 0).astype(np.float32), max(2.0, scene.diameter / 6))
    light = _illumination(shape, scene, rng)
    return light * (sharp + soft) + scene.background * _smooth_field(shape, rng, 0.5, 1.5)


def _unit_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    noise = _gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _illumination(shape: tuple[int, int], scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination times a radial vignette centred near the image centre."""
    height, width = shape
    cy, cx = rng.uniform(0.3, 0.7, 2) * (height, width)
    ys = ((np.arange(height) + 0.5 - cy) / (height / 2))[:, None] ** 2
    xs = ((np.arange(width) + 0.5 - cx) / (width / 2))[None, :] ** 2
    vignette = 1 - scene.vignetting * np.clip((ys + xs) / 2, 0, 1)
    return (_smooth_field(shape, rng, 0.75, 1.0) * vignette).astype(np.float32)


def _add_debris(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Unlabelled bright specks (1.5-4 px) and dim fibres: what a detector must learn to leave out."""
    height, width = image.shape
    count = rng.poisson(scene.debris * height * width / 256**2)
    if count == 0:
        return image
    fibre = rng.uniform(size=count) < 0.3
    length = np.where(fibre, rng.uniform(12, 40, count), rng.uniform(1.5, 4, count))
    aspect = np.where(fibre, rng.uniform(0.06, 0.15, count), rng.uniform(0.6, 1, count))
    shapes = np.zeros((count, 17))
    shapes[:, :2] = rng.uniform(0, 1, (count, 2)) * (height, width)
    shapes[:, A], shapes[:, B] = np.maximum(length / 2, 0.8), np.maximum(length / 2 * aspect, 0.8)
    shapes[:, ANGLE] = rng.uniform(0, np.pi, count)
    marks, _ = rasterise_shapes(shapes, (height, width))
    level = np.r_[0.0, np.where(fibre, rng.uniform(0.1, 0.4, count), rng.uniform(0.8, 2.5, count))]
    return image + _gaussian_blur(level[marks].astype(np.float32), scene.blur)


def _noisy(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Poisson shot noise at ``photons`` for 1.0 plus Gaussian read noise."""
    shot = rng.poisson(np.clip(image, 0, None) * scene.photons) / scene.photons
    return (shot + rng.normal(0, scene.read_noise, image.shape)).astype(np.float32)


def _digitise(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The camera's integers: the brightest ordinary nucleus lands at 40-95% of the range (brighter
    structures may saturate), 10- to 16-bit cameras add a dark offset."""
    top = BIT_DEPTH_TOPS[scene.bits]
    offset = 0.0 if scene.bits == 8 else rng.uniform(0, 0.05) * top
    values = offset + image * rng.uniform(0.4, 0.95) * top
    return np.clip(np.round(values), 0, top).astype(np.uint8 if scene.bits == 8 else np.uint16)


class SceneReader(InstanceReader):
    """``count`` synthetic scenes as a dataset, drawn when read: sample ``i`` is a pure function of
    ``(seed, i)`` (any process, any order, after a resume), so nothing is written to disk and a
    long pretraining never sees the same image twice."""

    prefix = "scene"  # of the sample names

    def __init__(self, count: int, size: int | tuple[int, int], seed: int):
        self.size, self.seed = size, seed
        self.names = [f"{self.prefix}_{seed}_{i:06d}" for i in range(count)]
        self.class_names = list(DEFAULT_CLASS_NAMES)

    @staticmethod
    def draw(size: int | tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image, labels) pair: what a subclass draws instead."""
        return synth_scene(size, rng)

    def _load(self, index: int) -> Sample:
        image, labels = self.draw(self.size, np.random.default_rng([self.seed, index]))
        count = int(labels.max())
        masks = labels[None] == np.arange(1, count + 1)[:, None, None]
        return Sample(self.names[index], image, masks, np.ones(count, np.int64), image_path=self.names[index])
