"""The files of an image streamed tile by tile (maskrcnn.prediction.large), written without any
array of the image's size: NAME_instances.csv block by block, NAME_labels.tif chunk by chunk from
the label store, and the overlay's thumbnail (every step-th pixel) filled as tiles arrive."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
import torch
from torch import Tensor

from ..runtime.atomic import atomic_output
from .files import TABLE_FIELDS
from .plots import display_image

if TYPE_CHECKING:  # annotations only: the prediction layer calls this one
    from ..prediction.labelstore import LabelStore
    from ..prediction.large import TileInstances
    from ..prediction.tiling import Tile

TABLE_BLOCK = 1 << 14  # instance table rows made at a time


def table_rows(instances: TileInstances, order: Tensor, class_names: list[str]) -> Iterator[list]:
    """The rows of NAME_instances.csv (``outputs.TABLE_FIELDS``), id k + 1 for ``order[k]``, made
    ``TABLE_BLOCK`` at a time: a slide has hundreds of thousands of instances, and Python rows of
    all of them at once would take more memory than the model."""
    top = int(instances.labels.max()) if len(instances.labels) else 0
    # a class index beyond the names is written as its number, as outputs.instance_table does
    names = np.array(list(class_names) + [str(i) for i in range(len(class_names), top + 1)], dtype=object)
    for start in range(0, len(order), TABLE_BLOCK):
        rows = order[start:start + TABLE_BLOCK]
        area = instances.area[rows].double()
        columns = [np.arange(start + 1, start + len(rows) + 1), names[instances.labels[rows].numpy()],
                   instances.scores[rows].double().numpy().round(4), area.long().numpy(),
                   *instances.boxes[rows].double().numpy().round(1).T,
                   (instances.sum_x[rows] / area).numpy().round(2), (instances.sum_y[rows] / area).numpy().round(2),
                   (instances.sum_gray[rows] / area).numpy().round(3)]
        yield from zip(*(c.tolist() for c in columns))


def write_table(path: Path, rows: Iterator[list]) -> None:
    """NAME_instances.csv, written row block by row block into a temporary file renamed at the end."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_FIELDS)
        writer.writerows(rows)


def write_label_tiff(path: Path, store: LabelStore, lut: np.ndarray, thumbnail: Thumbnail) -> None:
    """The store's labels, renumbered by ``lut``, as a tiled BigTIFF (uint16 when the ids fit, else
    uint32), written tile by tile from the store; the thumbnail's labels are sampled on the way."""
    dtype = np.uint16 if len(lut) - 1 <= np.iinfo(np.uint16).max else np.uint32
    lut = lut.astype(dtype)  # mapped straight into the file's dtype: one small array per tile

    def tiles():
        for cy, cx, chunk in store.chunks():
            mapped = lut[chunk]
            thumbnail.add_labels(cy * store.chunk, cx * store.chunk, mapped)
            yield mapped

    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=store.shape, dtype=dtype, tile=(store.chunk, store.chunk),
                         bigtiff=True, compression="zlib", photometric="minisblack", metadata=None)


def thumbnail_step(shape: tuple[int, int], side: int) -> int:
    """The thumbnail of an (H, W) image at most ``side`` pixels across takes every step-th pixel."""
    return max(1, math.ceil(max(shape) / side))


def _picks(step: int, start: int, stop: int) -> np.ndarray:
    """Positions in [start, stop) that are multiples of ``step``."""
    return np.arange(-(-start // step) * step, stop, step)


def thumbnail_sample(step: int, tile: Tile, normalized: Tensor) -> np.ndarray:
    """A tile's normalised (C, h, w) pixels at the thumbnail's positions -> (h', w', 3) uint8."""
    ys, xs = _picks(step, tile.y0, tile.y1), _picks(step, tile.x0, tile.x1)
    return display_image(normalized[:, torch.from_numpy(ys - tile.y0)][:, :, torch.from_numpy(xs - tile.x0)])


class Thumbnail:
    """The overlay's picture and labels at 1 / ``step`` resolution: every step-th row and column."""

    def __init__(self, shape: tuple[int, int], step: int) -> None:
        self.step = step
        self.shape = shape
        size = (-(-shape[0] // self.step), -(-shape[1] // self.step))
        self.display = np.zeros(size + (3,), np.uint8)
        self.labels = np.zeros(size, np.int64)

    def place(self, tile: Tile, sample: np.ndarray) -> None:
        """Put a tile's :func:`thumbnail_sample` in the picture."""
        ys, xs = _picks(self.step, tile.y0, tile.y1), _picks(self.step, tile.x0, tile.x1)
        self.display[np.ix_(ys // self.step, xs // self.step)] = sample

    def add_labels(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Sample a (chunk, chunk) block of labels at rows y0.., columns x0.. (padding ignored)."""
        ys = _picks(self.step, y0, min(y0 + block.shape[0], self.shape[0]))
        xs = _picks(self.step, x0, min(x0 + block.shape[1], self.shape[1]))
        self.labels[np.ix_(ys // self.step, xs // self.step)] = block[np.ix_(ys - y0, xs - x0)]
