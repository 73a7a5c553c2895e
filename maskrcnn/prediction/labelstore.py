"""An (H, W) int32 label image kept on disk in square chunks, for images whose labels do not fit in memory.

The chunks live in one hidden temporary file beside the outputs (``.NAME.PID.XXXX.tmp``, so a
killed run's file is removed by the next run in the folder: maskrcnn.runtime.atomic). It is sized up
front with ``truncate``: chunks never written read as zeros and take no disk space (sparse file).
Chunks are read and written with plain file reads, not a memory map: mapped pages would count in
the process's resident memory, which ``--max-memory`` bounds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DTYPE = np.dtype(np.int32)


class BlockFile:
    """``count`` int32 blocks of ``shape`` in one hidden sparse temporary file of ``folder`` (see the
    module): ``read(i)``, ``write(i, block)``, ``close()`` (which deletes the file)."""

    def __init__(self, count: int, shape: tuple[int, int], folder: str | Path, name: str) -> None:
        self.block_shape = (int(shape[0]), int(shape[1]))
        self._bytes = self.block_shape[0] * self.block_shape[1] * DTYPE.itemsize
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
        self.path = Path(tmp)
        self.file = os.fdopen(fd, "r+b")
        self.file.truncate(count * self._bytes)

    def read(self, index: int) -> np.ndarray:
        out = np.empty(self.block_shape, DTYPE)
        self.file.seek(index * self._bytes)
        if self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OSError(f"{self.path}: label store truncated")
        return out

    def write(self, index: int, block: np.ndarray) -> None:
        self.file.seek(index * self._bytes)
        self.file.write(np.ascontiguousarray(block, DTYPE).tobytes())

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


class LabelStore:
    """(H, W) int32 labels on disk in ``chunk`` x ``chunk`` blocks (row-major, edge blocks padded)."""

    def __init__(self, shape: tuple[int, int], folder: str | Path, name: str, chunk: int = 512) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk = chunk
        self.grid = (-(-self.shape[0] // chunk), -(-self.shape[1] // chunk))
        self.blocks = BlockFile(self.grid[0] * self.grid[1], (chunk, chunk), folder, name)
        self.path = self.blocks.path

    def close(self) -> None:
        """Close and delete the store's file."""
        self.blocks.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read_chunk(self, cy: int, cx: int) -> np.ndarray:
        """Chunk (cy, cx) -> (chunk, chunk) int32 (zeros beyond the image's edge)."""
        return self.blocks.read(cy * self.grid[1] + cx)

    def _write_chunk(self, cy: int, cx: int, block: np.ndarray) -> None:
        self.blocks.write(cy * self.grid[1] + cx, block)

    def _spans(self, y0: int, y1: int, x0: int, x1: int) -> Iterator[tuple[int, int, slice, slice, slice, slice]]:
        """For the chunks meeting [y0, y1) x [x0, x1): (cy, cx, rows and columns in the chunk,
        rows and columns in the region)."""
        if not (0 <= y0 < y1 <= self.shape[0] and 0 <= x0 < x1 <= self.shape[1]):
            raise ValueError(f"region [{y0}:{y1}, {x0}:{x1}] is outside the labels of shape {self.shape}")
        c = self.chunk
        for cy in range(y0 // c, (y1 - 1) // c + 1):
            ys = slice(max(y0, cy * c), min(y1, (cy + 1) * c))
            for cx in range(x0 // c, (x1 - 1) // c + 1):
                xs = slice(max(x0, cx * c), min(x1, (cx + 1) * c))
                yield (cy, cx, slice(ys.start - cy * c, ys.stop - cy * c), slice(xs.start - cx * c, xs.stop - cx * c),
                       slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """[y0, y1) x [x0, x1) -> (h, w) int32."""
        out = np.empty((y1 - y0, x1 - x0), DTYPE)
        for cy, cx, in_y, in_x, out_y, out_x in self._spans(y0, y1, x0, x1):
            out[out_y, out_x] = self.read_chunk(cy, cx)[in_y, in_x]
        return out

    def write(self, y0: int, x0: int, region: np.ndarray) -> None:
        """Store ``region`` (h, w) at rows y0.., columns x0.. (partly covered chunks are merged)."""
        h, w = region.shape
        for cy, cx, in_y, in_x, out_y, out_x in self._spans(y0, y0 + h, x0, x0 + w):
            block = self.read_chunk(cy, cx)
            block[in_y, in_x] = region[out_y, out_x]
            self._write_chunk(cy, cx, block)

    def chunks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every chunk, row-major: (cy, cx, (chunk, chunk) int32), as a tiled TIFF stores its tiles."""
        for cy in range(self.grid[0]):
            for cx in range(self.grid[1]):
                yield cy, cx, self.read_chunk(cy, cx)
