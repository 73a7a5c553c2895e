"""One image through a Detector, whole or in tiles: what prediction, evaluation and validation call.

A Detector is ``MaskRCNN`` or a model from ``maskrcnn export`` (see ``maskrcnn.structures``);
both take the same normalised image and return the same InstanceResult.
"""

from __future__ import annotations

import torch

from .precision import autocast
from .structures import Detector, InstanceResult
from .tiling import TILE_OVERLAP, predict_tiled


def segment(detector: Detector, image: torch.Tensor, device: torch.device | str = "cpu",
            tile: int | None = None, overlap: int = TILE_OVERLAP, precision: str = "fp32") -> InstanceResult:
    """A normalised image (C, H, W) in [0, 1] -> its instances, on the CPU; tiled when ``tile`` is
    given; ``precision`` as in ``maskrcnn.precision`` (exported models always run float32)."""
    with torch.inference_mode(), autocast(precision, device):
        if tile:
            return predict_tiled(detector, image, tile, overlap, device)
        return detector(image.to(device)).results[0].to("cpu")
