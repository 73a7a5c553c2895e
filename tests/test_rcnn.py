"""RCNN: sampled targets (batch size 2 included), head, loss and detections."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.modeling.boxes import rcnn_decode, rcnn_encode
from maskrcnn.config import Config, NmsSettings
from maskrcnn.modeling.mask.targets import make_mask_targets
from maskrcnn.modeling.rcnn.detections import make_detections
from maskrcnn.modeling.rcnn.head import RcnnHead
from maskrcnn.modeling.rcnn.loss import rcnn_loss
from maskrcnn.modeling.rcnn.targets import RcnnTargets, make_rcnn_targets
from maskrcnn.structures import BatchDetections, Proposals, Target


def box_target(boxes: list[list[float]], labels: list[int], size: int = 160) -> Target:
    """A Target whose masks fill its (integer) boxes."""
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, int(y0):int(y1), int(x0):int(x1)] = True
    return Target(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long),
                  masks)


def props(boxes: list[list[float]]) -> Proposals:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Proposals(b, torch.linspace(0.9, 0.5, b.shape[0]))


def rows(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in t.tolist()}


@pytest.fixture
def cfg() -> Config:
    torch.manual_seed(0)
    return Config(num_classes=3, class_names=["bg", "a", "b"], rcnn_train_batch_size=8,
                  rcnn_train_fg_fraction=0.5, mask_train_batch_size=6)


# --- targets --------------------------------------------------------------------------------------
def test_truth_boxes_are_candidates(cfg):
    target = box_target([[10, 10, 30, 30]], [2])
    t = make_rcnn_targets([props([])], [target], cfg)
    # No proposal at all: only the truth box, repeated to fill the batch; no background exists.
    assert t.proposals[0].shape == (8, 4)
    assert rows(t.proposals[0]) == {(10.0, 10.0, 30.0, 30.0)}
    assert t.labels.tolist() == [2] * 8
    assert torch.equal(t.deltas, torch.zeros(8, 4))


def test_background_labels_are_zero_and_have_no_box(cfg):
    target = box_target([[10, 10, 30, 30]], [1])
    far = [[60, 60, 80, 80], [100, 0, 120, 20]]
    t = make_rcnn_targets([props([[10, 10, 30, 28]] + far)], [target], cfg)
    assert t.proposals[0].shape == (8, 4)
    fg = t.labels > 0
    assert fg.sum() == 2                                   # the close proposal and the truth box
    assert rows(t.proposals[0][fg]) == {(10.0, 10.0, 30.0, 28.0), (10.0, 10.0, 30.0, 30.0)}
    assert rows(t.proposals[0][~fg]) <= rows(torch.tensor(far, dtype=torch.float32))
    assert torch.equal(t.deltas[~fg], torch.zeros(6, 4))
    # Foreground first, then background.
    assert t.labels.tolist() == [1, 1] + [0] * 6


def test_background_iou_band(cfg):
    target = box_target([[10, 10, 30, 30]], [1])
    proposals = props([[10, 10, 30, 15], [60, 60, 80, 80]])   # IoU 0.25 and 0
    t = make_rcnn_targets([proposals], [target], cfg.replace(rcnn_train_bg_thresh_low=0.1))
    assert rows(t.proposals[0][t.labels == 0]) == {(10.0, 10.0, 30.0, 15.0)}


def test_regression_targets_decode_back_to_the_truth(cfg):
    target = box_target([[10, 10, 30, 30], [60, 50, 100, 70]], [1, 2])
    g = torch.Generator().manual_seed(0)
    jitter = lambda box: (torch.tensor(box) + torch.randn(6, 4, generator=g)).tolist()
    proposals = props(jitter([10, 10, 30, 30]) + jitter([60, 50, 100, 70]) + [[120, 120, 150, 150]])
    t = make_rcnn_targets([proposals], [target], cfg.replace(rcnn_train_batch_size=16))
    fg = t.labels > 0
    assert fg.sum() == 8
    decoded = rcnn_decode(t.proposals[0][fg], t.deltas[fg], cfg.rcnn_box_weights)
    for box, label in zip(decoded, t.labels[fg]):
        assert torch.allclose(box, target.boxes[label - 1], atol=1e-4)


def test_image_without_instances_gives_background_only(cfg):
    empty = box_target([], [])
    t = make_rcnn_targets([props([[0, 0, 20, 20], [30, 30, 60, 60]])], [empty], cfg)
    assert t.labels.tolist() == [0] * 8 and torch.equal(t.deltas, torch.zeros(8, 4))
    t = make_rcnn_targets([props([])], [empty], cfg)
    assert t.proposals[0].shape == (0, 4) and t.labels.numel() == 0 and t.deltas.shape == (0, 4)


def two_image_batch():
    """Two images whose proposals and truth boxes live in disjoint regions of the image."""
    truth = [box_target([[10, 10, 40, 40]], [1]), box_target([[100, 100, 140, 140]], [2])]
    own = [props([[11, 10, 40, 41], [10, 12, 39, 40], [12, 11, 41, 40], [0, 100, 30, 130]]),
           props([[101, 100, 140, 139], [100, 102, 141, 140], [99, 101, 140, 140], [100, 0, 130, 30]])]
    return own, truth


def test_batch_of_two_samples_each_image_from_its_own_proposals(cfg):
    own, truth = two_image_batch()
    t = make_rcnn_targets(own, truth, cfg)
    assert [p.shape[0] for p in t.proposals] == [8, 8] and t.labels.shape == (16,)
    for i in range(2):
        sampled = rows(t.proposals[i])
        mine = rows(own[i].boxes) | rows(truth[i].boxes)
        others = rows(own[1 - i].boxes) | rows(truth[1 - i].boxes)
        assert sampled <= mine and not sampled & others
        # The RPN's own proposals reach the head, not just the truth box.
        assert len(sampled & rows(own[i].boxes)) >= 3
    assert set(t.labels[:8].tolist()) == {0, 1} and set(t.labels[8:].tolist()) == {0, 2}
    # Each image's regression targets point at its own truth.
    fg = t.labels > 0
    boxes = torch.cat(t.proposals)
    decoded = rcnn_decode(boxes[fg], t.deltas[fg], cfg.rcnn_box_weights)
    expected = torch.where((t.labels[fg] == 1)[:, None], truth[0].boxes, truth[1].boxes)
    assert torch.allclose(decoded, expected, atol=1e-4)


def test_batch_of_two_mask_targets_come_from_each_images_own_proposals(cfg):
    own, truth = two_image_batch()
    t = make_mask_targets(own, truth, cfg)
    assert [p.shape[0] for p in t.proposals] == [6, 6]
    for i in range(2):
        sampled = rows(t.proposals[i])
        assert sampled <= rows(own[i].boxes) | rows(truth[i].boxes)
        assert not sampled & (rows(own[1 - i].boxes) | rows(truth[1 - i].boxes))
        assert sampled & rows(own[i].boxes)
    assert t.labels.tolist() == [1] * 6 + [2] * 6
    assert t.masks.shape == (12, cfg.mask_size, cfg.mask_size)


# --- head and loss --------------------------------------------------------------------------------
def test_head_shapes(cfg):
    head = RcnnHead(cfg.replace(rcnn_fc_channels=16), in_channels=4)
    logits, deltas = head(torch.randn(5, 4, cfg.rcnn_crop_size, cfg.rcnn_crop_size))
    assert logits.shape == (5, 3) and deltas.shape == (5, 3, 4)


def test_loss_uses_the_true_class_deltas_of_foregrounds_only(cfg):
    target = box_target([[10, 10, 30, 30]], [2])
    t = make_rcnn_targets([props([[12, 10, 30, 32], [60, 60, 80, 80]])], [target], cfg)
    logits = torch.where(torch.arange(3)[None] == t.labels[:, None], 30.0, 0.0).requires_grad_()
    deltas = torch.full((8, 3, 4), 9.0)
    deltas[torch.arange(8), t.labels] = t.deltas
    deltas[t.labels == 0] = 9.0            # background deltas are free
    deltas.requires_grad_()
    cls, reg = rcnn_loss(logits, deltas, t)
    assert cls.item() == pytest.approx(0.0, abs=1e-10)
    assert reg.item() == 0.0
    (cls + reg).backward()


def test_loss_known_value(cfg):
    target = box_target([[10, 10, 30, 30]], [1])
    t = make_rcnn_targets([props([[60, 60, 80, 80]])], [target], cfg.replace(rcnn_train_batch_size=2))
    assert t.labels.tolist() == [1, 0]
    logits = torch.zeros(2, 3)             # uniform: log 3 per box
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 1, 0] = 2.0                  # smooth-L1 (sigma 1) of 2 is 1.5; one foreground
    cls, reg = rcnn_loss(logits, deltas, t)
    assert cls.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert reg.item() == pytest.approx(1.5)


def test_loss_without_samples_is_a_connected_zero():
    logits = torch.zeros(0, 3, requires_grad=True)
    deltas = torch.zeros(0, 3, 4, requires_grad=True)
    cls, reg = rcnn_loss(logits, deltas, RcnnTargets([torch.zeros(0, 4)], torch.zeros(0, dtype=torch.long),
                                                     torch.zeros(0, 4)))
    assert cls.item() == 0.0 and reg.item() == 0.0
    (cls + reg).backward()
    assert logits.grad is not None


# --- detections -----------------------------------------------------------------------------------
def detect(proposals, logits, deltas, sizes, **changes):
    options = dict(box_weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.3, nms_threshold=0.5, min_size=1.0,
                   max_detections=100)
    options.update(changes)
    settings = NmsSettings(options["score_threshold"], options["nms_threshold"], options["min_size"],
                           options["max_detections"])
    image = torch.cat([torch.full((len(p),), i) for i, p in enumerate(proposals)]).long()
    flat = BatchDetections(torch.cat(proposals), torch.ones(len(image)), torch.ones_like(image), image)
    return make_detections(flat, logits, deltas, torch.tensor(sizes), options["box_weights"],
                           settings).per_image(len(sizes))


def test_detections_per_image_class_and_nms():
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0], [40.0, 40.0, 60.0, 60.0]]),
                 torch.tensor([[-10.0, 0.0, 100.0, 100.0]])]
    logits = torch.tensor([[0.0, 10.0, 0.0],     # class 1
                           [0.0, 9.0, 0.0],      # a duplicate of it: suppressed
                           [0.0, 0.0, 8.0],      # class 2
                           [0.0, 5.0, 5.0]])     # both classes at 0.497: two detections, same box
    deltas = torch.zeros(4, 3, 4)
    d1, d2 = detect(proposals, logits, deltas, [(64, 64), (40, 50)])
    assert torch.allclose(d1.boxes, proposals[0][[0, 2]])
    assert d1.labels.tolist() == [1, 2]
    assert torch.allclose(d1.scores, logits[[0, 2]].softmax(1).amax(1))
    # Image 2 is clipped to its own size (H 40, W 50); one detection per class.
    assert d2.boxes.tolist() == [[0.0, 0.0, 50.0, 40.0]] * 2
    assert sorted(d2.labels.tolist()) == [1, 2]


def test_detections_use_their_class_deltas_and_respect_the_limits():
    proposal = torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0], [90.0, 10.0, 110.0, 30.0]])
    logits = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 9.0], [0.0, 0.0, 1.0]])
    deltas = torch.zeros(3, 3, 4)
    moved = torch.tensor([[15.0, 10.0, 35.0, 30.0]])
    deltas[0, 2] = rcnn_encode(proposal[:1], moved, (10.0, 10.0, 5.0, 5.0))[0]
    deltas[0, 1] = 50.0                             # another class's deltas do not matter
    (d,) = detect([proposal], logits, deltas, [(128, 128)], max_detections=1)
    assert len(d) == 1 and torch.allclose(d.boxes, moved) and d.labels.tolist() == [2]
    (d,) = detect([proposal], logits, deltas, [(128, 128)], score_threshold=0.2)
    assert d.labels.tolist() == [2, 2, 2, 1]         # the third: 0.58 for class 2, 0.21 for class 1
    (d,) = detect([proposal], logits, deltas, [(128, 128)], score_threshold=0.6)
    assert len(d) == 2 and (d.scores > 0.6).all()
    (d,) = detect([proposal], logits, deltas, [(128, 128)], min_size=25.0)
    assert len(d) == 0


def test_detections_without_proposals():
    d1, d2 = detect([torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 10.0, 10.0]])],
                    torch.tensor([[0.0, 5.0, 0.0]]), torch.zeros(1, 3, 4), [(32, 32), (32, 32)])
    assert len(d1) == 0 and d1.boxes.shape == (0, 4)
    assert len(d2) == 1


def test_foreground_sample_reaches_a_small_instance_beside_a_large_one(cfg):
    # 40 proposals jittered around a large nucleus, one on a small nucleus: drawing 4 foregrounds
    # per proposal would almost never include the small one; per instance, about half the time.
    large, small = [20.0, 20.0, 80.0, 80.0], [100.0, 100.0, 108.0, 108.0]
    target = box_target([large, small], [1, 1])
    jitter = [[20 + d, 20 - d, 80 + d, 80 - d] for d in torch.linspace(-3, 3, 40).tolist()]
    proposals = [props(jitter + [[100.5, 100.0, 108.5, 108.0]])]

    def small_share(per_instance: bool) -> float:
        cfg.train_sample_per_instance = per_instance
        hits = 0
        for seed in range(100):
            t = make_rcnn_targets(proposals, [target], cfg, [torch.Generator().manual_seed(seed)])
            hits += int((t.proposals[0][t.labels > 0][:, 0] >= 100).sum())
        return hits / (100 * 4)

    assert small_share(True) > 0.3
    assert small_share(False) < 0.15
