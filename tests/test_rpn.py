"""RPN: head shapes and layout, targets, losses and proposals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling.boxes import rpn_decode, rpn_encode
from maskrcnn.config import Config, NmsSettings
from maskrcnn.modeling.losses import focal_cross_entropy, mean_over_images, smooth_l1
from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.modeling.rpn.head import RpnMultiHead
from maskrcnn.modeling.rpn.loss import rpn_loss
from maskrcnn.modeling.rpn.proposals import make_proposals
from maskrcnn.modeling.rpn.targets import make_rpn_targets


# --- head -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_spec_example_shapes():
    cfg = Config()
    # the spec's sizes on the meta device: shapes without the 50 GFLOP of computing them
    features = [torch.empty(5, 256, s, s, device="meta") for s in (128, 64, 32, 16)]
    logits, deltas = RpnMultiHead(cfg, 256).to("meta")(features)
    assert logits.shape == (5, 65280, 2)
    assert deltas.shape == (5, 65280, 2, 4)
    sizes = [(s, s) for s in (128, 64, 32, 16)]
    assert AnchorGenerator(cfg)(sizes, torch.device("cpu")).shape[0] == 65280


@torch.no_grad()
def test_head_outputs_are_flattened_like_the_anchors():
    """Entry n of level l is (pixel, base) = divmod(n, A): check it with constant per-channel biases."""
    cfg = Config(rpn_head_channels=4, rpn_base_aspect_ratios=[[(1, 1), (2, 1)], [(1, 1)], [(1, 1)], [(1, 1)]])
    head = RpnMultiHead(cfg, 3)
    for level, (to_logit, to_delta) in enumerate(zip(head.logits, head.deltas)):
        to_logit.weight.zero_()
        to_delta.weight.zero_()
        # Channel order (base, class) and (base, class, coordinate).
        to_logit.bias.copy_(100 * level + torch.arange(to_logit.bias.numel(), dtype=torch.float32))
        to_delta.bias.copy_(100 * level + torch.arange(to_delta.bias.numel(), dtype=torch.float32))
    features = [torch.randn(2, 3, h, w) for h, w in [(2, 3), (1, 2), (1, 1), (1, 1)]]
    logits, deltas = head(features)
    assert logits.shape == (2, 6 * 2 + 2 + 1 + 1, 2)
    # Level 0: six pixels, two bases each; base b has logits (2b, 2b + 1) at every pixel.
    assert logits[1, :12].tolist() == [[0.0, 1.0], [2.0, 3.0]] * 6
    assert deltas[0, 1].tolist() == [[8.0, 9.0, 10.0, 11.0], [12.0, 13.0, 14.0, 15.0]]
    assert logits[0, 12:].tolist() == [[100.0, 101.0], [100.0, 101.0], [200.0, 201.0], [300.0, 301.0]]


@torch.no_grad()
def test_untrained_head_proposes_its_anchors():
    """The spec's coding of "box = anchor" is 0.5, not 0 (which decodes to a point)."""
    cfg = Config(rpn_head_channels=8)
    head = RpnMultiHead(cfg, 4)
    for conv in head.convs:
        conv.bias.zero_()                    # zero features -> zero hidden -> outputs are the biases
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    logits, deltas = head([torch.zeros(1, 4, h, w) for h, w in sizes])
    assert torch.equal(logits, torch.zeros_like(logits))
    anchors = AnchorGenerator(cfg)(sizes, torch.device("cpu"))
    assert torch.allclose(rpn_decode(anchors, deltas[0, :, 1]), anchors)


# --- targets --------------------------------------------------------------------------------------
def test_best_anchor_of_a_truth_box_is_foreground_even_below_threshold():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    truth = torch.tensor([[0.0, 0.0, 10.0, 30.0]])  # IoU 1/3 with anchor 0, 0 with the others
    t = make_rpn_targets(anchors, [truth], fg_thresh_low=0.5, bg_thresh_high=0.5)
    assert t.labels.tolist() == [[1, 0, 0]]
    assert torch.allclose(t.deltas[0, 0], rpn_encode(anchors[0], truth[0]))
    assert t.deltas[0, 1:].abs().sum() == 0
    assert t.delta_weights.tolist() == [[1.0, 0.0, 0.0]]


def test_tied_best_anchors_are_all_foreground():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    truth = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 1/3 with both of the first two
    t = make_rpn_targets(anchors, [truth], fg_thresh_low=0.7, bg_thresh_high=0.3)
    assert t.labels.tolist() == [[1, 1, 0]]
    assert torch.allclose(t.deltas[0, :2], rpn_encode(anchors[:2], truth.expand(2, -1)))


def test_thresholds_and_background_weights():
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],     # IoU 1.0: fg (and the best)
        [0.0, 0.0, 10.0, 8.0],      # 0.8: fg
        [0.0, 0.0, 10.0, 5.0],      # 0.5: between the thresholds, ignored
        [0.0, 0.0, 10.0, 1.0],      # 0.1: bg
        [50.0, 50.0, 60.0, 60.0],   # 0: bg
        [70.0, 70.0, 80.0, 80.0],   # 0: bg
    ])
    t = make_rpn_targets(anchors, [truth], fg_thresh_low=0.7, bg_thresh_high=0.3)
    assert t.labels.tolist() == [[1, 1, 0, 0, 0, 0]]
    # Background weights num_fg / num_bg = 2 / 3, so both classes weigh 2 in all.
    assert torch.allclose(t.label_weights, torch.tensor([[1.0, 1.0, 0.0, 2 / 3, 2 / 3, 2 / 3]]))
    assert t.delta_weights.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    # IoU exactly at the fg threshold is foreground; just under the bg threshold is background.
    t = make_rpn_targets(anchors, [truth], fg_thresh_low=0.8, bg_thresh_high=0.5)
    assert t.labels.tolist() == [[1, 1, 0, 0, 0, 0]]
    assert t.label_weights[0, 2] == 0
    t = make_rpn_targets(anchors, [truth], fg_thresh_low=0.8, bg_thresh_high=0.51)
    assert t.label_weights[0, 2] > 0 and t.labels[0, 2] == 0


def test_each_image_is_labelled_against_its_own_boxes():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0],
                            [70.0, 70.0, 80.0, 80.0], [0.0, 0.0, 10.0, 9.0]])
    image1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    image2 = torch.tensor([[50.0, 50.0, 60.0, 60.0], [71.0, 70.0, 81.0, 80.0]])
    t = make_rpn_targets(anchors, [image1, image2], 0.7, 0.3)
    assert t.labels.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]
    for i, truth in enumerate([image1, image2]):
        alone = make_rpn_targets(anchors, [truth], 0.7, 0.3)
        for name in ("labels", "label_weights", "deltas", "delta_weights"):
            assert torch.equal(getattr(t, name)[i], getattr(alone, name)[0]), name
    assert torch.allclose(t.deltas[1, 2], rpn_encode(anchors[2], image2[1]))


def test_image_without_boxes_is_all_background():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [5.0, 5.0, 12.0, 12.0]])
    empty = torch.zeros(0, 4)
    for truth in ([empty], [empty, empty], [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), empty]):
        t = make_rpn_targets(anchors, truth, 0.5, 0.5)
        last = len(truth) - 1
        assert t.labels[last].tolist() == [0, 0, 0]
        assert torch.isfinite(t.label_weights).all() and torch.isfinite(t.deltas).all()
        assert (t.label_weights[last] > 0).all()
        assert t.deltas[last].abs().sum() == 0 and t.delta_weights[last].sum() == 0
    logits = torch.randn(1, 3, 2, requires_grad=True)
    deltas = torch.randn(1, 3, 2, 4, requires_grad=True)
    cls, reg = rpn_loss(logits, deltas, make_rpn_targets(anchors, [empty], 0.5, 0.5), 2.0, 3.0)
    assert torch.isfinite(cls) and reg == 0
    (cls + reg).backward()
    assert torch.isfinite(deltas.grad).all()


# --- losses ---------------------------------------------------------------------------------------
def weighted_mean(per_element: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * loss) / sum(w) over all elements: the loss of one image holding them all."""
    return mean_over_images(per_element.reshape(1, -1), weights.reshape(1, -1))


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 2, generator=g)
    labels = torch.randint(2, (2, 50), generator=g)
    weights = torch.rand(2, 50, generator=g)
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").reshape(2, 50)
    expected = (weights * ce).sum() / weights.sum()
    assert torch.allclose(weighted_mean(focal_cross_entropy(logits, labels, 0.0), weights), expected)


def test_focal_loss_known_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(fg) = 0.75
    loss = weighted_mean(focal_cross_entropy(logits, torch.tensor([1]), gamma=2.0), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.25**2 * -math.log(0.75), rel=1e-6)
    zero_weights = weighted_mean(focal_cross_entropy(logits, torch.tensor([1]), gamma=2.0), torch.tensor([0.0]))
    assert zero_weights.item() == 0.0


@pytest.mark.parametrize("sigma, d, expected", [
    (1.0, 0.5, 0.125),                  # quadratic: 0.5 sigma^2 d^2
    (1.0, 2.0, 1.5),                    # linear: |d| - 0.5 / sigma^2
    (1.0, -2.0, 1.5),
    (3.0, 0.1, 0.5 * 9 * 0.01),
    (3.0, 1.0, 1.0 - 0.5 / 9),
    (3.0, 1.0 / 9, 0.5 / 81 * 9),       # continuous where the zones meet
])
def test_smooth_l1_at_known_points(sigma, d, expected):
    predicted = torch.tensor([[d, 0.0, 0.0, 0.0]])
    loss = weighted_mean(smooth_l1(predicted, torch.zeros(1, 4), sigma), torch.ones(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_smooth_l1_sums_coordinates_and_averages_over_weights():
    predicted = torch.tensor([[1.0, 1.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [2.0, 0.0, 0.0, 0.0]])
    weights = torch.tensor([1.0, 0.0, 1.0])
    loss = weighted_mean(smooth_l1(predicted, torch.zeros(3, 4), sigma=1.0), weights)
    assert loss.item() == pytest.approx((0.5 + 0.5 + 1.5) / 2)


def test_rpn_loss_trains_only_the_foreground_delta_slot():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    targets = make_rpn_targets(anchors, [anchors[:1]], 0.5, 0.5)
    deltas = torch.zeros(1, 2, 2, 4)
    deltas[0, 0, 1] = 0.5                    # the fg slot is exactly the target
    deltas[0, :, 0] = 100.0                  # the bg slot is ignored
    logits = torch.tensor([[[-20.0, 20.0], [20.0, -20.0]]])
    cls, reg = rpn_loss(logits, deltas, targets, gamma=2.0, sigma=3.0)
    assert reg.item() == 0.0
    assert cls.item() == pytest.approx(0.0, abs=1e-12)


# --- proposals ------------------------------------------------------------------------------------
def rpn_outputs(anchors: torch.Tensor, scores: list[list[float]],
                boxes: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits giving these fg probabilities (B, N), deltas decoding to ``boxes`` (default: the anchors)."""
    p = torch.tensor(scores, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=-1).float()
    target = torch.stack(boxes) if boxes is not None else anchors.expand(len(scores), -1, -1)
    deltas = torch.zeros(len(scores), anchors.shape[0], 2, 4)
    deltas[:, :, 1] = rpn_encode(anchors.expand(len(scores), -1, -1), target)
    deltas[:, :, 0] = 7.0  # the bg slot must not be used
    return logits, deltas


def proposals(anchors, logits, deltas, sizes, **changes):
    options = dict(score_threshold=0.5, nms_threshold=0.5, min_size=1.0, pre_nms_top_k=100, post_nms_top_k=100)
    options.update(changes)
    settings = NmsSettings(options["score_threshold"], options["nms_threshold"], options["min_size"],
                           options["post_nms_top_k"], options["pre_nms_top_k"])
    return make_proposals(anchors, logits, deltas, torch.tensor(sizes), settings).proposals(len(sizes))


SEPARATE = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0],
                         [40.0, 0.0, 50.0, 10.0], [60.0, 0.0, 70.0, 10.0]])


def test_nms_removes_a_duplicate():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [1.0, 0.0, 21.0, 20.0], [40.0, 40.0, 60.0, 60.0]])
    logits, deltas = rpn_outputs(anchors, [[0.9, 0.8, 0.7]])
    (p,) = proposals(anchors, logits, deltas, [(100, 100)])
    assert torch.allclose(p.boxes, anchors[[0, 2]])
    assert torch.allclose(p.scores, torch.tensor([0.9, 0.7]))
    (p,) = proposals(anchors, logits, deltas, [(100, 100)], nms_threshold=0.95)
    assert len(p) == 3


def test_deltas_move_the_proposals():
    anchors = SEPARATE[:1]
    moved = torch.tensor([[2.0, 3.0, 14.0, 9.0]])
    logits, deltas = rpn_outputs(anchors, [[0.9]], [moved])
    (p,) = proposals(anchors, logits, deltas, [(100, 100)])
    assert torch.allclose(p.boxes, moved)


def test_score_threshold():
    logits, deltas = rpn_outputs(SEPARATE, [[0.9, 0.6, 0.95, 0.71]])
    (p,) = proposals(SEPARATE, logits, deltas, [(100, 100)], score_threshold=0.7)
    assert torch.allclose(p.boxes, SEPARATE[[2, 0, 3]])
    assert torch.allclose(p.scores, torch.tensor([0.95, 0.9, 0.71]))


def test_clipping_to_each_images_own_size_and_min_size():
    anchors = torch.tensor([[-10.0, -10.0, 100.0, 100.0], [25.0, 0.0, 40.0, 10.0]])
    logits, deltas = rpn_outputs(anchors, [[0.9, 0.8], [0.9, 0.8]])
    p1, p2 = proposals(anchors, logits, deltas, [(20, 30), (40, 50)], min_size=6.0, nms_threshold=0.99)
    # Image 1 (H 20, W 30): the second box clips to 5 px wide, under min_size.
    assert p1.boxes.tolist() == [[0.0, 0.0, 30.0, 20.0]]
    assert p2.boxes.tolist() == [[0.0, 0.0, 50.0, 40.0], [25.0, 0.0, 40.0, 10.0]]


def test_post_nms_top_k_per_image():
    logits, deltas = rpn_outputs(SEPARATE, [[0.6, 0.9, 0.7, 0.8], [0.95, 0.55, 0.65, 0.75]])
    p1, p2 = proposals(SEPARATE, logits, deltas, [(100, 100)] * 2, post_nms_top_k=2)
    assert torch.allclose(p1.boxes, SEPARATE[[1, 3]])
    assert torch.allclose(p2.boxes, SEPARATE[[0, 3]])
    assert torch.allclose(p2.scores, torch.tensor([0.95, 0.75]))


def test_pre_nms_top_k_per_image():
    logits, deltas = rpn_outputs(SEPARATE, [[0.6, 0.9, 0.7, 0.8]])
    (p,) = proposals(SEPARATE, logits, deltas, [(100, 100)], pre_nms_top_k=2)
    assert torch.allclose(p.boxes, SEPARATE[[1, 3]])


def test_images_in_a_batch_get_their_own_proposals():
    logits, deltas = rpn_outputs(SEPARATE, [[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.9, 0.1], [0.1] * 4])
    p1, p2, p3 = proposals(SEPARATE, logits, deltas, [(100, 100)] * 3)
    assert p1.boxes.tolist() == [SEPARATE[0].tolist()]
    assert p2.boxes.tolist() == [SEPARATE[2].tolist()]
    assert p3.boxes.shape == (0, 4) and p3.scores.shape == (0,)
    # Identical boxes in different images are not suppressed against each other.
    logits, deltas = rpn_outputs(SEPARATE, [[0.9, 0.1, 0.1, 0.1]] * 2)
    p1, p2 = proposals(SEPARATE, logits, deltas, [(100, 100)] * 2)
    assert len(p1) == len(p2) == 1
