"""Synthetic scenes (the built-in model's training data): determinism, instance sanity, the spread
of looks between images, unlabelled debris, the shape rasteriser and the reader.

Everything runs on small images (64-128 px): one scene costs a few milliseconds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from maskrcnn.data.synthetic_scenes import BIT_DEPTH_TOPS, Scene, SceneReader, rasterise_shapes, synth_scene

from test_data_synthetic import component_count  # an independent BFS check

DRAWN_SEEDS = range(20)


def touching_pairs(labels: np.ndarray) -> int:
    """Neighbouring (4-connected) pixel pairs that belong to two different instances."""
    horizontal = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    vertical = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
    return int(horizontal.sum() + vertical.sum())


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbourhood dilation, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.fixture(scope="module")
def drawn():
    """(scene, image, labels) of 20 scenes drawn from seeds 0..19 at 128 x 128."""
    out = []
    for seed in DRAWN_SEEDS:
        scene = Scene.draw(np.random.default_rng(seed))
        image, labels = synth_scene(128, np.random.default_rng(seed))  # draws the same scene first
        out.append((scene, image, labels))
    return out


# --- determinism ------------------------------------------------------------------------------------
def test_same_seed_same_scene_and_image_different_seed_different():
    assert Scene.draw(np.random.default_rng(3)) == Scene.draw(np.random.default_rng(3))
    assert Scene.draw(np.random.default_rng(3)) != Scene.draw(np.random.default_rng(4))
    a = synth_scene(96, np.random.default_rng(7))
    b = synth_scene(96, np.random.default_rng(7))
    c = synth_scene(96, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and a[0].dtype == b[0].dtype
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[0].shape != c[0].shape or a[0].dtype != c[0].dtype or not np.array_equal(a[0], c[0])


def test_a_given_scene_is_reproducible_and_the_rng_still_varies_the_image():
    scene = Scene.draw(np.random.default_rng(11))
    a = synth_scene(64, np.random.default_rng(1), scene)
    b = synth_scene(64, np.random.default_rng(1), scene)
    c = synth_scene(64, np.random.default_rng(2), scene)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == c[0].dtype  # the bit depth is the scene's


def test_rectangular_size_is_height_width():
    image, labels = synth_scene((48, 80), np.random.default_rng(0))
    assert image.shape == labels.shape == (48, 80)


# --- instances --------------------------------------------------------------------------------------
def test_labels_are_consecutive_int32_single_components(drawn):
    total = 0
    for _, image, labels in drawn:
        assert labels.dtype == np.int32 and labels.shape == image.shape == (128, 128)
        ids = np.unique(labels)
        ids = ids[ids > 0]
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        assert labels.min() >= 0
        for k in ids:
            assert component_count(labels == k) == 1, f"instance {k} is in pieces"
        total += len(ids)
    assert total > 100  # the scenes are not empty


def test_image_dtype_and_range_follow_the_bit_depth(drawn):
    depths = set()
    for scene, image, _ in drawn:
        assert scene.bits in BIT_DEPTH_TOPS
        depths.add(scene.bits)
        assert image.dtype == (np.uint8 if scene.bits == 8 else np.uint16)
        assert int(image.max()) <= BIT_DEPTH_TOPS[scene.bits]
        assert int(image.max()) > 0.2 * BIT_DEPTH_TOPS[scene.bits]  # the range is used, not a sliver of it
    assert 8 in depths and depths & {10, 12, 16}  # both 8-bit and 16-bit outputs occur


def test_a_10_or_12_bit_scene_stays_under_its_top():
    scene = replace(Scene.draw(np.random.default_rng(0)), bits=10, condensed_fraction=0.5, debris=30)
    image, _ = synth_scene(96, np.random.default_rng(0), scene)
    assert image.dtype == np.uint16 and 0 < int(image.max()) <= 1023


def test_nucleus_size_varies_widely_between_images(drawn):
    medians = []
    for _, _, labels in drawn:
        areas = np.bincount(labels.reshape(-1))[1:]
        if areas.size:
            medians.append(np.median(np.sqrt(4 * areas / np.pi)))  # equivalent diameter
    assert len(medians) >= 18
    assert max(medians) > 3 * min(medians)


def test_nuclei_are_brighter_than_background(drawn):
    ratios = []
    for _, image, labels in drawn:
        pixels = image.astype(np.float64)
        inside, outside = pixels[labels > 0], pixels[labels == 0]
        assert inside.mean() > outside.mean()
        ratios.append(inside.mean() / max(outside.mean(), 1.0))
    assert np.mean(ratios) > 2


# --- debris -----------------------------------------------------------------------------------------
QUIET = dict(coverage=0.05, defocus_fraction=0.0, condensed_fraction=0.0, background=0.01, vignetting=0.0,
             photons=3000.0, read_noise=0.002, dynamic_range=2.0, bits=8, blur=0.6)
"""A few clean, even nuclei on a dark background: anything bright away from them is debris."""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_debris_is_bright_but_unlabelled(seed):
    base = replace(Scene.draw(np.random.default_rng(100 + seed)), **QUIET)
    image, labels = synth_scene(128, np.random.default_rng(seed), replace(base, debris=60))
    clean, clean_labels = synth_scene(128, np.random.default_rng(seed), replace(base, debris=0))
    np.testing.assert_array_equal(labels, clean_labels)  # debris adds no instance and hides none
    away = ~dilate(labels > 0, 3)  # beyond the blur of the nuclei
    for picture in (image, clean):
        assert np.median(picture[labels > 0]) > 40  # the nuclei are visible
    level = 0.5 * np.median(image[labels > 0].astype(np.float64))
    assert (image[away] > level).sum() >= 20  # bright specks outside every label
    assert (clean[away] > level).sum() == 0  # without debris the background stays dark


# --- touching nuclei --------------------------------------------------------------------------------
def test_dense_scene_has_many_touching_instances():
    base = Scene.draw(np.random.default_rng(0))
    for seed in range(3):
        _, dense = synth_scene(128, np.random.default_rng(seed),
                               replace(base, coverage=0.7, touch_fraction=0.7, diameter=16.0))
        _, sparse = synth_scene(128, np.random.default_rng(seed),
                                replace(base, coverage=0.05, touch_fraction=0.1, diameter=16.0))
        assert dense.max() >= 20
        assert touching_pairs(dense) >= 200
        assert touching_pairs(dense) > 5 * touching_pairs(sparse)
        for k in range(1, int(dense.max()) + 1):  # occlusion leaves one piece per instance
            assert component_count(dense == k) == 1


# --- rasterise_shapes -------------------------------------------------------------------------------
def shape_row(cy: float, cx: float, a: float, b: float, angle: float = 0.0, depth: float = 0.0,
              toward: float = np.pi / 2) -> np.ndarray:
    """One 17-column row: cy, cx, a, b, angle, kind, bright, 4 harmonic amplitudes, 4 phases, dent."""
    row = np.zeros(17)
    row[:5] = cy, cx, a, b, angle
    row[15:17] = depth, toward
    return row


def plain_ellipse(shape: tuple[int, int], cy: float, cx: float, a: float, b: float) -> np.ndarray:
    """Pixels whose centre lies in the axis-aligned ellipse (semi-axis a along x, b along y)."""
    ys = np.arange(shape[0])[:, None] + 0.5
    xs = np.arange(shape[1])[None, :] + 0.5
    return ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1


def test_plain_shape_is_an_ellipse():
    cy, cx, a, b = 17.7, 20.3, 9.1, 5.3  # no pixel centre lies on the outline
    labels, radius = rasterise_shapes(shape_row(cy, cx, a, b)[None], (36, 44))
    expected = plain_ellipse((36, 44), cy, cx, a, b)
    assert labels.dtype == np.int64 and labels.shape == (36, 44)
    np.testing.assert_array_equal(labels, expected.astype(np.int64))
    ys, xs = np.nonzero(expected)
    q = ((xs + 0.5 - cx) / a) ** 2 + ((ys + 0.5 - cy) / b) ** 2
    np.testing.assert_allclose(radius[ys, xs], q, atol=1e-5)
    assert np.all(radius[~expected] == 1)


def test_quarter_turn_swaps_the_axes():
    cy, cx, a, b = 20.2, 18.6, 9.3, 4.4
    labels, _ = rasterise_shapes(shape_row(cy, cx, a, b, angle=np.pi / 2)[None], (40, 40))
    np.testing.assert_array_equal(labels > 0, plain_ellipse((40, 40), cy, cx, b, a))


def test_later_shapes_are_painted_on_top_and_off_image_shapes_are_skipped():
    shapes = np.stack([shape_row(16.2, 14.1, 8.3, 8.3), shape_row(16.2, 22.1, 6.3, 6.3),
                       shape_row(-50.0, -50.0, 5.0, 5.0)])
    labels, _ = rasterise_shapes(shapes, (32, 40))
    second = plain_ellipse((32, 40), 16.2, 22.1, 6.3, 6.3)
    first_only = plain_ellipse((32, 40), 16.2, 14.1, 8.3, 8.3) & ~second
    assert np.all(labels[second] == 2) and np.all(labels[first_only] == 1)
    assert np.all(labels[~(second | first_only)] == 0)
    assert not np.any(labels == 3)


def test_dent_removes_pixels_on_its_side_only():
    cy, cx = 30.3, 30.6
    plain, _ = rasterise_shapes(shape_row(cy, cx, 14.2, 10.1)[None], (60, 60))
    dented, _ = rasterise_shapes(shape_row(cy, cx, 14.2, 10.1, depth=0.3, toward=np.pi / 2)[None], (60, 60))
    assert np.all(plain[dented > 0] > 0)  # the dent only takes pixels away
    removed = (plain > 0) & (dented == 0)
    assert removed.sum() >= 10
    rows, _ = np.nonzero(removed)
    assert np.all(rows + 0.5 > cy)  # t = +pi/2 is +v, i.e. down the rows for angle 0
    assert component_count(dented > 0) == 1


def test_harmonics_change_the_outline():
    row = shape_row(30.3, 30.6, 12.2, 12.2)
    plain, _ = rasterise_shapes(row[None], (60, 60))
    row[7:11] = 0.15, 0.0, 0.0, 0.0  # second harmonic: an ellipse-like elongation
    wavy, _ = rasterise_shapes(row[None], (60, 60))
    assert (plain != wavy).sum() > 20


# --- SceneReader ------------------------------------------------------------------------------------
def test_scene_reader_samples_are_the_seeded_scenes():
    reader = SceneReader(4, 64, seed=9)
    assert len(reader) == 4
    assert reader.names == [f"scene_9_{i:06d}" for i in range(4)]
    assert len(set(reader.names)) == 4
    assert reader.class_names == ["background", "nucleus"]
    for i in (2, 0, 3):  # any order
        sample = reader[i]
        image, labels = synth_scene(64, np.random.default_rng([9, i]))
        assert sample.name == reader.names[i]
        assert sample.image.dtype == image.dtype
        np.testing.assert_array_equal(sample.image, image)
        count = int(labels.max())
        assert sample.masks.dtype == np.bool_ and sample.masks.shape == (count, 64, 64)
        for k in range(count):
            np.testing.assert_array_equal(sample.masks[k], labels == k + 1)
        assert sample.labels.dtype == np.int64
        np.testing.assert_array_equal(sample.labels, np.ones(count, np.int64))
    np.testing.assert_array_equal(reader[-1].image, reader[3].image)
    with pytest.raises(IndexError):
        reader[4]


def test_scene_reader_seeds_differ():
    a, b = SceneReader(2, 64, seed=0), SceneReader(2, 64, seed=1)
    assert a.names != b.names
    assert not np.array_equal(a[0].masks.sum(0), b[0].masks.sum(0))
    assert not np.array_equal(a[0].masks.sum(0), a[1].masks.sum(0))
