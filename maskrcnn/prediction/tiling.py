"""Tiled inference for images larger than memory allows, stitched so that no instance is doubled
or clipped at a seam.

Tiles overlap by ``overlap`` pixels. Each tile keeps only the instances whose box centre lies in
its core: the part of the tile nearer to it than to any neighbour (seams run through the middle of
each overlap). An instance narrower than half the overlap whose centre is in a tile's core lies
wholly in that tile, so it is found whole, and by exactly one tile. A final mask-IoU NMS over all
kept instances removes the rare pair found by two tiles around the same seam, and the label image is
painted once for the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..modeling.mask.postprocess import assemble_result
from ..structures import Detector, InstanceResult

# Default overlap of neighbouring tiles in pixels: more than twice the largest object's size
# keeps every object whole in some tile (see above).
TILE_OVERLAP = 128


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length``; the last one ends at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def fitted_tile(length: int, tile: int, overlap: int) -> int:
    """The smallest tile <= ``tile`` that covers ``length`` with as few tiles as ``tile`` needs.

    E.g. 2048 pixels with tile 1024 and overlap 128 need 3 tiles; tiles of 768 cover it as well
    as 1024 do, with a quarter less pixels to process (and no tile almost repeating another).
    """
    if length <= tile:
        return tile
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    return -(-(length - overlap) // count) + overlap


def tile_cores(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """[lo, hi) of each tile's core along one axis: seams halfway through each overlap."""
    seams = [(nxt + (start + tile)) / 2 for start, nxt in zip(starts, starts[1:])]
    return list(zip([0.0] + seams, seams + [float(length)]))


@dataclass(frozen=True)
class Tile:
    """One tile of a grid: rows [y0, y1) and columns [x0, x1) of the image, and its core
    [ylo, yhi) x [xlo, xhi) (float: seams fall halfway through overlaps)."""

    y0: int
    y1: int
    x0: int
    x1: int
    core: tuple[float, float, float, float]  # ylo, yhi, xlo, xhi


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles (row-major) that cover an image of (height, width) with ``tile``-pixel tiles
    (shrunk by :func:`fitted_tile`) overlapping by ``overlap``."""
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    tile_h, tile_w = fitted_tile(height, tile, overlap), fitted_tile(width, tile, overlap)
    ys, xs = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    y_cores, x_cores = tile_cores(ys, tile_h, height), tile_cores(xs, tile_w, width)
    return [Tile(y0, min(y0 + tile_h, height), x0, min(x0 + tile_w, width), (ylo, yhi, xlo, xhi))
            for y0, (ylo, yhi) in zip(ys, y_cores) for x0, (xlo, xhi) in zip(xs, x_cores)]


def core_instances(found: InstanceResult, tile: Tile) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The instances a tile keeps: those whose box centre lies in its core.

    found: the tile's instances in its own frame -> (boxes (D, 4) in the image's frame, scores
    (D,), labels (D,), mask_probs (D, M, M)), in ``found``'s order (descending score).
    """
    boxes = found.boxes + torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=found.boxes.dtype)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    ylo, yhi, xlo, xhi = tile.core
    core = (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
    return boxes[core], found.scores[core], found.labels[core], found.mask_probs[core]


def predict_tiled(model: Detector, image: Tensor, tile: int, overlap: int, device: torch.device | str = "cpu",
                  detect: Callable[[Tensor], InstanceResult] | None = None) -> InstanceResult:
    """image (C, H, W) normalised -> one InstanceResult for the whole image, on the CPU.

    ``detect`` turns one tile into its instances (CPU); default: one pass of ``model`` on ``device``
    (maskrcnn.prediction.segment passes one with its scale and test-time augmentation).
    """
    detect = detect or (lambda crop: model(crop.to(device)).results[0].to("cpu"))
    _, height, width = image.shape
    parts = [core_instances(detect(image[:, t.y0:t.y1, t.x0:t.x1]), t)
             for t in tile_grid(height, width, tile, overlap)]
    boxes, scores, labels, probs = (torch.cat(p) for p in zip(*parts))
    # stable: equal scores keep tile order, the order maskrcnn.prediction.large paints (and numbers) them in
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores, labels, probs = boxes[order], scores[order], labels[order], probs[order]
    binary = probs > model.cfg.mask_test_mask_threshold
    return assemble_result(boxes, scores, labels, probs, binary, (height, width), model.cfg)
