"""Synthetic nuclei: determinism, instance sanity, cost and the written dataset.

The cost is checked by counts, not by the clock: the Python-level work grows with the number of
nuclei and not with the number of pixels (per-pixel work stays in numpy), and the peak memory is a
few arrays of the image's size (no per-nucleus image-sized arrays). The speed itself is a
benchmark's business, not a unit test's.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections import deque

import numpy as np
import pytest

from maskrcnn.data.datasets import LabelsReader
from maskrcnn.data.io import read_image, read_label_image
from maskrcnn.data.synthetic import synth_nuclei, write_synthetic_dataset


def component_count(mask: np.ndarray) -> int:
    """Number of 4-connected components of a small bool mask (plain BFS, independent check)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def traced(fn):
    """(fn(), Python trace events during it: calls, lines, returns of Python code; peak bytes allocated,
    numpy arrays included). Restores any tracer already set (a coverage or debugger run)."""
    events = 0

    def tracer(frame, event, arg):
        nonlocal events
        events += 1
        return tracer

    previous = sys.gettrace()
    tracemalloc.start()
    sys.settrace(tracer)
    try:
        result = fn()
    finally:
        sys.settrace(previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, events, peak


def test_same_seed_same_output_different_seed_different_output():
    a = synth_nuclei(96, np.random.default_rng(5))
    b = synth_nuclei(96, np.random.default_rng(5))
    c = synth_nuclei(96, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instances_are_single_components_of_sane_size(seed):
    image, labels = synth_nuclei((128, 160), np.random.default_rng(seed), n_range=(25, 35),
                                 diameter_range=(8, 30), touch_fraction=0.6)
    assert image.shape == labels.shape == (128, 160)
    assert image.dtype == np.uint8 and labels.dtype == np.int32
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive ids
    assert 10 <= len(ids) <= 35
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() >= 15
    assert areas.max() <= np.pi * 15**2 + 50  # no larger than the largest allowed ellipse
    for i in ids:
        assert component_count(labels == i) == 1
    # nuclei are brighter than the background
    assert image[labels > 0].mean() > image[labels == 0].mean() + 40


def test_touching_and_overlapping_nuclei_occur():
    _, labels = synth_nuclei(128, np.random.default_rng(3), n_range=(30, 30), touch_fraction=0.8,
                             diameter_range=(10, 30))
    right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    down = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
    assert right.sum() + down.sum() > 20  # many pixels where two nuclei meet


def test_uint16_output_uses_12_bits():
    image, _ = synth_nuclei(64, np.random.default_rng(0), dtype=np.uint16)
    assert image.dtype == np.uint16 and 1000 < image.max() <= 4095


def test_python_work_depends_on_the_nuclei_not_on_the_pixels():
    """30 nuclei on 128 x 128 and on 1024 x 1024 (64 times the pixels): the same Python-level work
    (measured: ~2000 trace events either way, ~1700 of them fixed), far fewer events than pixels."""
    synth_nuclei(64, np.random.default_rng(0))  # first-call imports are not the generator's work
    _, small, _ = traced(lambda: synth_nuclei(128, np.random.default_rng(1), n_range=(30, 30)))
    _, large, _ = traced(lambda: synth_nuclei(1024, np.random.default_rng(1), n_range=(30, 30)))
    assert large <= 1.1 * small
    assert small <= 2000 + 100 * 30 < 128 * 128 / 3


def test_large_dense_image_costs_per_nucleus_and_per_pixel_not_both():
    """2048 x 2048 with 2200 nuclei: Python work per nucleus (measured ~16 events each), memory a
    few image-sized arrays (measured ~56 bytes per pixel at the peak; one bool image per nucleus
    would be 2200)."""
    (_, labels), events, peak = traced(
        lambda: synth_nuclei(2048, np.random.default_rng(0), n_range=(2200, 2200), diameter_range=(8, 40)))
    assert labels.max() >= 2000
    assert events <= 2000 + 100 * 2200
    assert peak <= 100 * 2048 * 2048


def test_written_dataset_reads_back_and_depends_only_on_seed_and_index(tmp_path):
    names = write_synthetic_dataset(tmp_path / "a", n_images=3, size=(48, 64), seed=7, n_range=(5, 8))
    assert names == ["synth_0000", "synth_0001", "synth_0002"]
    write_synthetic_dataset(tmp_path / "b", n_images=2, size=(48, 64), seed=7, n_range=(5, 8))
    dataset = LabelsReader(tmp_path / "a")
    assert dataset.names == names
    labels = read_label_image(tmp_path / "a" / "masks" / "synth_0001.png")
    np.testing.assert_array_equal(labels, read_label_image(tmp_path / "b" / "masks" / "synth_0001.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "a" / "images" / "synth_0001.png"),
                                  read_image(tmp_path / "b" / "images" / "synth_0001.png"))
    sample = dataset[1]
    assert sample.image.shape == (48, 64) and len(sample.masks) == labels.max()
    for i, mask in enumerate(sample.masks):
        np.testing.assert_array_equal(mask, labels == i + 1)
