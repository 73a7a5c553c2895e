"""MaskRCNN end to end on tiny images: losses in training, one InstanceResult per image in eval."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.config import Config
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.modeling.rcnn.detections import make_detections
from maskrcnn.structures import InstanceResult, Losses

import conftest

# CPU-fast: a narrow ResNet-18 model on 64 x 64 images.
TINY = conftest.tiny_config(rpn_train_pre_nms_top_k=300, rpn_train_post_nms_top_k=100,
                            rpn_test_pre_nms_top_k=300, rpn_test_post_nms_top_k=100)
# Thresholds at zero so that even an untrained model sends boxes through every stage.
OPEN = dict(conftest.OPEN, rpn_train_nms_pre_score_threshold=0.0, rcnn_test_max_detections=20)


def make_model(**changes) -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(Config(**{**TINY, **changes}))


def two_images(channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(channels, 64, 64, generator=g), torch.rand(channels, 48, 40, generator=g)]


def assert_losses(losses: Losses) -> None:
    assert isinstance(losses, Losses)
    for name, value in losses.as_floats().items():
        assert getattr(losses, name).dim() == 0, name
        assert value == value and abs(value) < float("inf"), name
    assert torch.isfinite(losses.total)


@pytest.mark.parametrize("changes", [OPEN, {}], ids=["with-proposals", "default-thresholds"])
def test_training_losses_on_images_of_different_sizes(changes, squares):
    model = make_model(**changes).train()
    targets = [squares(64, 64, [(8, 8, 16), (36, 30, 20)]), squares(48, 40, [])]
    out = model(two_images(), targets)
    assert out.results is None
    assert_losses(out.losses)
    assert out.losses.rcnn_cls > 0 and out.losses.mask > 0
    out.losses.total.backward()
    for head in (model.rpn, model.rcnn, model.mask, model.backbone.fpn):
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_training_batch_without_instances(squares):
    model = make_model(**OPEN).train()
    out = model(two_images(), [squares(64, 64, []), squares(48, 40, [])])
    assert_losses(out.losses)
    assert out.losses.rcnn_reg.item() == 0.0 and out.losses.mask.item() == 0.0
    out.losses.total.backward()
    assert all(p.grad is not None for p in model.mask.parameters())


def test_eval_gives_one_result_per_image_at_its_own_size():
    model = make_model(**OPEN).eval()
    out = model(two_images())
    assert out.losses is None and len(out.results) == 2
    for result, size in zip(out.results, [(64, 64), (48, 40)]):
        assert isinstance(result, InstanceResult)
        assert result.label_image.shape == size and result.label_image.dtype == torch.int32
        k = len(result)
        assert result.boxes.shape == (k, 4) and result.scores.shape == (k,) and result.labels.shape == (k,)
        assert result.mask_probs.shape == (k, 28, 28)
        assert torch.all(result.scores[:-1] >= result.scores[1:])
        assert (result.boxes[:, 2] <= size[1]).all() and (result.boxes[:, 3] <= size[0]).all()
        # Ids run 1..K without gaps.
        assert set(result.label_image.unique().tolist()) - {0} == set(range(1, k + 1))
    assert len(out.results[0]) > 0


def test_eval_of_a_batch_equals_eval_of_each_image():
    model = make_model(**OPEN).eval()
    images = two_images()
    together = model(images).results
    for image, result in zip(images, together):
        (alone,) = model([image]).results   # both pad to 64 x 64, so the features are the same
        assert torch.equal(alone.label_image, result.label_image)
        assert torch.allclose(alone.boxes, result.boxes, atol=1e-4)


def test_grayscale_model_on_one_channel_input(squares):
    model = make_model(in_channels=1, pixel_mean=[0.5], pixel_std=[0.25], **OPEN)
    images = two_images(channels=1)
    model.train()
    out = model(images, [squares(64, 64, [(10, 10, 12)]), squares(48, 40, [(5, 20, 10)])])
    assert_losses(out.losses)
    out.losses.total.backward()
    model.eval()
    results = model(torch.rand(2, 1, 64, 64)).results
    assert [r.label_image.shape for r in results] == [(64, 64), (64, 64)]
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("changes", [OPEN, {}], ids=["open", "default-thresholds"])
def test_image_without_instances_predicts(changes):
    model = make_model(**changes).eval()
    (result,) = model(torch.zeros(3, 40, 50)).results
    assert result.label_image.shape == (40, 50)
    assert len(result) == int(result.label_image.max())


def test_training_needs_one_target_per_image(squares):
    model = make_model().train()
    with pytest.raises(ValueError, match="one Target per image"):
        model(two_images())
    with pytest.raises(ValueError, match="one Target per image"):
        model(two_images(), [squares(64, 64, [])])


def test_each_stage_owns_its_head_and_checkpoints_of_the_earlier_layout_still_load(tmp_path):
    """Weights live under their stage (rpn.head.*, rcnn.head.*, mask.head.*); a checkpoint written
    before the heads moved into the stages (rpn.convs.0.weight, ...) loads with the same values."""
    from maskrcnn.modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    model = make_model()
    state = model.state_dict()
    for stage in ("rpn", "rcnn", "mask"):
        names = [n for n in state if n.startswith(stage + ".")]
        assert names and all(n.startswith(stage + ".head.") for n in names), stage
    old = {n.replace(".head.", ".", 1) if n.split(".")[0] in ("rpn", "rcnn", "mask") else n: v
           for n, v in state.items()}
    assert "rpn.convs.0.weight" in old and "backbone.fpn.inner_blocks.0.0.weight" in old
    save_checkpoint(tmp_path / "old.pt", Checkpoint(config=model.cfg, model_state=old, normalizer={}))
    loaded = make_model()
    loaded.load_state_dict(load_checkpoint(tmp_path / "old.pt").model_state)
    assert all(torch.equal(v, loaded.state_dict()[n]) for n, v in state.items())


def test_eval_and_detect_agree_and_sizes_come_back_per_image():
    """forward in eval = prepare + detect (the traced path) + per-image post-processing."""
    model = make_model(**OPEN).eval()
    images = two_images()
    batch, sizes = model.prepare(images)
    assert batch.shape == (2, 3, 64, 64) and sizes.tolist() == [[64, 64], [48, 40]]
    raw = model.detect(batch, sizes)
    results = model(images).results
    assert all(len(d) > 0 for d in raw.detections.per_image(2))
    assert raw.mask_probs.shape == (len(raw.detections), 28, 28)
    assert bool((raw.detections.image[1:] >= raw.detections.image[:-1]).all())  # grouped by image
    want = model.mask.results(raw.detections, raw.mask_probs, [(64, 64), (48, 40)])
    assert [r.label_image.shape for r in results] == [(64, 64), (48, 40)]
    for got, expected in zip(results, want):
        assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.label_image, expected.label_image)


def test_heads_on_level_ordered_crops_give_each_box_its_own_outputs():
    """The RCNN and mask heads run on RoIAlign's crops in level order and put their outputs in the
    boxes' order: the same as each head on the crops in the boxes' order."""
    model = make_model(**OPEN).eval()
    batch, sizes = model.prepare(two_images())
    with torch.inference_mode():
        features = model.backbone(batch)
        proposals, _ = model.rpn(features, sizes)
        detections, _ = model.rcnn(features, sizes, proposals)
        probs, _ = model.mask(features, sizes, detections)
        logits, deltas = model.rcnn.head(model.rcnn.crop.crop(features, proposals.boxes, proposals.image))
        mask_logits = model.mask.head(model.mask.crop.crop(features, detections.boxes, detections.image))
    for crop, boxes in ((model.rcnn.crop, proposals), (model.mask.crop, detections)):
        order = crop.crop_level_order(features, boxes.boxes, boxes.image)[1]
        assert not torch.equal(order, torch.arange(len(order)))  # the level order differs from the boxes'
    expected = make_detections(proposals, logits, deltas, sizes, model.cfg.rcnn_box_weights, model.rcnn.test_nms)
    torch.testing.assert_close(detections.boxes, expected.boxes, rtol=1e-5, atol=1e-4)
    assert torch.equal(detections.labels, expected.labels)
    own = mask_logits[torch.arange(len(detections)), detections.labels]
    torch.testing.assert_close(probs, torch.sigmoid(own), rtol=1e-5, atol=1e-6)


def test_padding_is_black_like_the_training_crops_beyond_an_edge():
    """The pixels padded up to a multiple of 32 read as a black (0) pixel does after normalising,
    the fill of training crops past an image's edge; not as the mean intensity (0 after it)."""
    model = make_model(pixel_mean=[0.25, 0.25, 0.25], pixel_std=[0.5, 0.5, 0.5])
    batch, _ = model.prepare([torch.full((3, 50, 40), 0.8)])
    assert batch.shape == (1, 3, 64, 64)
    assert torch.allclose(batch[0, :, :50, :40], torch.tensor((0.8 - 0.25) / 0.5))
    black = torch.tensor((0.0 - 0.25) / 0.5)
    assert torch.allclose(batch[0, :, 50:], black) and torch.allclose(batch[0, :, :, 40:], black)


@pytest.mark.parametrize("backbone", ["resnet18", "se_resnext50"])
def test_for_inference_folds_every_batchnorm_and_keeps_the_results(backbone):
    """BatchNorm folded into the convs (stem, blocks, downsample paths, mask head) and channels_last
    weights: no BatchNorm left, features equal to float rounding, the same instances."""
    import copy

    from maskrcnn.modeling.model import for_inference
    from maskrcnn.modeling.norm import fold_batchnorm

    model = make_model(**OPEN, backbone=backbone).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial statistics, so that folding has work to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.weight.data.uniform_(0.5, 1.5, generator=g)
            module.bias.data.uniform_(-0.2, 0.2, generator=g)
    fast = for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = two_images()
    with torch.no_grad():
        want, got = model.backbone(model.prepare(images)[0]), fast.backbone(fast.prepare(images)[0])
        for w, f in zip(want, got):
            torch.testing.assert_close(f, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
        a, b = model.detect(*model.prepare(images)), fast.detect(*fast.prepare(images))
    torch.testing.assert_close(b.detections.scores, a.detections.scores, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.detections.boxes, a.detections.boxes, rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="eval-mode"):  # training BatchNorm uses batch statistics
        fold_batchnorm(make_model().train())
