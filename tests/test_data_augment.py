"""Augmentations keep image and masks aligned, drop cut-away instances and are reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.data.augment import Augment, flip, random_window, resample_window, rot90


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def painted(height: int = 60, width: int = 80, boxes=((5, 20, 10, 30), (30, 55, 40, 75), (0, 8, 70, 80))):
    """Masks from (y0, y1, x0, x1) boxes and an image whose every channel is the instance id / 10."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for g, (y0, y1, x0, x1) in enumerate(boxes):
        masks[g, y0:y1, x0:x1] = True
    ids = (masks * torch.arange(1, len(boxes) + 1)[:, None, None]).amax(dim=0)
    image = (ids.float() / 10).expand(3, height, width).clone()
    return image, masks, torch.arange(1, len(boxes) + 1)


def assert_aligned(image, masks, labels):
    """Every mask pixel holds its instance's value and no pixel outside the masks does."""
    for mask, label in zip(masks, labels):
        assert torch.allclose(image[:, mask], torch.tensor(float(label) / 10))
    assert (image[:, ~masks.any(dim=0)] == 0).all()


@pytest.mark.parametrize("seed", range(8))
def test_geometric_augment_at_unit_scale_keeps_masks_on_their_pixels(seed):
    image, masks, labels = painted()
    augment = Augment(crop_size=48, scale_range=(1, 1), intensity=False)
    out_image, out_masks, out_labels = augment(image, masks, labels, generator(seed))
    assert out_image.shape == (3, 48, 48) and out_masks.shape[1:] == (48, 48)
    assert len(out_masks) == len(out_labels) >= 1  # the crop covers a pixel of some instance
    assert out_masks.flatten(1).any(dim=1).all()  # instances cut to nothing are gone
    assert_aligned(out_image, out_masks, out_labels)


@pytest.mark.parametrize("seed", range(4))
def test_scaled_image_still_matches_masks(seed):
    image, masks, labels = painted()
    augment = Augment(crop_size=(40, 56), scale_range=(0.6, 1.6), intensity=False)
    out_image, out_masks, out_labels = augment(image, masks, labels, generator(seed))
    assert out_image.shape == (3, 40, 56)  # non-square: quarter turns limited to 0/180
    for mask, label in zip(out_masks, out_labels):  # bilinear edges blur, nearest masks do not
        painted_region = (out_image[0] - label / 10).abs() < 0.05
        overlap = (painted_region & mask).sum() / (painted_region | mask).sum()
        assert overlap > 0.6


def test_resample_window_matches_interpolate_and_pads_outside():
    image = torch.rand(2, 23, 31, generator=generator(0))
    masks = torch.rand(4, 23, 31, generator=generator(1)) > 0.5
    labels = torch.arange(1, 5)
    scale = 1.3
    size = (round(23 * scale), round(31 * scale))
    expected = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    expected_masks = F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0].bool()
    out, out_masks, _ = resample_window(image, masks, labels, scale, -3, 5, (40, 40))
    assert size == (30, 40)  # window rows 3..32 show resized rows 0..29, columns 0..34 show 5..39
    assert torch.allclose(out[:, 3:33, :35], expected[:, :, 5:], atol=1e-5)
    assert torch.equal(out_masks[:, 3:33, :35], expected_masks[:, :, 5:])
    assert (out[:, :3] == 0).all() and (out[:, 33:] == 0).all() and (out[:, :, 35:] == 0).all()
    assert not out_masks[:, :3].any() and not out_masks[:, 33:].any() and not out_masks[:, :, 35:].any()


def test_small_image_is_padded_to_the_crop_size():
    image, masks, labels = painted(20, 30, boxes=((2, 6, 2, 6),))
    out_image, out_masks, out_labels = Augment(crop_size=64, scale_range=(1, 1), intensity=False)(
        image, masks, labels, generator(0))
    assert out_image.shape == (3, 64, 64) and out_masks.shape == (1, 64, 64)
    assert out_masks.sum() == masks.sum() and out_labels.tolist() == [1]
    assert (out_image > 0).sum() == 3 * 16  # only the instance is nonzero: the rest is padding
    assert_aligned(out_image, out_masks, out_labels)


def test_crops_prefer_windows_with_instances():
    image, masks, labels = painted(240, 240, boxes=((200, 206, 20, 26),))  # 1/1600 of the image
    augment = Augment(crop_size=32, intensity=False)
    assert all(len(augment(image, masks, labels, generator(s))[1]) == 1 for s in range(10))


def test_window_without_instances_is_uniform_and_empty_targets_work():
    masks = torch.zeros(0, 50, 50, dtype=torch.bool)
    starts = {random_window(masks, 1.0, (10, 10), generator(s)) for s in range(30)}
    assert len(starts) > 10 and all(0 <= top <= 40 and 0 <= left <= 40 for top, left in starts)
    out = Augment(crop_size=16)(torch.rand(1, 50, 50), masks, torch.zeros(0, dtype=torch.int64), generator(0))
    assert out[0].shape == (1, 16, 16) and out[1].shape == (0, 16, 16) and out[2].shape == (0,)


def test_same_generator_seed_gives_the_same_result():
    image, masks, labels = painted()
    augment = Augment(crop_size=32)
    first = augment(image, masks, labels, generator(3))
    second = augment(image, masks, labels, generator(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    others = [augment(image, masks, labels, generator(s))[0] for s in range(4, 8)]
    assert not all(torch.equal(first[0], other) for other in others)


def test_flip_and_rot90_move_pixels_as_expected():
    image = torch.arange(6.0).view(1, 2, 3)
    masks = image.bool()
    flipped, flipped_masks = flip(image, masks, horizontal=True, vertical=False)
    assert flipped[0].tolist() == [[2, 1, 0], [5, 4, 3]] and torch.equal(flipped_masks, flipped.bool())
    both, _ = flip(image, masks, horizontal=True, vertical=True)
    assert both[0].tolist() == [[5, 4, 3], [2, 1, 0]]
    turned, turned_masks = rot90(image, masks, 1)
    assert turned[0].tolist() == [[2, 5], [1, 4], [0, 3]] and torch.equal(turned_masks, turned.bool())


def test_intensity_jitter_stays_in_unit_range_and_changes_values():
    image = torch.rand(3, 20, 20, generator=generator(0))
    masks = torch.zeros(0, 20, 20, dtype=torch.bool)
    augment = Augment(scale_range=(1, 1), flips=False, rot90=False, brightness=0.3, contrast=0.5)
    outs = [augment(image, masks, masks.new_zeros(0, dtype=torch.int64), generator(s))[0] for s in range(5)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert not all(torch.allclose(o, image) for o in outs)
