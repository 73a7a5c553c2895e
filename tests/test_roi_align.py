"""Multi-level RoIAlign: level choice by box size, input order, exact crops of known maps."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.modeling.roi_align import MultiLevelRoiAlign, assign_levels

BASE_SIZES = [8.0, 16.0, 32.0, 64.0]
STRIDES = [4, 8, 16, 32]


def test_levels_by_nearest_base_size():
    boxes = torch.tensor([
        [0.0, 0.0, 8.0, 8.0],       # sqrt(wh) 8
        [10.0, 10.0, 18.0, 42.0],   # 16
        [0.0, 0.0, 32.0, 32.0],     # 32
        [0.0, 0.0, 64.0, 64.0],     # 64
        [0.0, 0.0, 9.0, 9.0],       # 9: nearer 8
        [0.0, 0.0, 25.0, 25.0],     # 25: nearer 32 than 16
        [0.0, 0.0, 200.0, 200.0],   # beyond the largest
        [0.0, 0.0, 2.0, 2.0],       # below the smallest
        [5.0, 5.0, 5.0, 5.0],       # empty
    ])
    assert assign_levels(boxes, torch.tensor(BASE_SIZES)).tolist() == [0, 1, 2, 3, 0, 2, 3, 0, 0]


def level_features(batch: int, channels: int = 2, image: int = 128) -> list[torch.Tensor]:
    """Constant maps: value 10 * image + level + 1 (channel c adds 100 c)."""
    out = []
    for level, stride in enumerate(STRIDES):
        size = image // stride
        values = (10.0 * torch.arange(batch)[:, None] + level + 1 + 100.0 * torch.arange(channels)[None])
        out.append(values[:, :, None, None].expand(-1, -1, size, size).contiguous())
    return out


def test_crops_come_back_in_input_order_from_their_own_image_and_level():
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=3)
    features = level_features(batch=2)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 16.0, 16.0], [30.0, 30.0, 62.0, 62.0]]),
             torch.tensor([[40.0, 40.0, 56.0, 56.0], [4.0, 4.0, 12.0, 12.0]])]
    out = crop(features, boxes)
    assert out.shape == (5, 2, 3, 3)
    expected = torch.tensor([4.0, 1.0, 3.0, 12.0, 11.0])  # image 1 adds 10; level l adds l + 1
    assert torch.allclose(out[:, 0], expected[:, None, None].expand(-1, 3, 3))
    assert torch.allclose(out[:, 1], expected[:, None, None].expand(-1, 3, 3) + 100)


def test_level_order_crops_are_the_crops_reordered():
    """crop_level_order: the same crops level by level, and ``order`` names each one's box."""
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=3)
    features = level_features(batch=2)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 16.0, 16.0], [30.0, 30.0, 62.0, 62.0],
                          [40.0, 40.0, 56.0, 56.0], [4.0, 4.0, 12.0, 12.0]])
    image = torch.tensor([0, 0, 0, 1, 1])
    crops, order = crop.crop_level_order(features, boxes, image)
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    levels = assign_levels(boxes, torch.tensor(BASE_SIZES))[order]
    assert bool((levels[1:] >= levels[:-1]).all())  # level by level
    assert torch.equal(crops[torch.argsort(order)], crop.crop(features, boxes, image))
    assert torch.equal(crops, crop.crop(features, boxes, image)[order])


def test_crop_of_a_constant_map_is_the_constant():
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=7)
    features = [torch.full((1, 4, 128 // s, 128 // s), 3.5) for s in STRIDES]
    boxes = [torch.tensor([[3.0, 5.0, 13.0, 11.0], [20.0, 17.5, 50.0, 60.0], [0.0, 0.0, 120.0, 120.0]])]
    out = crop(features, boxes)
    assert out.shape == (3, 4, 7, 7)
    assert torch.allclose(out, torch.full_like(out, 3.5))


def test_feature_pixel_x_is_centred_at_x_times_stride():
    # p2 (stride 4) holds its column index, so a crop reads the feature x of its sample points.
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    features = [ramp] + [torch.zeros(1, 1, 128 // s, 128 // s) for s in STRIDES[1:]]
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=2)
    out = crop(features, [torch.tensor([[8.0, 8.0, 16.0, 16.0]])])   # level 0 (size 8): feature x 2..4
    # Two bins, [2, 3] and [3, 4]; linear interpolation of a ramp gives their centres.
    assert torch.allclose(out[0, 0], torch.tensor([[2.5, 3.5], [2.5, 3.5]]))


def test_images_without_boxes():
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=2)
    features = level_features(batch=2)
    out = crop(features, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 8.0, 8.0]])])
    assert torch.allclose(out[:, 0], torch.full((1, 2, 2), 11.0))
    assert crop(features, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 2, 2, 2)


def _many_boxes(count: int, image: int = 256, seed: int = 0) -> torch.Tensor:
    """(count, 4) boxes of every size, so every level gets some."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * image * 0.7
    wh = torch.rand(count, 2, generator=g) ** 2 * image * 0.5 + 2
    return torch.cat([xy, (xy + wh).clamp(max=image)], dim=1)


def _random_features(batch: int, channels: int = 8, image: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, image // s, image // s, generator=g) for s in STRIDES]


def _serial(crop: MultiLevelRoiAlign, features, boxes, image, monkeypatch) -> torch.Tensor:
    import maskrcnn.modeling.roi_align as module
    with monkeypatch.context() as m:
        m.setattr(module, "_crop_threads", lambda feature, count: 1)
        return crop.crop(features, boxes, image)


@pytest.fixture
def two_threads():
    """The threaded path needs >= 2 intra-op threads, whatever this machine's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threaded_crops_equal_one_call_per_level_at_every_level(monkeypatch, two_threads):
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=7)
    features, boxes = _random_features(batch=2), _many_boxes(600)
    image = torch.arange(600) % 2
    assert set(assign_levels(boxes, torch.tensor(BASE_SIZES)).tolist()) == {0, 1, 2, 3}
    threaded = crop.crop(features, boxes, image)
    assert torch.equal(threaded, _serial(crop, features, boxes, image, monkeypatch))
    # and equal to torchvision's kernel box by box (the level choice as the spec's)
    from torchvision.ops import roi_align
    levels = assign_levels(boxes, torch.tensor(BASE_SIZES))
    for i in (0, 7, 123, 599):
        ref = roi_align(features[levels[i]], torch.cat([image[i:i + 1, None].float(), boxes[i:i + 1]], 1), 7,
                        spatial_scale=1.0 / STRIDES[levels[i]], sampling_ratio=2, aligned=False)
        assert torch.allclose(threaded[i:i + 1], ref, atol=1e-6)


def test_threaded_crops_keep_the_callers_modes(monkeypatch, two_threads):
    crop = MultiLevelRoiAlign(BASE_SIZES, STRIDES, output_size=5)
    features, boxes, image = _random_features(batch=1), _many_boxes(300), torch.zeros(300, dtype=torch.int64)
    with torch.inference_mode():
        out = crop.crop(features, boxes, image)
    assert out.is_inference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = crop.crop([f.bfloat16() for f in features], boxes, image)
        serial = _serial(crop, [f.bfloat16() for f in features], boxes, image, monkeypatch)
    assert mixed.dtype == serial.dtype and torch.equal(mixed, serial)
    # training keeps the single call: the same gradients to the last bit
    leaves = [f.clone().requires_grad_() for f in features]
    crop.crop(leaves, boxes, image).square().sum().backward()
    grads = [f.grad.clone() for f in leaves]
    for f in leaves:
        f.grad = None
    _serial(crop, leaves, boxes, image, monkeypatch).square().sum().backward()
    for trained, one in zip(grads, (f.grad for f in leaves)):
        assert torch.equal(trained, one)


def test_only_inference_crops_run_threaded(two_threads):
    import maskrcnn.modeling.roi_align as module

    feature = torch.zeros(1, 4, 8, 8)
    assert module._crop_threads(feature, 1000) == 2
    assert module._crop_threads(feature, 40) == 1  # too few boxes to share
    with torch.no_grad():
        assert module._crop_threads(feature.requires_grad_(), 1000) == 2
    assert module._crop_threads(feature, 1000) == 1  # gradients flow
