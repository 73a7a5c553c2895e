"""Box primitives: both codings, clipping, size filter, matching, sampling and per-image grouping."""

from __future__ import annotations

import math

import pytest
import torch

from maskrcnn.modeling.boxes import (clip_boxes, first_k_per_image, is_large_enough, rcnn_decode, rcnn_encode,
                                     rpn_decode, rpn_encode, split_by_image)
from maskrcnn.modeling.sampling import (candidates_with_truth, match_boxes, per_instance_weights, sample_balanced,
                                        sample_indices)
from maskrcnn.structures import Target, masks_to_boxes

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


# --- the spec's RPN coding --------------------------------------------------------------------
def test_rpn_coding_of_an_anchor_equal_to_the_box():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-4.0, -8.0, 4.0, 8.0]])
    assert torch.equal(rpn_encode(anchors, anchors), torch.full((2, 4), 0.5))
    assert torch.equal(rpn_decode(anchors, torch.full((2, 4), 0.5)), anchors)


def test_rpn_coding_known_value():
    # Anchor centre (5, 5), size 10 x 10: each edge's offset from the centre over the size,
    # left/top negated.
    anchor = torch.tensor([0.0, 0.0, 10.0, 10.0])
    box = torch.tensor([2.0, 0.0, 10.0, 12.0])
    assert torch.allclose(rpn_encode(anchor, box), torch.tensor([0.3, 0.5, 0.5, 0.7]))
    # Non-square anchor: x over the width, y over the height.
    anchor = torch.tensor([0.0, 0.0, 20.0, 10.0])
    assert torch.allclose(rpn_encode(anchor, torch.tensor([0.0, 0.0, 30.0, 10.0])),
                          torch.tensor([0.5, 0.5, 1.0, 0.5]))


def test_rpn_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors, boxes = random_boxes(200, g), random_boxes(200, g)
    assert torch.allclose(rpn_decode(anchors, rpn_encode(anchors, boxes)), boxes, atol=1e-9)
    deltas = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(rpn_encode(anchors, rpn_decode(anchors, deltas)), deltas, atol=1e-9)


def test_rpn_coding_broadcasts_over_a_batch():
    g = torch.Generator().manual_seed(1)
    anchors, boxes = random_boxes(6, g), random_boxes(12, g).reshape(2, 6, 4)
    deltas = rpn_encode(anchors.expand(2, -1, -1), boxes)
    assert deltas.shape == (2, 6, 4)
    assert torch.allclose(deltas[1], rpn_encode(anchors, boxes[1]))


# --- the RCNN coding --------------------------------------------------------------------------
def test_rcnn_coding_known_value():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[5.0, 0.0, 15.0, 20.0]])   # centre moved by (5, 5), twice as tall
    expected = torch.tensor([[10 * 0.5, 10 * 0.5, 0.0, 5 * math.log(2.0)]])
    assert torch.allclose(rcnn_encode(proposal, box, WEIGHTS), expected)
    assert torch.allclose(rcnn_encode(proposal, proposal, WEIGHTS), torch.zeros(1, 4))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), WEIGHTS])
def test_rcnn_round_trip(weights):
    g = torch.Generator().manual_seed(2)
    proposals, boxes = random_boxes(200, g), random_boxes(200, g)
    deltas = rcnn_encode(proposals, boxes, weights)
    assert torch.allclose(rcnn_decode(proposals, deltas, weights), boxes, atol=1e-9)


def test_rcnn_decode_clamps_huge_log_sizes():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    box = rcnn_decode(proposal, deltas, (1.0, 1.0, 1.0, 1.0))
    assert torch.isfinite(box).all()
    # exp(clamp) = 1000 / 16: the box grows by that factor about its centre (5, 10).
    w, h = 10 * 1000 / 16, 20 * 1000 / 16
    assert torch.allclose(box, torch.tensor([[5 - w / 2, 10 - h / 2, 5 + w / 2, 10 + h / 2]]))
    # Shrinking is not clamped.
    tiny = rcnn_decode(proposal, torch.tensor([[0.0, 0.0, -5.0, 0.0]]), (1.0, 1.0, 1.0, 1.0))
    assert float(tiny[0, 2] - tiny[0, 0]) == pytest.approx(10 * math.exp(-5.0), rel=1e-4)


def test_rcnn_decode_per_class_deltas_broadcast():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 30.0]])
    deltas = torch.zeros(2, 3, 4)
    boxes = rcnn_decode(proposals[:, None], deltas, WEIGHTS)
    assert boxes.shape == (2, 3, 4)
    assert torch.allclose(boxes, proposals[:, None].expand(-1, 3, -1))


# --- clipping and size filter -------------------------------------------------------------------
def test_clip_boxes_to_a_fixed_size():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 8.0], [2.0, 3.0, 4.0, 5.0]])
    clipped = clip_boxes(boxes, 10, 20)
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 20.0, 8.0], [2.0, 3.0, 4.0, 5.0]]))


def test_clip_boxes_to_per_box_sizes():
    boxes = torch.tensor([[-5.0, -5.0, 100.0, 100.0]]).expand(2, -1)
    clipped = clip_boxes(boxes, torch.tensor([10, 40]), torch.tensor([30, 50]))
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 30.0, 10.0], [0.0, 0.0, 50.0, 40.0]]))


def test_is_large_enough_needs_both_sides():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 4.9, 10.0], [0.0, 0.0, 10.0, 4.9]])
    assert is_large_enough(boxes, 5).tolist() == [True, False, False]


# --- matching -----------------------------------------------------------------------------------
def test_match_boxes_gives_best_truth_and_iou():
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    iou, index = match_boxes(boxes, truth)
    assert torch.allclose(iou, torch.tensor([0.5, 1.0, 0.0]))
    assert index[:2].tolist() == [0, 1]


def test_candidates_with_truth_adds_truth_and_drops_small_boxes():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 10.0]])
    truth = torch.tensor([[20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 43.0, 43.0]])
    out = candidates_with_truth(proposals, truth, min_size=5)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    assert torch.equal(candidates_with_truth(torch.zeros(0, 4), truth[:1], 5), truth[:1])


# --- sampling -----------------------------------------------------------------------------------
def test_sample_indices_without_then_with_replacement():
    g = torch.Generator().manual_seed(0)
    candidates = torch.arange(10, 20)
    few = sample_indices(candidates, 6, g)
    assert few.numel() == 6 and few.unique().numel() == 6 and set(few.tolist()) <= set(range(10, 20))
    many = sample_indices(candidates, 25, g)
    assert many.numel() == 25 and set(many.tolist()) <= set(range(10, 20))
    assert sample_indices(candidates[:0], 5, g).numel() == 0
    assert sample_indices(candidates, 0, g).numel() == 0


def test_per_instance_weights_give_each_instance_the_same_total():
    assign = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    weights = per_instance_weights(assign)
    totals = torch.zeros(3).index_add_(0, assign, weights)
    assert torch.allclose(totals, torch.ones(3))
    assert per_instance_weights(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_weighted_sampling_draws_a_rare_instance_as_often_as_a_common_one():
    # instance 0 has 90 candidates, instance 1 has 2: uniform draws of 4 would rarely pick instance 1
    assign = torch.tensor([0] * 90 + [1] * 2)
    candidates = torch.arange(92)
    g = torch.Generator().manual_seed(0)
    weights = per_instance_weights(assign)
    picks = torch.stack([sample_indices(candidates, 4, g, weights) for _ in range(500)])
    assert all(p.unique().numel() == 4 for p in picks)            # still without replacement
    share_rare = (picks >= 90).float().mean().item()
    assert 0.35 < share_rare < 0.5                                  # uniform: 2/92 ≈ 0.02
    uniform = torch.stack([sample_indices(candidates, 4, g) for _ in range(500)])
    assert (uniform >= 90).float().mean().item() < 0.05
    repeated = sample_indices(candidates[90:], 6, g, weights[90:])  # too few: with replacement
    assert repeated.numel() == 6 and set(repeated.tolist()) <= {90, 91}


def test_sample_balanced_with_plenty_of_both():
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.arange(0, 100), torch.arange(100, 1000)
    s_fg, s_bg = sample_balanced(fg, bg, batch_size=64, fg_fraction=0.25, generator=g)
    assert s_fg.numel() == 16 and s_bg.numel() == 48
    assert s_fg.unique().numel() == 16 and s_bg.unique().numel() == 48
    assert bool((s_fg < 100).all()) and bool((s_bg >= 100).all())
    s_fg, s_bg = sample_balanced(fg, bg, batch_size=10, fg_fraction=0.33, generator=g)
    assert (s_fg.numel(), s_bg.numel()) == (round(3.3), 7)


def test_sample_balanced_with_too_few_foregrounds():
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.tensor([3, 7]), torch.arange(100, 200)
    s_fg, s_bg = sample_balanced(fg, bg, batch_size=16, fg_fraction=0.5, generator=g)
    assert sorted(s_fg.tolist()) == [3, 7]
    assert s_bg.numel() == 14 and s_bg.unique().numel() == 14


def test_sample_balanced_with_too_few_backgrounds_repeats_them():
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.arange(100), torch.tensor([500, 501])
    s_fg, s_bg = sample_balanced(fg, bg, batch_size=16, fg_fraction=0.5, generator=g)
    assert s_fg.numel() == 8 and s_bg.numel() == 8
    assert set(s_bg.tolist()) <= {500, 501}


def test_sample_balanced_without_background_takes_all_from_foreground():
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.tensor([4, 5, 6]), torch.zeros(0, dtype=torch.long)
    s_fg, s_bg = sample_balanced(fg, bg, batch_size=8, fg_fraction=0.25, generator=g)
    assert s_fg.numel() == 8 and set(s_fg.tolist()) <= {4, 5, 6}
    assert s_bg.numel() == 0


def test_sample_balanced_without_foreground_takes_all_from_background():
    g = torch.Generator().manual_seed(0)
    s_fg, s_bg = sample_balanced(torch.zeros(0, dtype=torch.long), torch.arange(50), 8, 0.5, g)
    assert s_fg.numel() == 0 and s_bg.numel() == 8 and s_bg.unique().numel() == 8


def test_sample_balanced_with_nothing_is_empty():
    empty = torch.zeros(0, dtype=torch.long)
    s_fg, s_bg = sample_balanced(empty, empty, 8, 0.5)
    assert s_fg.numel() == 0 and s_bg.numel() == 0


# --- per-image grouping -------------------------------------------------------------------------
def test_first_k_per_image_keeps_priority_order_within_each_image():
    image = torch.tensor([0, 1, 0, 0, 1, 1, 1, 2])
    assert first_k_per_image(image, 2).tolist() == [0, 2, 1, 4, 7]
    assert first_k_per_image(image, 10).tolist() == [0, 2, 3, 1, 4, 5, 6, 7]
    assert first_k_per_image(image[:0], 3).numel() == 0


def test_split_by_image_with_an_empty_image():
    image = torch.tensor([0, 0, 2])
    values = torch.tensor([10.0, 11.0, 12.0])
    boxes = torch.arange(12.0).reshape(3, 4)
    parts = split_by_image(image, 3, values, boxes)
    assert [p[0].tolist() for p in parts] == [[10.0, 11.0], [], [12.0]]
    assert parts[1][1].shape == (0, 4)
    assert torch.equal(parts[2][1], boxes[2:])


# --- structures ---------------------------------------------------------------------------------
def test_masks_to_boxes_uses_pixel_edges():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[3.0, 2.0, 9.0, 5.0], [11.0, 7.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0]]
    assert masks_to_boxes(masks[:0]).shape == (0, 4)


def test_target_checks_counts():
    target = Target.from_masks(torch.ones(2, 4, 4))
    assert len(target) == 2 and target.labels.tolist() == [1, 1] and target.masks.dtype == torch.bool
    with pytest.raises(ValueError, match="instance count"):
        Target(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2, 4, 4))
