"""Synthetic 3-D nuclei stacks (Z, H, W) with exact 3-D instance labels, for tests and measurement.

Nuclei are ellipsoids of random size, elongation and orientation (a random 3-D rotation), part of
them placed against an earlier one so that touching pairs are common (a later nucleus occludes an
earlier one). The stack is sampled with ``anisotropy`` times coarser steps in z than in x and y
(confocal and light-sheet stacks: 2-5x), and the image adds chromatin texture, blur that is wider
in z than in the plane (the microscope's point-spread function), dimming with depth (scattering),
background and Poisson-Gaussian noise. Plain numpy: per-voxel work is vectorised per nucleus box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic import _gaussian_blur


@dataclass(frozen=True)
class Stack:
    """What one stack shows."""

    diameter: float = 16.0  # typical nucleus diameter in x-y pixels
    count: int = 12  # nuclei placed (before occlusion)
    anisotropy: float = 2.0  # z step / x-y pixel size
    touch_fraction: float = 0.4
    depth_decay: float = 0.5  # brightness lost from the top plane to the bottom one
    blur_xy: float = 1.0  # pixels
    blur_z: float = 3.0  # x-y pixels (the point-spread function's length along z; in planes: / anisotropy)
    photons: float = 300.0


def synth_stack(shape: tuple[int, int, int], rng: np.random.Generator,
                stack: Stack = Stack()) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) uint16 image stack and (Z, H, W) int32 labels (ids 1..N, every id present)."""
    depth, height, width = shape
    labels = np.zeros(shape, np.int32)
    brightness = np.zeros(stack.count + 1, np.float32)
    centres = np.zeros((stack.count, 3))
    radii = np.zeros((stack.count, 3))
    for i in range(stack.count):
        radii[i] = stack.diameter / 2 * np.exp(rng.normal(0, 0.15)) * rng.uniform([1.0, 0.7, 0.6], [1.0, 1.0, 0.9])
        if i and rng.uniform() < stack.touch_fraction:  # against an earlier nucleus, in a random direction
            j, direction = int(rng.integers(0, i)), rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            centres[i] = centres[j] + direction * (radii[i].mean() + radii[j].mean()) * rng.uniform(0.85, 1.0)
        else:  # x, y, z in x-y pixel units
            centres[i] = rng.uniform([0, 0, 0], [width, height, depth * stack.anisotropy])
        brightness[i + 1] = rng.uniform(0.4, 1.0)
        _paint(labels, i + 1, centres[i], radii[i], _rotation(rng), stack.anisotropy)
    labels, kept = _renumber(labels)
    return _render(labels, np.r_[0.0, brightness[kept]], stack, rng), labels


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _paint(labels: np.ndarray, value: int, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
           anisotropy: float) -> None:
    """Set the voxels of one ellipsoid (x, y, z centre and semi-axes in x-y pixel units) to ``value``."""
    depth, height, width = labels.shape
    reach = radii.max()
    x0, x1 = max(0, int(centre[0] - reach)), min(width, int(np.ceil(centre[0] + reach)) + 1)
    y0, y1 = max(0, int(centre[1] - reach)), min(height, int(np.ceil(centre[1] + reach)) + 1)
    z0, z1 = max(0, int((centre[2] - reach) / anisotropy)), min(depth, int(np.ceil((centre[2] + reach) / anisotropy)) + 1)
    if x0 >= x1 or y0 >= y1 or z0 >= z1:
        return
    z, y, x = np.meshgrid(np.arange(z0, z1) * anisotropy, np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
    offsets = np.stack([x + 0.5 - centre[0], y + 0.5 - centre[1], z + anisotropy / 2 - centre[2]], axis=-1)
    local = offsets @ rotation  # coordinates along the ellipsoid's own axes
    inside = ((local / radii) ** 2).sum(-1) <= 1
    labels[z0:z1, y0:y1, x0:x1][inside] = value


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..N in placement order, dropping nuclei occluded entirely or under 20 voxels; and the
    placement ids kept (id k was placed as kept[k - 1])."""
    ids, counts = np.unique(labels, return_counts=True)
    kept = ids[(ids > 0) & (counts >= 20)]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[kept] = np.arange(1, len(kept) + 1)
    return lut[labels], kept

def _render(labels: np.ndarray, brightness: np.ndarray, stack: Stack, rng: np.random.Generator) -> np.ndarray:
    """Noise-free nuclei (brightness per id, 0 for the background) -> the camera's uint16 stack."""
    depth = labels.shape[0]
    texture = np.stack([_gaussian_blur(rng.standard_normal(labels.shape[1:]).astype(np.float32), 1.2)
                        for _ in range(depth)])
    texture /= max(float(texture.std()), 1e-6)
    body = brightness.astype(np.float32)[labels] * (1 + 0.15 * texture)
    planes = np.stack([_gaussian_blur(p.astype(np.float32), stack.blur_xy) for p in body])
    taps = np.exp(-0.5 * (np.arange(-3, 4) / max(stack.blur_z / stack.anisotropy, 1e-3)) ** 2)
    taps /= taps.sum()
    padded = np.pad(planes, ((3, 3), (0, 0), (0, 0)), mode="edge")
    blurred = sum(t * padded[k:k + depth] for k, t in enumerate(taps))  # the wider blur along z
    dimming = 1 - stack.depth_decay * np.arange(depth, dtype=np.float32) / max(depth - 1, 1)
    image = blurred * dimming[:, None, None] + 0.03
    noisy = rng.poisson(np.clip(image, 0, None) * stack.photons) / stack.photons
    noisy = noisy + rng.normal(0, 0.01, image.shape)
    return np.clip(np.round(noisy * 3000 + 100), 0, 65535).astype(np.uint16)
