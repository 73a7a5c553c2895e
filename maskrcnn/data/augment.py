"""Training augmentations that move an image and its instance masks together.

Tensors: image (C, H, W) float in [0, 1], masks (G, H, W) bool, labels (G,) int64. All random
draws come from the ``torch.Generator`` passed in, so equal generator states give equal outputs.
Scaling and cropping are one resampling step, so only the output window is ever materialised
(a 2048x2048 image with 2000 masks is never resized whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Size = tuple[int, int]


def resample_window(image: Tensor, masks: Tensor, labels: Tensor, scale: float, top: int, left: int,
                    size: Size) -> tuple[Tensor, Tensor, Tensor]:
    """Cut ``size`` = (h, w) pixels at (top, left) out of the image resized by ``scale``.

    The resized image has round(H * scale) x round(W * scale) pixels; window pixels outside it
    are 0 (padding, e.g. when the image is smaller than the crop). The image is sampled
    bilinearly as ``F.interpolate(align_corners=False)`` would, the masks by the nearest pixel
    at the same source position, so they stay aligned. Instances with no pixel left are dropped.

    Returns image (C, h, w), masks (G', h, w) and labels (G',).
    """
    (_, height, width), (out_h, out_w) = image.shape, size
    rows, row_span = _source_positions(height, round(height * scale), top, out_h)
    cols, col_span = _source_positions(width, round(width * scale), left, out_w)
    out_image = image.new_zeros(image.shape[0], out_h, out_w)
    if rows.numel() == 0 or cols.numel() == 0:  # the window misses the image entirely
        return out_image, masks.new_zeros(0, out_h, out_w), labels[:0]
    out_image[:, row_span, col_span] = _bilinear(image, rows, cols)
    near_r, near_c = (rows + 0.5).floor().long(), (cols + 0.5).floor().long()  # increasing
    r0, c0 = int(near_r[0]), int(near_c[0])
    window = masks[:, r0:int(near_r[-1]) + 1, c0:int(near_c[-1]) + 1]
    hit = window.flatten(1).any(dim=1)  # copy only the instances the window touches
    sampled = window[hit][:, near_r - r0][:, :, near_c - c0]
    keep = sampled.flatten(1).any(dim=1)
    out_masks = masks.new_zeros(int(keep.sum()), out_h, out_w)
    out_masks[:, row_span, col_span] = sampled[keep]
    return out_image, out_masks, labels[hit][keep]


def _source_positions(length: int, scaled: int, start: int, count: int) -> tuple[Tensor, slice]:
    """Source coordinates of output pixels ``start .. start+count-1`` of a length->scaled resize.

    Returns the coordinates (pixel-centre convention, clamped at 0 like ``F.interpolate``) of
    the output pixels that fall inside the resized image, and the slice of those pixels.
    """
    first, last = max(start, 0), min(start + count, scaled)
    if first >= last:
        return torch.zeros(0), slice(0, 0)
    centres = (torch.arange(first, last, dtype=torch.float64) + 0.5) * (length / scaled) - 0.5
    return centres.clamp(min=0), slice(first - start, last - start)


def _bilinear(image: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Sample (C, H, W) at the grid rows x cols of (non-negative) source coordinates."""
    def taps(coords: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
        low = coords.floor().long().clamp(max=length - 1)
        weight = (coords - low).clamp(0, 1).to(image.dtype)
        return low, (low + 1).clamp(max=length - 1), weight

    r0, r1, wr = taps(rows, image.shape[1])
    c0, c1, wc = taps(cols, image.shape[2])
    by_rows = image[:, r0] * (1 - wr)[:, None] + image[:, r1] * wr[:, None]
    return by_rows[:, :, c0] * (1 - wc) + by_rows[:, :, c1] * wc


def random_window(masks: Tensor, scale: float, size: Size, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a ``size`` window in the image resized by ``scale``.

    When there are instances, the window contains a pixel of one chosen uniformly, so crops
    from large sparse images rarely come out empty. A window larger than the image places the
    image at a random offset inside it.
    """
    _, height, width = masks.shape
    scaled = (round(height * scale), round(width * scale))
    anchor = None
    if masks.shape[0]:
        instance = int(torch.randint(masks.shape[0], (), generator=generator))
        ys, xs = masks[instance].nonzero(as_tuple=True)
        pixel = len(ys) // 2
        anchor = (int((ys[pixel] + 0.5) * scaled[0] / height), int((xs[pixel] + 0.5) * scaled[1] / width))
    return tuple(_offset(scaled[i], size[i], None if anchor is None else anchor[i], generator)
                 for i in range(2))


def _offset(length: int, window: int, anchor: int | None, generator: torch.Generator) -> int:
    """Random start of a ``window`` over ``length`` pixels, covering ``anchor`` when given."""
    low, high = min(0, length - window), max(0, length - window)
    if anchor is not None:
        low, high = max(low, anchor - window + 1), min(high, anchor)
    return int(torch.randint(low, high + 1, (), generator=generator))


def flip(image: Tensor, masks: Tensor, horizontal: bool, vertical: bool) -> tuple[Tensor, Tensor]:
    """Mirror image (C, H, W) and masks (G, H, W) left-right and/or top-bottom."""
    dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
    return (image.flip(dims), masks.flip(dims)) if dims else (image, masks)


def rot90(image: Tensor, masks: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rotate image (C, H, W) and masks (G, H, W) by k quarter turns (counter-clockwise)."""
    return torch.rot90(image, k, dims=(-2, -1)), torch.rot90(masks, k, dims=(-2, -1))


def jitter_intensity(image: Tensor, brightness: float, contrast: float) -> Tensor:
    """Scale contrast about the image mean by ``contrast``, add ``brightness``, clip to [0, 1]."""
    mean = image.mean()
    return ((image - mean) * contrast + mean + brightness).clamp(0, 1)


@dataclass
class Augment:
    """Random scale + crop, flips, quarter turns and brightness/contrast, in that order.

    ``crop_size`` (int or (h, w)) fixes the output size (None keeps the whole resized image).
    The scale is log-uniform in ``scale_range``. Quarter turns of a non-square crop are limited
    to 0 and 180 degrees so the output size stays fixed. Contrast is log-uniform in
    [1/(1+contrast), 1+contrast], brightness uniform in [-brightness, brightness].
    """

    crop_size: int | Size | None = None
    scale_range: tuple[float, float] = (0.75, 1.33)
    flips: bool = True
    rot90: bool = True
    intensity: bool = True
    brightness: float = 0.1
    contrast: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if isinstance(self.crop_size, int):
            self.crop_size = (self.crop_size, self.crop_size)
        if self.crop_size is not None and min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")

    def __call__(self, image: Tensor, masks: Tensor, labels: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """image (C, H, W), masks (G, H, W) bool, labels (G,) -> the same, augmented."""
        low, high = (math.log(s) for s in self.scale_range)
        scale = math.exp(low + (high - low) * _uniform(generator))
        size = self.crop_size or (round(image.shape[1] * scale), round(image.shape[2] * scale))
        top, left = random_window(masks, scale, size, generator)
        image, masks, labels = resample_window(image, masks, labels, scale, top, left, size)
        if self.flips:
            image, masks = flip(image, masks, _uniform(generator) < 0.5, _uniform(generator) < 0.5)
        if self.rot90:
            turns = int(torch.randint(4, (), generator=generator))
            image, masks = rot90(image, masks, turns if size[0] == size[1] else turns // 2 * 2)
        if self.intensity:
            contrast = (1 + self.contrast) ** (2 * _uniform(generator) - 1)
            brightness = self.brightness * (2 * _uniform(generator) - 1)
            image = jitter_intensity(image, brightness, contrast)
        return image, masks, labels


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
