"""mask_test_min_contrast: faint instances dropped against levels read from the whole image, alike
whole, tiled and streamed (maskrcnn.prediction.contrast)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from maskrcnn.config import Config, ConfigError
from maskrcnn.data.regions import ArraySource
from maskrcnn.modeling.mask.postprocess import assemble_result
from maskrcnn.prediction.contrast import NO_FLOOR, contrast_floor, drop_faint
from maskrcnn.prediction.large import predict_streamed
from maskrcnn.prediction.segment import segment

from test_large import disc_image, oracle_predictor
from test_tiling import ID_SCALE

SHARE = 0.5  # the oracle's discs carry their ids as intensities (id / ID_SCALE): low ids are faint


def with_share(predictor, share: float = SHARE):
    predictor.model.cfg = predictor.model.cfg.replace(mask_test_min_contrast=share)
    return predictor


def kept_ids(labels: np.ndarray, image: np.ndarray) -> set[int]:
    """The oracle ids (read off the image) of the instances in a label image."""
    return {int(round(float(image[labels == i].mean()) * ID_SCALE)) for i in np.unique(labels) if i}


def test_the_floor_lies_between_background_and_objects():
    image = torch.full((1, 200, 200), 0.1)
    image[:, 20:60, 20:60] = image[:, 120:170, 100:150] = 0.9
    assert contrast_floor(image, 0.25) == pytest.approx(0.1 + 0.25 * 0.8, abs=0.01)
    assert contrast_floor(image, 0.0) == NO_FLOOR
    assert contrast_floor(torch.full((1, 50, 50), 0.3), 0.5) == NO_FLOOR  # one level: nothing to judge by
    with pytest.raises(ConfigError, match="mask_test_min_contrast"):
        Config(mask_test_min_contrast=1.5).validate()


def test_drop_faint_keeps_bright_instances_and_renumbers_the_label_image():
    image = torch.zeros(1, 40, 60)
    masks = torch.zeros(3, 40, 60, dtype=torch.bool)
    masks[0, 5:15, 5:15] = masks[1, 20:30, 20:30] = masks[2, 5:15, 40:50] = True
    image[0][masks[0]], image[0][masks[1]], image[0][masks[2]] = 0.9, 0.15, 0.6
    boxes = torch.tensor([[5.0, 5, 15, 15], [20, 20, 30, 30], [40, 5, 50, 15]])
    probs = torch.ones(3, 28, 28)  # each mask fills its box
    result = assemble_result(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.ones(3, dtype=torch.long), probs,
                             probs > 0.5, (40, 60), Config())
    kept = drop_faint(result, image, 0.3)
    assert len(kept) == 2 and kept.scores.tolist() == pytest.approx([0.9, 0.7])
    assert torch.equal(kept.boxes, boxes[[0, 2]])
    assert sorted(kept.label_image.unique().tolist()) == [0, 1, 2]
    assert torch.equal(kept.label_image == 2, result.label_image == 3)  # the third is now the second
    assert drop_faint(result, image, NO_FLOOR) is result


def test_whole_tiled_and_streamed_drop_the_same_faint_instances(tmp_path):
    image = disc_image()
    predictor = with_share(oracle_predictor())
    normalized = predictor.normalizer(image)
    floor = contrast_floor(normalized, SHARE)
    truth = {int(i) for i in np.unique(np.round(image * ID_SCALE)) if i}
    bright = {i for i in truth if i / ID_SCALE >= floor}
    assert 0 < len(bright) < len(truth)  # the check below is not trivial

    whole = segment(predictor.model, normalized)
    tiled = segment(predictor.model, normalized, tile=128, overlap=48)
    files = predict_streamed(predictor, ArraySource(image), tmp_path, "discs", 128, 48)
    for labels in (whole.label_image.numpy(), tiled.label_image.numpy(), tifffile.imread(files.label_image)):
        assert kept_ids(labels, image) == bright
    everything = segment(with_share(oracle_predictor(), 0.0).model, normalized)
    assert kept_ids(everything.label_image.numpy(), image) == truth
