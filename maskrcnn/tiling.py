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

import torch
from torch import Tensor

from .mask.postprocess import assemble_result
from .structures import Detector, InstanceResult

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


def predict_tiled(model: Detector, image: Tensor, tile: int, overlap: int, device: torch.device | str = "cpu",
                  detect: Callable[[Tensor], InstanceResult] | None = None) -> InstanceResult:
    """image (C, H, W) normalised -> one InstanceResult for the whole image, on the CPU.

    ``detect`` turns one tile into its instances (CPU); default: one pass of ``model`` on ``device``
    (maskrcnn.inference passes one with its scale and test-time augmentation).
    """
    detect = detect or (lambda crop: model(crop.to(device)).results[0].to("cpu"))
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    _, height, width = image.shape
    tile_h, tile_w = fitted_tile(height, tile, overlap), fitted_tile(width, tile, overlap)
    ys, xs = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    y_cores, x_cores = tile_cores(ys, tile_h, height), tile_cores(xs, tile_w, width)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for y0, (ylo, yhi) in zip(ys, y_cores):
        for x0, (xlo, xhi) in zip(xs, x_cores):
            found = detect(image[:, y0:y0 + tile_h, x0:x0 + tile_w])
            boxes = found.boxes + torch.tensor([x0, y0, x0, y0], dtype=found.boxes.dtype)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            core = (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
            parts.append((boxes[core], found.scores[core], found.labels[core], found.mask_probs[core]))
    boxes, scores, labels, probs = (torch.cat(p) for p in zip(*parts))
    order = torch.argsort(scores, descending=True)
    boxes, scores, labels, probs = boxes[order], scores[order], labels[order], probs[order]
    binary = probs > model.cfg.mask_test_mask_threshold
    return assemble_result(boxes, scores, labels, probs, binary, (height, width), model.cfg)
