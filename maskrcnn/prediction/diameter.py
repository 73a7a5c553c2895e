"""``--diameter auto``: each image's typical nucleus diameter, so that it can be resized to the model's.

A model learns objects of some size; nuclei in another lab's images may be half or four times
that. :class:`AutoScale` estimates the median nucleus diameter of each image from a central window
of at most ``SAMPLE_SIDE`` pixels (the whole image when it is smaller; large and streamed images
are judged by that window): the window's bright objects (Otsu's threshold of the lightly smoothed
image, then 8-connected components) give the median of their equivalent diameters
(sqrt(4 area / pi)), divided by ``OBJECT_CALIBRATION`` (a threshold mask is smaller than an
annotated outline). With fewer than ``MIN_OBJECTS`` objects the image is not resized, nor when
the estimate is within ``TOLERANCE`` of the trained diameter: the model learnt that range (its
training resizes by 0.75-1.33), and resampling softens the image (on the DSB2018 image's held-out
band, resizing by 0.885, 0.94 and 0.8 cost 0.01-0.03 of the DSB2018 score). Dark nuclei on a light
background (brightfield) are found with ``bright=False``.

It needs no model pass, so it costs a fraction of the prediction and gives the same answer on
every machine. Its known weakness: touching nuclei make one object, so an image where most nuclei
touch in pairs comes out too large (measured in docs/benchmarks.md). Sizing by the detections of a
first model pass was tried and dropped: the built-in model of 2026-11-30 cuts large real nuclei,
so its detections came out 4-23% too small (docs/experiments.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..components import component_labels

SAMPLE_SIDE = 1024  # the central window the estimate looks at, pixels
OBJECT_CALIBRATION = 0.90  # median (threshold-object diameter / annotated diameter), 30 training images
MIN_OBJECTS = 3
MIN_AREA = 12  # pixels: smaller threshold objects are noise or debris
SCALE_LIMITS = (1 / 8, 4.0)  # the resize stays within these: beyond, the estimate is not to be trusted
TOLERANCE = 1.25  # estimates within this factor of the trained diameter leave the image as it is
SCALING_KEYS = ("scale", "diameter", "diameter_from")  # what images.json records of a Scaling


@dataclass(frozen=True)
class Scaling:
    """How one image is resized for the model: ``scale``, and the nucleus diameter (pixels of the
    original image) it was chosen for. ``source``: "objects" (estimated), "none" (nothing found:
    not resized) or "given" (the user's --diameter or --scale)."""

    scale: float
    diameter: float | None = None
    count: int = 0  # the objects the diameter is the median of
    source: str = "given"

    def to_dict(self) -> dict:
        diameter = None if self.diameter is None else round(self.diameter, 2)
        return dict(zip(SCALING_KEYS, (round(self.scale, 4), diameter, self.source)))


@dataclass(frozen=True)
class AutoScale:
    """Per image, the scale that brings its nuclei to ``trained_diameter`` pixels (see the module)."""

    trained_diameter: float
    bright: bool = True
    channel: int | None = None  # the channel nuclei show in (None: the mean of all)

    @classmethod
    def for_model(cls, trained_diameter: float, normalizer) -> "AutoScale":
        """For a model's normaliser: a brightfield model's input (stain densities) shows nuclei in
        its haematoxylin channel (maskrcnn.data.normalize)."""
        return cls(trained_diameter, channel=0 if getattr(normalizer, "stain", None) else None)

    def choose(self, image: Tensor) -> Scaling:
        """A normalised image (C, H, W) in [0, 1] -> its Scaling."""
        window = central_window(image, SAMPLE_SIDE)
        gray = window.mean(0) if self.channel is None else window[self.channel]
        found = object_diameter(gray, self.bright)
        if found is None:
            return Scaling(1.0, None, 0, "none")
        scale = min(max(self.trained_diameter / found[0], SCALE_LIMITS[0]), SCALE_LIMITS[1])
        return Scaling(1.0 if 1 / TOLERANCE < scale < TOLERANCE else scale, found[0], found[1], "objects")


def scaling_for(scale: float | AutoScale, image: Tensor) -> Scaling:
    """How a normalised image (C, H, W) is resized under ``scale``: fixed, or as AutoScale estimates."""
    return scale.choose(image) if isinstance(scale, AutoScale) else Scaling(scale)


def central_box(shape: tuple[int, int], side: int = SAMPLE_SIDE) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the central window of at most ``side`` x ``side`` pixels of an (H, W) image."""
    height, width = shape
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return top, min(height, top + side), left, min(width, left + side)


def central_window(image: Tensor, side: int) -> Tensor:
    """(C, H, W) -> its central (C, min(H, side), min(W, side)) window (a view)."""
    y0, y1, x0, x1 = central_box(tuple(image.shape[-2:]), side)
    return image[..., y0:y1, x0:x1]


def object_diameter(gray: Tensor, bright: bool = True) -> tuple[float, int] | None:
    """(H, W) image in [0, 1] -> (calibrated median equivalent diameter of its objects, their
    count), or None with fewer than MIN_OBJECTS objects. Objects touching the border are left out
    when enough others remain (they are cut, so smaller)."""
    smooth = smoothed(gray)
    if not bright:
        smooth = 1.0 - smooth
    labels = component_labels((smooth > otsu_threshold(smooth))[None])[0]
    ids, areas = labels[labels > 0].unique(return_counts=True)
    border = torch.isin(ids, torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = areas >= MIN_AREA
    if int((keep & ~border).sum()) >= MIN_OBJECTS:
        keep &= ~border
    if int(keep.sum()) < MIN_OBJECTS:
        return None
    return _median_diameter(areas[keep].float()) / OBJECT_CALIBRATION, int(keep.sum())


def smoothed(gray: Tensor) -> Tensor:
    """(H, W) -> its 3x3 mean (float32), edges averaged over the pixels inside: enough to keep
    noise from splitting objects at a threshold, little enough to keep nuclei apart."""
    return F.avg_pool2d(gray[None, None].float(), 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def _median_diameter(areas: Tensor) -> float:
    return 2.0 * math.sqrt(float(areas.median()) / math.pi)


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    hist = torch.histc(values.flatten().float(), bins, 0.0, 1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    weight = hist.cumsum(0)  # pixels at or below each cut
    mass = (hist * centres).cumsum(0)
    total, total_mass = weight[-1], mass[-1]
    between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight)).clamp(min=1e-12)
    return float(centres[int(between[:-1].argmax())] + 0.5 / bins)
