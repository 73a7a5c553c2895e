"""Reader views: ConcatReader (readers one after the other) and CachedReader (each sample read
once), alone and under SubsetReader / RegionReader."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from maskrcnn.data.reader import InstanceReader, Sample
from maskrcnn.data.views import CachedReader, ConcatReader, RegionReader, ResizedReader, SubsetReader


class CountingReader(InstanceReader):
    """``count`` tiny samples named ``{prefix}{i}`` whose image is filled with ``base + i``; counts
    every read of each index in ``reads``."""

    def __init__(self, count: int, prefix: str = "s", base: int = 0,
                 class_names: list[str] | None = None):
        self.prefix, self.base = prefix, base
        self.names = [f"{prefix}{i}" for i in range(count)]
        self.class_names = class_names or ["background", "nucleus"]
        self.reads: Counter[int] = Counter()

    def _load(self, index: int) -> Sample:
        self.reads[index] += 1
        image = np.full((4, 6), self.base + index, dtype=np.uint8)
        masks = np.zeros((2, 4, 6), dtype=bool)
        masks[0, :2, :2] = True  # left
        masks[1, 2:, 4:] = True  # right
        return Sample(self.names[index], image, masks, np.array([1, 1], np.int64), image_path=f"/x/{self.names[index]}")


def same_sample(a: Sample, b: Sample) -> bool:
    return (a.name == b.name and a.image_path == b.image_path and np.array_equal(a.image, b.image)
            and np.array_equal(a.masks, b.masks) and np.array_equal(a.labels, b.labels))


# --- ConcatReader -----------------------------------------------------------------------------------
def test_concat_names_and_samples_in_order():
    first, second, third = CountingReader(2, "a", 0), CountingReader(3, "b", 10), CountingReader(1, "c", 20)
    concat = ConcatReader([first, second, third])
    assert len(concat) == 6
    assert concat.names == ["a0", "a1", "b0", "b1", "b2", "c0"]
    assert concat.class_names == ["background", "nucleus"]
    expected = [(first, 0), (first, 1), (second, 0), (second, 1), (second, 2), (third, 0)]
    for index, (reader, inner) in enumerate(expected):
        sample = concat[index]
        assert sample.name == concat.names[index]
        assert same_sample(sample, reader[inner])
        assert int(sample.image[0, 0]) == reader.base + inner


def test_concat_maps_each_index_to_its_reader_only():
    first, second = CountingReader(2, "a"), CountingReader(3, "b", 10)
    concat = ConcatReader([first, second])
    concat[3]
    assert first.reads == Counter() and second.reads == Counter({1: 1})
    concat[-1]  # negative indices count from the end, as for any reader
    assert second.reads == Counter({1: 1, 2: 1})
    concat[0]
    assert first.reads == Counter({0: 1})
    with pytest.raises(IndexError):
        concat[5]


def test_concat_skips_empty_readers():
    concat = ConcatReader([CountingReader(0, "e"), CountingReader(2, "a"), CountingReader(0, "f")])
    assert concat.names == ["a0", "a1"]
    assert concat[1].name == "a1"


def test_concat_of_one_reader_is_that_reader():
    reader = CountingReader(3, "a")
    concat = ConcatReader([reader])
    assert concat.names == reader.names
    assert all(same_sample(concat[i], reader[i]) for i in range(3))


def test_concat_refuses_readers_with_different_classes():
    other = CountingReader(1, "b", class_names=["background", "cell"])
    with pytest.raises(ValueError):
        ConcatReader([CountingReader(1, "a"), other])
    more = CountingReader(1, "b", class_names=["background", "nucleus", "cell"])
    with pytest.raises(ValueError):
        ConcatReader([CountingReader(1, "a"), more])


def test_concat_refuses_no_readers():
    with pytest.raises(ValueError):
        ConcatReader([])


# --- CachedReader -----------------------------------------------------------------------------------
def test_cached_reader_reads_each_sample_once():
    reader = CountingReader(3)
    cached = CachedReader(reader)
    assert len(cached) == 3 and cached.names == reader.names and cached.class_names == reader.class_names
    for _ in range(4):
        for i in (2, 0, 1):
            assert same_sample(cached[i], CountingReader(3)[i])
    assert reader.reads == Counter({0: 1, 1: 1, 2: 1})


def test_cached_reader_reads_only_what_is_asked_for():
    reader = CountingReader(5)
    cached = CachedReader(reader)
    cached[3]
    cached[-2]  # the same sample
    assert reader.reads == Counter({3: 1})
    with pytest.raises(IndexError):
        cached[5]


def test_subset_with_repeats_over_a_cache_reads_once():
    reader = CountingReader(3)
    subset = SubsetReader(CachedReader(reader), [1, 1, 2, 1, 2, 2, 1])
    assert subset.names == ["s1", "s1", "s2", "s1", "s2", "s2", "s1"]
    samples = [subset[i] for i in range(len(subset))]
    assert [s.name for s in samples] == subset.names
    assert all(same_sample(s, CountingReader(3)[int(s.name[1:])]) for s in samples)
    assert reader.reads == Counter({1: 1, 2: 1})


def test_cached_region_under_concat_reads_each_image_once():
    """The pretraining mix: scenes, then a cached left band of real images repeated."""
    real = CountingReader(2, "r", 50)
    band = CachedReader(RegionReader(real, 0.0, 0.5))
    mix = ConcatReader([CountingReader(2, "s"), SubsetReader(band, [0, 1, 0, 1, 0])])
    assert len(mix) == 7
    for i in range(len(mix)):
        mix[i]
    assert real.reads == Counter({0: 1, 1: 1})
    sample = mix[4]  # band[0]
    assert sample.image.shape == (4, 3) and int(sample.image[0, 0]) == 50
    assert sample.masks.shape == (1, 4, 3)  # the right-hand instance is cut away


# --- ResizedReader -----------------------------------------------------------------------------------
def test_resized_reader_brings_the_median_instance_to_the_diameter():
    reader = CountingReader(2, base=100)  # instances of 4 pixels each: equivalent diameter 2.26 px
    resized = ResizedReader(reader, diameter=2 * 2 * np.sqrt(4 / np.pi))  # twice that
    sample = resized[1]
    assert sample.image.shape == (8, 12) and sample.image.dtype == np.uint8
    assert np.all(sample.image == 101)  # a flat image stays flat, in its own dtype
    assert [int(m.sum()) for m in sample.masks] == [16, 16]
    assert sample.masks[0][:4, :4].all() and sample.masks[1][4:, 8:].all()
    assert resized.names == reader.names and sample.name == "s1"


def test_resized_reader_leaves_an_image_without_instances_alone():
    class Empty(CountingReader):
        def _load(self, index):
            sample = super()._load(index)
            return Sample(sample.name, sample.image, sample.masks[:0], sample.labels[:0], sample.image_path)

    assert same_sample(ResizedReader(Empty(1), 20.0)[0], Empty(1)[0])
