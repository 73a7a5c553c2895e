"""maskrcnn.prediction.segment: test-time augmentation and input scaling around the one detector call.

The mapping of instances back from a flipped or transposed image is checked exactly with the
oracle of test_tiling (it reads instances off pixel values in any orientation), and TTA's vote
over passes on a scripted detector whose every pass is known; what --scale does for a real model
is checked on the small model test_export trains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from maskrcnn.config import Config
from maskrcnn.modeling.mask.postprocess import assemble_result
from maskrcnn.prediction.segment import DIHEDRAL, _apply, _undo, segment
from maskrcnn.structures import ModelOutput, masks_to_boxes

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


class ScriptedDetector(torch.nn.Module):
    """A detector whose every TTA pass is known: the oracle's instances (read off the pixel values of
    the image it is given, in that pass's orientation), changed per pass as a real model's would be.

    Passes come in ``DIHEDRAL`` order (the order ``segment`` runs them). Every instance scores 0.9
    except: pass 0 (the identity) sees instance 1 without its right-most ``SHRINK`` columns and
    scores it 0.99; passes 1 and 2 miss instance 2; pass 3 also finds a false positive, a 4 x 4
    square in the corner of its flipped view, scoring 0.95.
    """

    SHRINK = 4

    def __init__(self) -> None:
        super().__init__()
        self.cfg = Config(mask_test_nms_overlap_threshold=0.3)
        self.passes = 0

    def forward(self, image: torch.Tensor) -> ModelOutput:
        p, self.passes = self.passes % len(DIHEDRAL), self.passes + 1
        labels = (image[0] * ID_SCALE).round().long()
        if p == 0:
            labels[:, 30 - self.SHRINK:30][labels[:, 30 - self.SHRINK:30] == 1] = 0
        if p in (1, 2):
            labels[labels == 2] = 0
        if p == 3:
            labels[:4, -4:] = 9
        ids = labels.unique()
        ids = ids[ids > 0]
        masks = labels[None] == ids[:, None, None]
        boxes = masks_to_boxes(masks)
        rois = torch.cat([torch.arange(len(ids), dtype=torch.float32)[:, None], boxes], dim=1)
        probs = roi_align(masks[:, None].float(), rois, self.cfg.mask_size, 1.0, 2, aligned=True)[:, 0]
        scores = torch.full((len(ids),), 0.9)
        scores[ids == 9] = 0.95
        if p == 0:
            scores[ids == 1] = 0.99
        result = assemble_result(boxes, scores, torch.ones(len(ids), dtype=torch.long), probs, probs > 0.5,
                                 tuple(labels.shape), self.cfg)
        return ModelOutput(results=[result])


def test_tta_votes_over_passes_and_keeps_the_best_scored_mask():
    """Each instance scores its mean over the 8 passes (a pass that missed it adds 0): an instance
    missed twice stays, a false positive of one pass falls below the score threshold; each keeps
    the mask of the pass that scored it highest."""
    image = label_picture((60, 64))
    plain = segment(ScriptedDetector(), image)  # pass 0 alone: instance 1 shrunk, no false positive
    assert len(plain) == 4
    tta = segment(ScriptedDetector(), image, tta=True)
    assert len(tta) == 4
    # the same masks (ids follow the scores): instance 1 as pass 0 saw it, and no false positive
    assert torch.equal(tta.label_image > 0, plain.label_image > 0)
    assert matched_iou(tta.label_image, plain.label_image).min() == 1.0
    expected = {1: (0.99 + 7 * 0.9) / 8, 2: 6 * 0.9 / 8, 3: 0.9, 4: 0.9}  # by the picture's own ids
    truth = (image[0] * ID_SCALE).round().long()
    for k, score in zip(range(1, len(tta) + 1), tta.scores.tolist()):
        ids, counts = truth[tta.label_image == k].unique(return_counts=True)
        assert score == pytest.approx(expected[int(ids[counts.argmax()])], abs=1e-5)
    shrunk = (plain.label_image == plain.label_image[10, 10]).sum()
    assert int(shrunk) == 15 * (22 - ScriptedDetector.SHRINK)  # instance 1: rows 5:20, columns 8:26


# --- a trained model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from test_export import tiny_trained_model  # trained once per test run, shared with test_export

    return tiny_trained_model(tmp_path_factory)


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
