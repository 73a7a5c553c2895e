"""Views of a reader: a subset of its samples, a vertical band of each image, or each image resized.

With one or two large annotated images there is nothing to split by image; training on the left
part and validating on the right part still measures generalisation to unseen nuclei.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import InstanceReader, Sample


class RegionReader(InstanceReader):
    """Samples of ``reader`` cut to columns [start, stop) given as fractions of the width.

    Instances are cut with the image; those left with no pixels are dropped.
    """

    def __init__(self, reader: InstanceReader, start: float, stop: float):
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"region needs 0 <= start < stop <= 1, got {start} and {stop}")
        self.reader, self.start, self.stop = reader, start, stop
        self.names = [f"{name}[{start:.2f}:{stop:.2f}]" for name in reader.names]
        self.class_names = reader.class_names

    def _load(self, index: int) -> Sample:
        sample = self.reader[index]
        width = sample.image.shape[1]
        x0, x1 = round(self.start * width), round(self.stop * width)
        masks = sample.masks[:, :, x0:x1]
        keep = masks.any(axis=(1, 2))  # (not reshape(G, -1): it fails for G = 0)
        return replace(sample, name=self.names[index], image=sample.image[:, x0:x1],
                       masks=masks[keep], labels=sample.labels[keep])

    def _check_header(self, index: int) -> None:
        self.reader.check_header(index)


class SubsetReader(InstanceReader):
    """The samples of ``reader`` at ``indices``, in that order."""

    def __init__(self, reader: InstanceReader, indices: Sequence[int]):
        self.reader, self.indices = reader, list(indices)
        self.names = [reader.names[i] for i in self.indices]
        self.class_names = reader.class_names

    def _load(self, index: int) -> Sample:
        return self.reader[self.indices[index]]

    def _check_header(self, index: int) -> None:
        self.reader.check_header(self.indices[index])


class ConcatReader(InstanceReader):
    """The samples of several readers one after the other; their class names must agree."""

    def __init__(self, readers: Sequence[InstanceReader]):
        if not readers:
            raise ValueError("ConcatReader needs at least one reader")
        names = {tuple(r.class_names) for r in readers}
        if len(names) != 1:
            raise ValueError(f"readers disagree on their classes: {sorted(names)}")
        self.readers = list(readers)
        self.names = [name for r in self.readers for name in r.names]
        self.class_names = self.readers[0].class_names
        self.starts = list(itertools.accumulate((len(r) for r in self.readers), initial=0))  # no per-sample table

    def _load(self, index: int) -> Sample:
        part = bisect.bisect_right(self.starts, index) - 1
        return self.readers[part][index - self.starts[part]]

    def _check_header(self, index: int) -> None:
        part = bisect.bisect_right(self.starts, index) - 1
        self.readers[part].check_header(index - self.starts[part])


class CachedReader(InstanceReader):
    """``reader`` with every sample kept in memory after its first read: for a few large images
    that a run samples over and over (decoding one with hundreds of instances costs more than
    a training step's augmentation)."""

    def __init__(self, reader: InstanceReader):
        self.reader, self.names, self.class_names = reader, reader.names, reader.class_names
        self.cache: dict[int, Sample] = {}

    def _load(self, index: int) -> Sample:
        if index not in self.cache:
            self.cache[index] = self.reader[index]
        return self.cache[index]

    def _check_header(self, index: int) -> None:
        if index not in self.cache:
            self.reader.check_header(index)


class ResizedReader(InstanceReader):
    """Samples of ``reader`` resized so that the median equivalent diameter of each image's
    instances is ``diameter`` pixels: real annotations brought to the size a model learns, as
    ``--diameter auto`` brings images to it at prediction. Images without instances are unchanged.
    The image is resampled bilinearly (antialiased when shrinking) in its own dtype's range, the
    masks by the nearest pixel; instances left without a pixel are dropped."""

    def __init__(self, reader: InstanceReader, diameter: float):
        self.reader, self.diameter = reader, diameter
        self.names, self.class_names = reader.names, reader.class_names

    def _load(self, index: int) -> Sample:
        sample = self.reader[index]
        if len(sample.masks) == 0:
            return sample
        areas = sample.masks.reshape(len(sample.masks), -1).sum(axis=1)
        factor = self.diameter / (2.0 * np.sqrt(np.median(areas) / np.pi))
        size = (max(1, round(sample.image.shape[0] * factor)), max(1, round(sample.image.shape[1] * factor)))
        pixels = torch.from_numpy(np.atleast_3d(sample.image).astype(np.float32)).permute(2, 0, 1)[None]
        resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
        image = resized[0].permute(1, 2, 0).numpy().reshape(size + sample.image.shape[2:])
        if np.issubdtype(sample.image.dtype, np.integer):
            info = np.iinfo(sample.image.dtype)
            image = np.clip(np.rint(image), info.min, info.max)
        masks = F.interpolate(torch.from_numpy(sample.masks)[None].to(torch.uint8), size=size,
                              mode="nearest-exact")[0].numpy().astype(bool)
        keep = masks.any(axis=(1, 2))
        return replace(sample, image=image.astype(sample.image.dtype), masks=masks[keep], labels=sample.labels[keep])

    def _check_header(self, index: int) -> None:
        self.reader.check_header(index)
