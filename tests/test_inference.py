"""maskrcnn.prediction.segment: test-time augmentation and input scaling around the one detector call.

The mapping of instances back from a flipped or transposed image is checked exactly with the
oracle of test_tiling (it reads instances off pixel values in any orientation); what TTA and
--scale do for a real model is checked on the small model test_export trains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrcnn.prediction.segment import DIHEDRAL, _apply, _undo, segment

from test_tiling import ID_SCALE, OracleModel, matched_iou


def label_picture(size: tuple[int, int]) -> torch.Tensor:
    """A (1, H, W) oracle image: a few rectangles and an L shape (no symmetry to hide a wrong mapping)."""
    label = torch.zeros(size, dtype=torch.int32)
    label[5:20, 8:30] = 1
    label[40:52, 3:9] = 2
    label[25:45, 40:50] = 3
    label[25:30, 50:60] = 3  # the L's foot
    label[50:58, 30:62] = 4
    return (label.float() / ID_SCALE)[None]


@pytest.mark.parametrize("transform", DIHEDRAL)
def test_each_pass_maps_its_instances_back_to_the_original_frame(transform):
    image = label_picture((60, 64))
    plain = segment(OracleModel(), image)
    seen = OracleModel()(_apply(image, *transform)).results[0]
    back = _undo(seen, (60, 64), *transform)
    order = torch.argsort(back.scores, descending=True)
    torch.testing.assert_close(back.boxes[order], plain.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(back.mask_probs[order], plain.mask_probs, atol=1e-4, rtol=0)


def test_tta_of_a_perfect_detector_is_the_detector():
    image = label_picture((60, 64))
    plain = segment(OracleModel(), image)
    tta = segment(OracleModel(), image, tta=True)
    assert len(tta) == len(plain) == 4
    torch.testing.assert_close(tta.boxes, plain.boxes, atol=1e-4, rtol=0)
    assert torch.equal(tta.label_image, plain.label_image)


def test_tta_applies_per_tile():
    image = label_picture((60, 64))
    tiled = segment(OracleModel(), image, tile=48, overlap=24, tta=True)
    assert len(tiled) == 4
    assert matched_iou(tiled.label_image, segment(OracleModel(), image).label_image).min() > 0.99


def test_scale_must_be_positive():
    with pytest.raises(ValueError, match="scale must be > 0"):
        segment(OracleModel(), label_picture((60, 64)), scale=0.0)


# --- a trained model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    from test_export import train_tiny_model

    model, normalizer = train_tiny_model()
    return model.eval(), normalizer


def symmetric_discs(size: int = 96, step: int = 28, radius: float = 9.0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) picture of 9 discs on a 3 x 3 grid about the image centre, unchanged by every flip and
    transpose (pixel centres at i + 0.5, centre of symmetry at size / 2), and their label image."""
    centre = size / 2
    yy, xx = np.mgrid[:size, :size] + 0.5
    label = np.zeros((size, size), np.int32)
    for k, (dy, dx) in enumerate([(dy, dx) for dy in (-step, 0, step) for dx in (-step, 0, step)], start=1):
        label[(yy - centre - dy) ** 2 + (xx - centre - dx) ** 2 <= radius**2] = k
    return 0.1 + 0.8 * (label > 0), label


@pytest.mark.slow
def test_tta_finds_the_same_instances_on_a_symmetric_image(trained):
    from test_export import rgb8

    model, normalizer = trained
    picture, label = symmetric_discs()
    for transform in DIHEDRAL:  # the picture really is symmetric
        assert np.array_equal(_apply(torch.from_numpy(picture)[None], *transform)[0].numpy(), picture)
    image = normalizer(rgb8(picture))
    plain = segment(model, image)
    tta = segment(model, image, tta=True)
    assert len(plain) == len(tta) == 9
    truth = torch.from_numpy(label)
    # the same instances: each matches one of the other at IoU > 0.5 (the small model's masks differ
    # a little between orientations: TTA keeps the best-scored pass's mask of each disc)
    assert matched_iou(plain.label_image, truth).min() > 0.5  # the small model finds every disc
    assert matched_iou(tta.label_image, plain.label_image).min() > 0.5
    assert matched_iou(plain.label_image, tta.label_image).min() > 0.5


@pytest.mark.slow
def test_scale_brings_large_objects_back_to_the_models_size(trained):
    """Blobs drawn twice as large as trained on: --scale 0.5 finds what the model finds on the
    original picture, with boxes and masks in the large image's frame."""
    from test_export import blob_picture, rgb8

    model, normalizer = trained
    picture, _ = blob_picture(96, 96, seed=11)
    plain = segment(model, normalizer(rgb8(picture)))
    large = np.kron(picture, np.ones((2, 2)))  # every pixel doubled: 192 x 192
    scaled = segment(model, normalizer(rgb8(large)), scale=0.5)
    assert scaled.label_image.shape == (192, 192)
    # the confident detections agree (a weak one may come and go with the resampling)
    sure, sure_scaled = plain.scores >= 0.8, scaled.scores >= 0.8
    assert int(sure_scaled.sum()) == int(sure.sum()) > 0
    torch.testing.assert_close(scaled.boxes[sure_scaled], 2 * plain.boxes[sure], atol=2.0, rtol=0)
    doubled = torch.from_numpy(np.kron(plain.label_image.numpy(), np.ones((2, 2), np.int32)))
    assert matched_iou(doubled, scaled.label_image).min() > 0.8
