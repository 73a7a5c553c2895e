"""Tiled prediction: instances across tile seams come out once and whole."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from maskrcnn import Config
from maskrcnn.modeling.mask.postprocess import assemble_result
from maskrcnn.structures import InstanceResult, ModelOutput
from maskrcnn.structures import masks_to_boxes
from maskrcnn.prediction.tiling import fitted_tile, predict_tiled, tile_cores, tile_starts

ID_SCALE = 1000.0  # the oracle's images carry instance ids as pixel values


class OracleModel(torch.nn.Module):
    """Stands in for a perfect MaskRCNN: it reads the instances off the pixel values of whatever
    crop it is given, including instances cut by the crop's edge, as a real model would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = Config(mask_test_nms_overlap_threshold=0.3)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        labels = (image[0] * ID_SCALE).round().long()
        ids = labels.unique()
        ids = ids[ids > 0]
        masks = labels[None] == ids[:, None, None]
        boxes = masks_to_boxes(masks)
        m = self.cfg.mask_size
        rois = torch.cat([torch.arange(len(ids), dtype=torch.float32)[:, None], boxes], dim=1)
        probs = roi_align(masks[:, None].float(), rois, m, 1.0, 2, aligned=True)[:, 0]
        scores = torch.linspace(0.99, 0.9, len(ids)) if len(ids) else torch.zeros(0)
        result = assemble_result(boxes, scores, torch.ones(len(ids), dtype=torch.long), probs, probs > 0.5,
                                 tuple(labels.shape), self.cfg)
        return ModelOutput(results=[result])


def discs_across_seams(size: int, tile: int, overlap: int) -> torch.Tensor:
    """A label image with discs (radius 10) on every seam and seam crossing, and some between."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    tile = fitted_tile(size, tile, overlap)  # the tiles predict_tiled uses
    starts = tile_starts(size, tile, overlap)
    seams = [lo for lo, _ in tile_cores(starts, tile, size)][1:]
    centres = [(x, y) for x in seams for y in seams]                      # on crossings
    centres += [(x, y) for x in seams for y in (40, size - 40)]           # on vertical seams
    centres += [(x + 3, y) for y in seams for x in (60, size // 2 - 30)]  # on horizontal seams
    centres += [(x - 2, y + 1) for x, y in centres[:4]]                   # just off them
    label = torch.zeros(size, size, dtype=torch.int32)
    for i, (cx, cy) in enumerate(centres, start=1):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 100
        label[disc & (label == 0)] = i
    return label


def matched_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each instance of label image a, the best IoU with an instance of b."""
    ids_a, ids_b = a.unique()[1:], b.unique()[1:]
    ma = a[None] == ids_a[:, None, None]
    mb = b[None] == ids_b[:, None, None]
    inter = (ma[:, None] & mb[None]).flatten(2).sum(-1).float()
    union = (ma[:, None] | mb[None]).flatten(2).sum(-1).float()
    return (inter / union).max(dim=1).values


def test_tile_grid_covers_image_and_seams_split_overlaps():
    assert tile_starts(1000, 256, 64) == [0, 192, 384, 576, 744]
    assert tile_starts(200, 256, 64) == [0]
    cores = tile_cores([0, 192, 384], 256, 640)
    assert cores == [(0.0, 224.0), (224.0, 416.0), (416.0, 640.0)]


def test_tiles_shrink_to_the_fewest_that_cover():
    assert fitted_tile(2048, 1024, 128) == 768     # 3 tiles either way: 768 covers 2048 as 1024 does
    assert tile_starts(2048, 768, 128) == [0, 640, 1280]
    assert fitted_tile(4096, 1024, 128) == 922     # 5 tiles
    assert fitted_tile(1000, 256, 64) == 252       # 5 tiles
    assert fitted_tile(900, 1024, 128) == 1024     # one tile: the image is smaller
    for length, tile, overlap in [(2048, 1024, 128), (4096, 1536, 128), (1000, 256, 64), (777, 300, 100)]:
        fitted = fitted_tile(length, tile, overlap)
        assert overlap < fitted <= tile
        starts = tile_starts(length, fitted, overlap)
        assert len(starts) == len(tile_starts(length, tile, overlap))
        assert starts[-1] + fitted == length and all(b - a <= fitted - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.slow
def test_tiled_prediction_matches_untiled_across_seams():
    tile, overlap = 128, 48
    truth = discs_across_seams(400, tile, overlap)
    image = (truth.float() / ID_SCALE)[None]
    model = OracleModel()
    whole = model(image).results[0]
    tiled = predict_tiled(model, image, tile, overlap)
    assert len(tiled) == len(whole) == int(truth.max())
    ious = matched_iou(whole.label_image, tiled.label_image)
    assert ious.min() >= 0.9, ious.min()
    # No instance is doubled: each tiled instance matches a different untiled one.
    assert matched_iou(tiled.label_image, whole.label_image).min() >= 0.9


def test_tiled_prediction_of_empty_image_is_empty():
    result = predict_tiled(OracleModel(), torch.zeros(1, 300, 200), 128, 32)
    assert isinstance(result, InstanceResult)
    assert len(result) == 0 and result.label_image.shape == (300, 200)
