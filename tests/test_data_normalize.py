"""Normalizer: shapes, ranges, channel handling, bad pixels and checkpoint round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from maskrcnn.config import ConfigError
from maskrcnn.data.io import read_image
from maskrcnn.data.normalize import Normalizer

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("image", [
    RNG.integers(0, 256, (20, 30), dtype=np.uint8),
    RNG.integers(100, 4000, (20, 30), dtype=np.uint16),
    RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8),
    RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8),
    RNG.normal(5, 2, (20, 30)).astype(np.float32),
], ids=["gray8", "gray16", "rgb", "rgba", "float"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_dtype_and_range(image, channels):
    out = Normalizer(channels=channels)(image)
    assert out.shape == (channels, 20, 30) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.max() - out.min() > 0.5  # the range is used, not squashed


def test_16bit_and_8bit_versions_of_an_image_normalise_alike():
    base = RNG.random((32, 32))
    eight = Normalizer(channels=1)((base * 255).astype(np.uint8))
    sixteen = Normalizer(channels=1)((base * 4095 + 200).astype(np.uint16))  # 12-bit with offset
    assert (eight - sixteen).abs().max() < 0.02


def test_percentile_ignores_a_few_hot_pixels():
    image = np.full((50, 50), 100, np.uint16)
    image[:25] = 200
    image[0, 0] = 60000  # a hot pixel would squash everything under minmax
    percentile = Normalizer(channels=1)(image)
    minmax = Normalizer(method="minmax", channels=1)(image)
    assert percentile[0, 10, 10] == 1 and percentile[0, 40, 40] == 0
    assert minmax[0, 10, 10] < 0.01


def test_fixed_uses_dtype_range_or_given_range():
    image = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(Normalizer("fixed", channels=1)(image)[0], [[0, 0.2, 1]], atol=1e-6)
    out = Normalizer("fixed", channels=1, fixed_range=(0, 102))(image)[0]
    np.testing.assert_allclose(out, [[0, 0.5, 1]], atol=1e-6)


def test_gray_replicates_rgb_averages_and_alpha_is_dropped():
    gray = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    three = Normalizer(channels=3)(gray)
    assert torch.equal(three[0], three[1]) and torch.equal(three[1], three[2])

    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    one = Normalizer("fixed", channels=1)(rgb)
    np.testing.assert_allclose(one[0], rgb.mean(axis=2) / 255, atol=1e-6)

    rgba = np.concatenate([rgb, RNG.integers(0, 256, (8, 8, 1), dtype=np.uint8)], axis=2)
    assert torch.equal(Normalizer()(rgba), Normalizer()(rgb))
    gray_alpha = np.stack([gray, RNG.integers(0, 256, (8, 8), dtype=np.uint8)], axis=2)
    assert torch.equal(Normalizer()(gray_alpha), Normalizer()(gray))


def test_nan_and_inf_become_zero_before_scaling(tmp_path):
    image = RNG.uniform(10, 20, (16, 16)).astype(np.float32)
    image[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    tifffile.imwrite(tmp_path / "f.tif", image)
    out = Normalizer(method="minmax", channels=1)(read_image(tmp_path / "f.tif"))
    assert torch.isfinite(out).all()
    assert (out[0, 0, :4] == 0).all()  # 0 is the minimum, so they map to 0


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_constant_image_gives_zeros_not_nan(method):
    out = Normalizer(method=method)(np.full((5, 6, 3), 77, np.uint8))
    assert torch.equal(out, torch.zeros(3, 5, 6))


def test_large_images_use_a_strided_sample_for_statistics():
    image = RNG.integers(0, 4096, (1500, 1500), dtype=np.uint16)
    out = Normalizer(channels=1)(image)
    exact_low, exact_high = np.percentile(image, [1.0, 99.8])
    expected = np.clip((image - exact_low) / (exact_high - exact_low), 0, 1)
    assert np.abs(out[0].numpy() - expected).max() < 0.01


def test_dict_round_trip_is_json_able():
    normalizer = Normalizer(method="fixed", low_percentile=2, high_percentile=98, channels=1,
                            fixed_range=(10, 300))
    stored = json.loads(json.dumps(normalizer.to_dict()))
    assert Normalizer.from_dict(stored) == normalizer
    assert Normalizer.from_dict(Normalizer().to_dict()) == Normalizer()


@pytest.mark.parametrize("settings", [
    {"method": "zscore"}, {"low_percentile": 50, "high_percentile": 40}, {"channels": 2},
    {"fixed_range": (5, 5)},
])
def test_invalid_settings_raise_config_error(settings):
    with pytest.raises(ConfigError):
        Normalizer(**settings)


def test_unknown_stored_settings_are_rejected():
    with pytest.raises(ConfigError, match="unknown normaliser settings: gamma"):
        Normalizer.from_dict({**Normalizer().to_dict(), "gamma": 2})
