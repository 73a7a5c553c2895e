"""Views of a reader: a subset of its samples, or a vertical band of each image.

With one or two large annotated images there is nothing to split by image; training on the left
part and validating on the right part still measures generalisation to unseen nuclei.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

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


class SubsetReader(InstanceReader):
    """The samples of ``reader`` at ``indices``, in that order."""

    def __init__(self, reader: InstanceReader, indices: Sequence[int]):
        self.reader, self.indices = reader, list(indices)
        self.names = [reader.names[i] for i in self.indices]
        self.class_names = reader.class_names

    def _load(self, index: int) -> Sample:
        return self.reader[self.indices[index]]
