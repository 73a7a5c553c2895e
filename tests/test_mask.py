"""Mask stage: targets on known squares, head and loss, and the post-processing to a label image."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.config import Config
from maskrcnn.modeling.mask.head import MaskHead
from maskrcnn.modeling.mask.loss import mask_loss
from maskrcnn.modeling.mask.paste import largest_component, mask_nms, paste_label_image, paste_masks
from maskrcnn.modeling.mask.targets import MaskTargets, crop_masks, make_mask_targets
from maskrcnn.structures import Detections
from maskrcnn.modeling.mask.postprocess import make_instance_result
from maskrcnn.structures import Proposals

M = 28


# --- targets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [8, 13, 16, 40])  # 8 px: the smallest anchor, upsampled 3.5 x
def test_crop_of_a_square_by_its_own_box_is_all_ones(side, squares):
    target = squares(64, 64, [(4, 6, side)])
    assert target.boxes.tolist() == [[4.0, 6.0, 4.0 + side, 6.0 + side]]
    out = crop_masks(target.masks, torch.tensor([0]), target.boxes, M)
    assert torch.equal(out, torch.ones(1, M, M))


@pytest.mark.parametrize("side", [8, 13, 16, 40])
def test_crop_by_a_box_twice_as_wide_is_half_ones(side, squares):
    target = squares(64, 96, [(4, 6, side)])
    wide = torch.tensor([[4.0, 6.0, 4.0 + 2 * side, 6.0 + side]])
    out = crop_masks(target.masks, torch.tensor([0]), wide, M)
    expected = torch.zeros(1, M, M)
    expected[:, :, : M // 2] = 1
    assert torch.equal(out, expected)
    # And twice as tall, the square in its bottom half (the top half is off the image).
    tall = torch.tensor([[4.0, 6.0 - side, 4.0 + side, 6.0 + side]])
    out = crop_masks(target.masks, torch.tensor([0]), tall, M)
    assert torch.equal(out, expected.transpose(1, 2).flip(1))


def test_crop_picks_each_boxes_instance_and_reads_zero_outside_the_image(squares):
    target = squares(32, 32, [(0, 0, 8), (16, 16, 8)])
    boxes = torch.tensor([[16.0, 16.0, 24.0, 24.0], [0.0, 0.0, 8.0, 8.0], [-8.0, 0.0, 8.0, 8.0]])
    out = crop_masks(target.masks, torch.tensor([1, 0, 0]), boxes, M)
    assert torch.equal(out[:2], torch.ones(2, M, M))
    # Box hanging off the left edge: its left half lies outside the image.
    assert torch.equal(out[2, :, M // 2:], torch.ones(M, M // 2))
    assert out[2, :, : M // 2].sum() == 0
    assert crop_masks(target.masks, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), M).shape == (0, M, M)


def test_mask_targets_sample_foreground_boxes(squares):
    torch.manual_seed(0)
    cfg = Config(mask_train_batch_size=5)
    target = squares(64, 64, [(4, 4, 16), (40, 40, 16)], labels=[1, 1])
    proposals = Proposals(torch.tensor([[4.0, 4.0, 36.0, 20.0], [30.0, 0.0, 60.0, 20.0]]), torch.ones(2))
    t = make_mask_targets([proposals], [target], cfg)
    assert t.proposals[0].shape == (5, 4) and t.labels.tolist() == [1] * 5
    for box, mask in zip(t.proposals[0], t.masks):
        if box.tolist() == [4.0, 4.0, 36.0, 20.0]:   # twice as wide as the first square
            assert torch.equal(mask[:, : M // 2], torch.ones(M, M // 2)) and mask[:, M // 2:].sum() == 0
        else:                                        # a truth box: its own square
            assert box.tolist() in target.boxes.tolist() and torch.equal(mask, torch.ones(M, M))
    # The far proposal (IoU 0) is never a mask target.
    assert [30.0, 0.0, 60.0, 20.0] not in t.proposals[0].tolist()


def test_mask_targets_of_an_image_without_instances(squares):
    cfg = Config()
    empty = squares(32, 32, [])
    t = make_mask_targets([Proposals(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.ones(1))], [empty], cfg)
    assert t.proposals[0].shape == (0, 4) and t.labels.numel() == 0 and t.masks.shape == (0, M, M)


# --- head and loss --------------------------------------------------------------------------------
def test_head_doubles_the_crop_size():
    cfg = Config(num_classes=3, class_names=["bg", "a", "b"], mask_head_channels=8)
    head = MaskHead(cfg, in_channels=4)
    assert head(torch.randn(2, 4, 14, 14)).shape == (2, 3, 28, 28)


def test_loss_uses_the_true_class_channel_only():
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1
    masks[1, :, :1] = 1
    labels = torch.tensor([2, 1])
    logits = torch.full((2, 3, 4, 4), 50.0)                 # wrong everywhere
    logits[torch.arange(2), labels] = masks * 60 - 30       # right on the true class
    targets = MaskTargets([torch.zeros(2, 4)], labels, masks)
    assert mask_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-10)
    assert mask_loss(torch.zeros(2, 3, 4, 4), targets).item() == pytest.approx(0.693147, rel=1e-5)


# --- post-processing ------------------------------------------------------------------------------
def test_largest_component_keeps_the_largest_blob():
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 1:4, 1:4] = True              # 9 pixels
    masks[0, 6:8, 6:8] = True              # 4 pixels: dropped
    masks[1, 0, 0] = True                  # 8-connected diagonal chain of 5 ...
    for k in range(1, 5):
        masks[1, k, k] = True
    masks[1, 10:12, 0:2] = True            # ... beats a 2 x 2 block
    out = largest_component(masks)
    expected = torch.zeros_like(masks)
    expected[0, 1:4, 1:4] = True
    for k in range(5):
        expected[1, k, k] = True
    assert torch.equal(out, expected)
    assert largest_component(masks[:0]).shape == (0, 12, 12)


def full_masks(n: int) -> torch.Tensor:
    return torch.ones(n, M, M, dtype=torch.bool)


def test_mask_nms_suppresses_a_duplicate_and_keeps_a_separate_mask():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]])
    assert mask_nms(full_masks(3), boxes, 0.5).tolist() == [True, False, True]
    assert mask_nms(full_masks(0), boxes[:0], 0.5).tolist() == []


def test_mask_nms_is_greedy_along_a_chain():
    # IoU(A, B) = IoU(B, C) = 1/3, IoU(A, C) = 0: B is suppressed by A, so C survives.
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 0.0, 30.0, 20.0], [20.0, 0.0, 40.0, 20.0]])
    assert mask_nms(full_masks(3), boxes, 0.3).tolist() == [True, False, True]
    assert mask_nms(full_masks(3), boxes, 0.34).tolist() == [True, True, True]
    # A longer chain alternates.
    boxes = torch.tensor([[10.0 * k, 0.0, 10.0 * k + 20, 20.0] for k in range(6)])
    assert mask_nms(full_masks(6), boxes, 0.3).tolist() == [True, False, True, False, True, False]


def test_mask_nms_uses_mask_overlap_not_box_overlap():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    masks = torch.zeros(2, M, M, dtype=torch.bool)
    masks[0, :, : M // 2] = True
    masks[1, :, M // 2:] = True
    assert mask_nms(masks, boxes, 0.1).tolist() == [True, True]


def test_paste_label_image_higher_score_owns_overlaps():
    probs = torch.ones(2, M, M)
    boxes = torch.tensor([[2.0, 2.0, 10.0, 10.0], [6.0, 4.0, 14.0, 12.0]])
    label = paste_label_image(probs, boxes, 16, 20, 0.5)
    expected = torch.zeros(16, 20, dtype=torch.int32)
    expected[4:12, 6:14] = 2
    expected[2:10, 2:10] = 1               # row 0 scores higher: drawn on top
    assert label.dtype == torch.int32 and torch.equal(label, expected)


def test_paste_follows_the_mask_and_clips_to_the_image():
    probs = torch.zeros(2, M, M)
    probs[0, :, : M // 2] = 0.9            # left half of a 16 x 8 box
    probs[1] = 1.0
    boxes = torch.tensor([[4.0, 6.0, 20.0, 14.0], [20.0, 20.0, 40.0, 40.0]])
    masks = paste_masks(probs, boxes, 30, 24, 0.5)
    expected = torch.zeros(2, 30, 24, dtype=torch.bool)
    expected[0, 6:14, 4:12] = True
    expected[1, 20:30, 20:24] = True
    assert torch.equal(masks, expected)
    label = paste_label_image(probs, boxes, 30, 24, 0.5)
    assert torch.equal(label, expected[0].int() + 2 * expected[1].int())


def test_many_instances_of_different_sizes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(40, 2, generator=g) * 60], dim=1)
    probs = torch.rand(40, M, M, generator=g)
    label = paste_label_image(probs, boxes, 128, 128, 0.5)
    masks = paste_masks(probs, boxes, 128, 128, 0.5)
    # Pixel by pixel: the first (highest-scoring) mask covering it.
    covered = masks.any(dim=0)
    first = torch.where(covered, masks.int().argmax(dim=0) + 1, 0)
    assert torch.equal(label, first.int())


def test_instance_result_from_hand_built_detections():
    cfg = Config()  # mask threshold 0.5, pre-score threshold 0.4, mask NMS at 0.1
    boxes = torch.tensor([[20.0, 20.0, 40.0, 40.0],    # 0.6
                          [0.0, 0.0, 10.0, 10.0],      # 0.9
                          [0.0, 0.0, 10.0, 10.0],      # 0.8: a duplicate of the 0.9 one
                          [30.0, 0.0, 50.0, 10.0],     # 0.3: under the pre-score threshold
                          [24.0, 24.0, 28.0, 28.0]])   # 0.5: entirely behind the 0.6 one
    scores = torch.tensor([0.6, 0.9, 0.8, 0.3, 0.5])
    detections = Detections(boxes, scores, torch.tensor([1, 2, 2, 1, 1]))
    probs = torch.ones(5, M, M)
    probs[0, :4, :4] = 0.0               # corners cut off the 20 x 20 mask ...
    probs[0, 22:, 22:] = 0.0
    probs[0, 24:, :4] = 0.0
    probs[0, 26:, :2] = 1.0              # ... and a stray blob inside a cut: not the largest part
    result = make_instance_result(detections, probs, (48, 64), cfg)

    assert len(result) == 2
    assert result.scores.tolist() == pytest.approx([0.9, 0.6])
    assert result.labels.tolist() == [2, 1]
    assert torch.equal(result.boxes, boxes[[1, 0]])
    assert result.label_image.shape == (48, 64) and result.image_size == (48, 64)
    main_part = probs[0].clone()
    main_part[26:, :2] = 0.0
    second = paste_masks(main_part[None], boxes[:1], 48, 64, 0.5)[0]
    with_blob = paste_masks(probs[:1], boxes[:1], 48, 64, 0.5)[0]
    assert with_blob[39, 20] and not second[39, 20]    # the blob would show at this pixel
    expected = torch.zeros(48, 64, dtype=torch.int32)
    expected[0:10, 0:10] = 1
    expected[second] = 2
    assert torch.equal(result.label_image, expected)
    assert torch.equal(result.mask(0), expected == 1)
    assert torch.equal(result.mask(1), second)


def test_instance_result_without_detections():
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    result = make_instance_result(empty, torch.zeros(0, M, M), (10, 12), Config())
    assert len(result) == 0 and torch.equal(result.label_image, torch.zeros(10, 12, dtype=torch.int32))
