"""Streaming tiled prediction for images whose outputs do not fit in memory (slides, stitched mosaics).

``predict`` sends an image here when ``--max-memory`` cannot hold its whole-image outputs
(maskrcnn.runtime.memory). The image comes from a :class:`~maskrcnn.data.regions.RegionSource`: read
lazily, tile by tile, from a tiled TIFF or OME-Zarr, or an in-memory array (``ArraySource``).

1. Intensity: one (low, high) from ``source.sample(...)`` for the whole image, so all tiles are
   scaled alike (``Normalizer(..., intensity_range=...)``).
2. Tiles (``tiling.tile_grid``) are read one at a time and segmented by ``Predictor.predict_planned``:
   the one inference path of whole, tiled and exported models.
3. Each tile keeps the instances whose box centre is in its core (``tiling.core_instances``),
   pastes them (``paste_chunks``, as ``predict_tiled`` does) into a chunked on-disk label store
   (maskrcnn.prediction.labelstore), onto unpainted pixels only. An instance more than
   ``mask_test_nms_overlap_threshold`` of whose pixels an earlier tile painted is a duplicate
   found across a seam, and is dropped. Nothing of the size of the image is held in memory.
4. Ids are renumbered by descending score (ties: tile order), as ``predict_tiled`` numbers them.

Under torchrun (``dist``) every rank takes part in each streamed image: the ranks segment the tiles
in rounds (rank k takes tile r * world_size + k of round r) and send each tile's kept instances to
rank 0, which alone holds the label store and paints them in grid order, as one process does: the
same files, byte for byte. Painting is cheap next to the model (3% of a 2048 x 2048 scene's time),
so the ranks' time goes into segmenting; what that buys depends on whether one process's threads
already keep the cores busy (docs/benchmarks.md#prediction-over-processes).

Equivalence with ``predict_tiled`` (tested): when no instance kept by one tile overlaps an
instance kept by another (the core rule gives this for objects narrower than half the overlap),
both give the same label image, pixel for pixel and id for id, and the same boxes, scores and
classes. Where kept instances of different tiles overlap, ``predict_tiled`` runs a mask-IoU NMS
and gives shared pixels to the higher score; here the earlier tile keeps its pixels and the
later instance is dropped when mostly covered.

Outputs for a streamed image NAME (all written atomically; a stop between tiles writes none):
NAME_labels.tif (tiled BigTIFF, uint16 or uint32 ids, zlib), NAME_instances.csv (the columns of
``outputs.TABLE_FIELDS``) and NAME_overlay.png, a thumbnail at most ``THUMBNAIL_SIDE`` pixels
across. Not written: COCO RLE records, Kaggle rows, ImageJ ROIs and GeoJSON, which need every
instance's full-resolution mask at once (per instance, in a 40k x 40k image, mostly empty runs);
the run's images.json lists the image with ``"streamed": true``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import Tensor

from ..data.io import read_image
from ..data.normalize import MAX_STAT_SAMPLES
from ..data.regions import ArraySource, RegionSource
from ..errors import DataError
from ..modeling.mask.paste import paste_chunks
from ..outputs.files import write_png
from ..outputs.plots import overlay_image
from ..outputs.streamed import (Thumbnail, table_rows, thumbnail_sample, thumbnail_step, write_label_tiff,
                                write_table)
from ..runtime.distributed import DistContext
from ..runtime.memory import bound_heap, release_free_memory
from .contrast import contrast_floor
from .diameter import central_box
from .labelstore import LabelStore
from .tiling import Tile, core_instances, tile_grid

CHUNK = 512  # label store chunk and TIFF tile side
THUMBNAIL_SIDE = 2048
SAMPLE_PIXELS = MAX_STAT_SAMPLES  # the reduced image the intensity range comes from (as Normalizer samples)


class StreamStopped(Exception):
    """``should_stop`` asked to stop between tiles; nothing of the image was written."""


@dataclass
class StreamedPrediction:
    """The files written for one streamed image, and what it held."""

    label_image: Path
    overlay: Path
    table: Path
    instances: int
    shape: tuple[int, int]
    tiles: int


@dataclass
class TileInstances:
    """The instances one tile painted, in paint order: boxes (n, 4) in the image's frame, scores,
    labels (n,), and their visible pixels' count, coordinate sums and intensity sum (n,)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    area: Tensor
    sum_y: Tensor
    sum_x: Tensor
    sum_gray: Tensor


def region_source(path: Path, planes=None) -> RegionSource:
    """``path`` read region by region when maskrcnn.data.lazy can (a TIFF or zarr folder, with the
    ``slides`` extra's zarr installed), else decoded whole into an :class:`ArraySource`. ``planes``
    as for ``read_image``; DataError naming the file when it cannot be read."""
    from ..data.lazy import is_lazy_candidate, open_regions

    if is_lazy_candidate(path) and importlib.util.find_spec("zarr") is not None:
        return open_regions(path, planes)
    return ArraySource(read_image(path, planes), path)


def streamed_shape(path: Path) -> tuple[int, int] | None:
    """(H, W) of a label image written by :func:`write_label_tiff` (a tiled BigTIFF), else None."""
    if path.suffix != ".tif" or not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return (int(page.shape[0]), int(page.shape[1])) if tif.is_bigtiff and page.is_tiled else None
    except (OSError, ValueError, IndexError, tifffile.TiffFileError):
        return None


def predict_streamed(predictor, source: RegionSource, out_dir: str | Path, name: str, tile: int, overlap: int,
                     *, scale: float | None = None, should_stop: Callable[[], bool] | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     dist: DistContext | None = None) -> StreamedPrediction | None:
    """Segment ``source`` tile by tile with ``predictor`` (maskrcnn.prediction.predict.Predictor) and write
    NAME_labels.tif, NAME_instances.csv and NAME_overlay.png into ``out_dir``.

    ``scale``: what each tile is resized by (None: the predictor's fixed scale). ``should_stop`` is
    asked before each tile (each round of tiles): True raises :class:`StreamStopped` (no file is left).
    ``progress(done, total)`` is called after each tile. ``dist``: every rank calls this together; the
    tiles are segmented across the ranks (see :func:`segmented_tiles`) and rank 0 paints them and
    writes the files (other ranks return None): the same files as one process writes.
    """
    dist = dist or DistContext.single()
    out = Path(out_dir)
    cfg = predictor.model.cfg
    shape = source.shape
    # one intensity range for all tiles, from rank 0's sample
    intensity = dist.all_gather_objects(
        predictor.normalizer.intensity_range(source.sample(SAMPLE_PIXELS)) if dist.is_main else None)[0]
    # the faint-instance floor of the whole image, from its central window (as whole images get it)
    floor = contrast_floor(predictor.normalizer(source.read(*central_box(shape)), intensity),
                           cfg.mask_test_min_contrast) if cfg.mask_test_min_contrast > 0 else None
    grid = tile_grid(*shape, tile, overlap)
    bound_heap()  # tiles' tensors are freed back to the OS, not kept as heap fragments
    step = thumbnail_step(shape, THUMBNAIL_SIDE)  # read here: tests shrink it
    tiles = segmented_tiles(predictor, source, grid, intensity, overlap, scale, step, should_stop, dist, floor)
    if not dist.is_main:
        for _ in tiles:  # this rank's share of the rounds; rank 0 paints
            pass
        return None
    thumbnail = Thumbnail(shape, step)
    painted: list[TileInstances] = []
    next_id = 1
    with LabelStore(shape, out, f"{name}_labels.store", CHUNK) as store:
        for done, found in enumerate(tiles, start=1):
            part = grid[found.index]
            kept = paint_tile(store, part, found.kept, shape, cfg.mask_test_mask_threshold,
                              cfg.mask_test_nms_overlap_threshold, next_id, _gray(found.raw))
            painted.append(kept)
            next_id += len(kept.scores)
            thumbnail.place(part, found.display)
            del found
            if progress is not None:
                progress(done, len(grid))
        instances = _joined(painted)
        # new id of each painted id (0 stays 0): rank by descending score, ties in paint order
        order = torch.argsort(instances.scores, descending=True, stable=True)
        lut = np.zeros(len(order) + 1, np.int64)
        lut[order.numpy() + 1] = np.arange(1, len(order) + 1)
        files = StreamedPrediction(out / f"{name}_labels.tif", out / f"{name}_overlay.png",
                                   out / f"{name}_instances.csv", len(order), shape, len(grid))
        write_label_tiff(files.label_image, store, lut, thumbnail)
    write_table(files.table, table_rows(instances, order, predictor.class_names))
    write_png(files.overlay, overlay_image(thumbnail.display, thumbnail.labels))
    return files


@dataclass
class TileFound:
    """One segmented tile, as its painter needs it: its index in the grid, its kept instances
    (``tiling.core_instances``: boxes (n, 4) in the image's frame, scores, labels, (n, M, M) mask
    probabilities), its raw pixels (h, w[, C]) for mean intensities, and its thumbnail sample."""

    index: int
    kept: tuple[Tensor, Tensor, Tensor, Tensor]
    raw: np.ndarray
    display: np.ndarray


def segmented_tiles(predictor, source: RegionSource, grid: list[Tile], intensity, overlap: int,
                    scale: float | None, step: int, should_stop: Callable[[], bool] | None,
                    dist: DistContext, floor: float | None = None) -> Iterator[TileFound]:
    """Every tile of ``grid`` segmented, yielded in grid order on rank 0 (other ranks yield nothing).

    In round r, rank k segments tile r * world_size + k; the round's tiles are gathered to rank 0.
    A stop asked on any rank before a round stops every rank (StreamStopped), and a tile that
    cannot be read fails the image on every rank (DataError), so that no rank waits for another
    that has left. In one process: tile by tile.
    """
    for start in range(0, len(grid), dist.world_size):
        stop = should_stop is not None and should_stop()
        index, found, problem = start + dist.rank, None, None
        if not stop and index < len(grid):
            try:
                found = _segment_tile(predictor, source, grid[index], index, intensity, overlap, scale, step,
                                      floor)
            except DataError as err:
                if not dist.active:
                    raise
                problem = (err.path, err.problem)
        parts = dist.all_gather_objects((stop, problem, found))
        if any(part[0] for part in parts):
            raise StreamStopped(str(source))
        for _, problem, _ in parts:
            if problem is not None:
                raise DataError(*problem)
        if dist.is_main:
            yield from (part[2] for part in parts if part[2] is not None)
        del parts, found
        release_free_memory()


def _segment_tile(predictor, source: RegionSource, part: Tile, index: int, intensity, overlap: int,
                  scale: float | None, step: int, floor: float | None = None) -> TileFound:
    raw = source.read(part.y0, part.y1, part.x0, part.x1)
    normalized = predictor.normalizer(raw, intensity)
    # the tile whole (sized to fit); faint instances against the image's floor, not the tile's
    found = predictor.predict_planned(normalized, None, overlap, scale, floor)
    return TileFound(index, core_instances(found, part), raw, thumbnail_sample(step, part, normalized))


def paint_tile(store: LabelStore, tile: Tile, kept: tuple[Tensor, Tensor, Tensor, Tensor],
               image_size: tuple[int, int], threshold: float, duplicate: float, first_id: int,
               gray: np.ndarray) -> TileInstances:
    """Paste one tile's kept instances (boxes (n, 4) in the image's frame, descending score) into
    the store's unpainted pixels, with ids first_id.. in order; returns those painted.

    gray: (h, w) float64 intensity of the tile, for mean intensities.
    """
    boxes, scores, labels, probs = kept
    n = len(scores)
    h, w = tile.y1 - tile.y0, tile.x1 - tile.x0
    old = torch.from_numpy(store.read(tile.y0, tile.y1, tile.x0, tile.x1)).reshape(-1)
    rows, pixels = _mask_pixels(probs, boxes, image_size, threshold, tile)
    taken = old[pixels] > 0
    area = torch.bincount(rows, minlength=n)
    before = torch.bincount(rows[taken], minlength=n)
    fresh = before <= duplicate * area  # else: mostly an instance an earlier tile painted
    use = fresh[rows] & ~taken
    # the higher-scoring (earlier) row owns a pixel, as in paste_label_image
    owner = torch.zeros(h * w, dtype=torch.int64).scatter_reduce_(0, pixels[use], n - rows[use], reduce="amax")
    where = torch.nonzero(owner, as_tuple=True)[0]
    row_of = n - owner[where]
    visible = torch.bincount(row_of, minlength=n) > 0
    ids = first_id - 1 + torch.cumsum(visible, 0)
    old[where] = ids[row_of].to(old.dtype)
    store.write(tile.y0, tile.x0, old.reshape(h, w).numpy())
    ys, xs = (where // w + tile.y0).double(), (where % w + tile.x0).double()
    sums = [torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, v)[visible]
            for v in (ys, xs, torch.from_numpy(gray).reshape(-1)[where])]
    return TileInstances(boxes[visible], scores[visible], labels[visible],
                         torch.bincount(row_of, minlength=n)[visible], *sums)


def _mask_pixels(probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float,
                 tile: Tile) -> tuple[Tensor, Tensor]:
    """Every mask pixel of (n, M, M) box-frame masks -> (row (P,), flat index in the tile (P,)).

    Pasted in the image's frame exactly as ``paste_label_image`` pastes them (same boxes, same
    pixel centres), so the pixels agree with ``predict_tiled``'s.
    """
    width = tile.x1 - tile.x0
    rows, pixels = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for chunk_rows, win, masks in paste_chunks(probs, boxes, *image_size, threshold):
        k, y, x = torch.nonzero(masks, as_tuple=True)
        ty, tx = win[k, 1] + y - tile.y0, win[k, 0] + x - tile.x0
        inside = (ty >= 0) & (ty < tile.y1 - tile.y0) & (tx >= 0) & (tx < width)  # boxes lie in their tile
        rows.append(chunk_rows[k][inside])
        pixels.append((ty * width + tx)[inside])
    return torch.cat(rows), torch.cat(pixels)


def _gray(raw: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, C) -> (h, w) float64: the intensity ``outputs.instance_table`` averages."""
    return raw.astype(np.float64) if raw.ndim == 2 else raw[..., :3].astype(np.float64).mean(axis=2)


def _joined(parts: list[TileInstances]) -> TileInstances:
    """The tiles' instances in paint order (id k is row k - 1)."""
    return TileInstances(*(torch.cat([getattr(p, f) for p in parts])
                           for f in TileInstances.__dataclass_fields__))
