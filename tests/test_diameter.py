"""maskrcnn.prediction.diameter: --diameter auto, each image's nucleus diameter from its objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.prediction.diameter import (OBJECT_CALIBRATION, SCALE_LIMITS, TOLERANCE, AutoScale,
                                          object_diameter, otsu_threshold)


def blurred_discs(diameter: float, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(H, W) image in [0, 1] of a 4 x 4 grid of discs of ``diameter`` px, of random brightness,
    blurred in proportion to their size (as a microscope's optics would), with a little noise."""
    rng = np.random.default_rng(seed)
    size = int(diameter * 8)
    yy, xx = np.mgrid[:size, :size] + 0.5
    picture = np.zeros((size, size), np.float32)
    centres = np.arange(diameter, size - diameter, diameter * 1.6)
    for cy in centres:
        for cx in centres:
            cy2, cx2 = cy + rng.uniform(-0.2, 0.2) * diameter, cx + rng.uniform(-0.2, 0.2) * diameter
            picture[(yy - cy2) ** 2 + (xx - cx2) ** 2 <= (diameter / 2) ** 2] = rng.uniform(0.5, 1.0)
    sigma = max(0.5, diameter / 15)
    k = int(3 * sigma) * 2 + 1
    taps = torch.exp(-(torch.arange(k) - k // 2) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    image = torch.from_numpy(picture)[None, None]
    image = F.conv2d(F.conv2d(image, taps.view(1, 1, 1, k), padding=(0, k // 2)), taps.view(1, 1, k, 1),
                     padding=(k // 2, 0))
    noise = 0.03 * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
    return (image + noise)[0, 0].clamp(0, 1), len(centres) ** 2


@pytest.mark.parametrize("diameter", [10, 20, 40, 80])
def test_the_estimate_follows_the_size_of_the_objects(diameter):
    """Blurred discs of known size: every disc found, and the estimate is the disc's diameter over
    the calibration (threshold objects of real images are that much smaller than their outlines),
    the same at every size."""
    image, count = blurred_discs(diameter)
    found, objects = object_diameter(image)
    assert objects == count
    assert found * OBJECT_CALIBRATION == pytest.approx(diameter, rel=0.03)


def test_autoscale_brings_the_nuclei_to_the_trained_size():
    small, _ = blurred_discs(10)
    large, _ = blurred_discs(40)
    auto = AutoScale(trained_diameter=20.0)
    s_small, s_large = auto.choose(small[None]), auto.choose(large[None])
    assert s_small.source == s_large.source == "objects"
    assert s_small.scale * 10 == pytest.approx(20 * OBJECT_CALIBRATION, rel=0.03)  # 10 px nuclei grow ~2x
    assert s_large.scale * 40 == pytest.approx(20 * OBJECT_CALIBRATION, rel=0.03)  # 40 px ones shrink ~2x
    assert s_small.to_dict() == {"scale": round(s_small.scale, 4), "diameter": round(s_small.diameter, 2),
                                 "diameter_from": "objects"}


def test_nuclei_near_the_trained_size_are_not_resampled():
    image, _ = blurred_discs(20)
    found = object_diameter(image)[0]
    near = AutoScale(trained_diameter=found * 0.9).choose(image[None])
    assert (near.scale, near.source) == (1.0, "objects") and near.diameter == pytest.approx(found)
    beyond = AutoScale(trained_diameter=found / (TOLERANCE * 1.05)).choose(image[None])
    assert beyond.scale == pytest.approx(1 / (TOLERANCE * 1.05))


def test_dark_nuclei_on_a_light_background():
    image, count = blurred_discs(20)
    bright = object_diameter(image)
    dark = object_diameter(1.0 - image, bright=False)
    assert dark[1] == count and dark[0] == pytest.approx(bright[0], rel=0.02)
    gaps = object_diameter(1.0 - image)  # read as bright objects: the gaps between the discs, one object
    assert gaps is None or gaps[1] < count


def test_an_image_without_objects_is_not_resized():
    flat = AutoScale(20.0).choose(torch.full((1, 64, 64), 0.2))
    assert (flat.scale, flat.diameter, flat.source) == (1.0, None, "none")
    two = torch.zeros(1, 64, 64)
    two[0, 10:20, 10:20] = two[0, 40:50, 40:50] = 1.0  # fewer than MIN_OBJECTS
    assert AutoScale(20.0).choose(two).source == "none"


def test_the_scale_stays_within_its_limits():
    tiny = torch.zeros(1, 64, 64)
    tiny[0, 4::8, 4::8] = 1.0  # dots of one pixel, below the minimum area: nothing
    assert AutoScale(20.0).choose(tiny).source == "none"
    huge, _ = blurred_discs(80)
    assert AutoScale(2.0).choose(huge[None]).scale == SCALE_LIMITS[0]


def test_objects_cut_by_the_border_are_left_out():
    image, count = blurred_discs(20)
    shifted = image[20:, 20:]  # the first row and column of discs are cut by the border
    found, objects = object_diameter(shifted)
    assert objects == count - 7
    assert found * OBJECT_CALIBRATION == pytest.approx(20, rel=0.03)


def test_otsu_splits_two_populations():
    values = torch.cat([torch.full((300,), 0.2), torch.full((100,), 0.8)])
    assert 0.2 < otsu_threshold(values) < 0.8
