"""A Z-stack's 3-D labels kept on disk, one plane in memory at a time (``predict --3d`` of large stacks).

A stack whose label volume would not fit the memory budget beside the model (``--max-memory``;
1024 x 1024 x 100 int32 labels are 400 MB) keeps them in a hidden temporary file of the output
folder, written and read with plain file reads and writes: no memory map, so planes on disk are
not part of the process's resident memory (the page cache is the system's). The ids are stored as
stitched; ``relabel`` (maskrcnn.prediction.zprofile.Relabel) maps them on reading to the final
instances 1..N, so the volume is never rewritten. The file is removed by ``close`` (a killed run's
is removed by the next run in the folder, maskrcnn.runtime.atomic.remove_stale_temporaries).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..runtime.memory import SAFETY_BYTES, model_bytes, resident_bytes
from .labelstore import DTYPE as LABEL_DTYPE, BlockFile


class PlaneStore:
    """(Z, H, W) int32 labels on disk, one plane per block of a BlockFile (maskrcnn.prediction.labelstore);
    ``store[z] = plane`` writes a plane, ``store[z]`` reads it (mapped by ``relabel`` when set),
    iteration yields the planes in order."""

    def __init__(self, shape: tuple[int, int, int], folder: str | Path):
        self.shape = tuple(int(s) for s in shape)
        self.blocks = BlockFile(self.shape[0], self.shape[1:], folder, "labels")
        self.path = self.blocks.path
        self.relabel = None  # (z, plane) -> plane in final ids

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, z: int, plane: np.ndarray) -> None:
        if plane.shape != self.shape[1:]:
            raise ValueError(f"plane of shape {plane.shape} for a store of planes {self.shape[1:]}")
        self.blocks.write(z, plane)

    def __getitem__(self, z: int) -> np.ndarray:
        plane = self.blocks.read(z)
        return self.relabel(z, plane) if self.relabel is not None else plane

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[z] for z in range(len(self)))

    def max(self) -> int:
        """The largest id (after ``relabel``)."""
        if self.relabel is not None:
            return self.relabel.count
        return max((int(plane.max(initial=0)) for plane in self), default=0)

    def close(self) -> None:
        self.blocks.close()


def labels_fit(shape: tuple[int, int, int], cfg, scale: float, max_memory: int) -> bool:
    """Whether a stack's int32 label volume fits in memory beside what this process holds now and
    the model on one whole plane (when it does not, a plane store keeps the labels on disk)."""
    depth, height, width = shape
    labels = depth * height * width * LABEL_DTYPE.itemsize
    plane = model_bytes(cfg, height * width, scale)
    return resident_bytes() + labels + plane + SAFETY_BYTES <= max_memory
