"""InstanceDataset targets and reproducibility, collate and the train/val split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maskrcnn.data.augment import Augment
from maskrcnn.data.datasets import InstanceReader, LabelsReader, Sample
from maskrcnn.data.torch_dataset import InstanceDataset, collate, split_train_val
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.structures import Target


class ListReader(InstanceReader):
    """A reader over in-memory samples."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples
        self.names = [s.name for s in samples]
        self.class_names = ["background", "a", "b"]

    def _load(self, index: int) -> Sample:
        return self.samples[index]


def sample_with_empty_mask() -> Sample:
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[2, 7:10, 0:2] = True  # masks[1] stays empty
    image = np.arange(120, dtype=np.uint16).reshape(10, 12)
    return Sample("s", image, masks, np.array([2, 1, 1]), "s.png")


def test_item_is_normalised_image_and_target_without_empty_masks():
    dataset = InstanceDataset(ListReader([sample_with_empty_mask()]), Normalizer(channels=1))
    image, target = dataset[0]
    assert image.shape == (1, 10, 12) and image.dtype == torch.float32
    assert isinstance(target, Target) and len(target) == 2
    assert target.labels.tolist() == [2, 1]
    assert target.boxes.tolist() == [[3, 2, 9, 5], [0, 7, 2, 10]]  # x1 = last pixel + 1
    assert target.masks.dtype == torch.bool


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> LabelsReader:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n_images=4, size=64, seed=3, n_range=(6, 10), diameter_range=(8, 20))
    return LabelsReader(root)


def test_augmented_items_depend_only_on_seed_epoch_and_index(synthetic):
    def item(seed, epoch, index, indices=None):
        dataset = InstanceDataset(synthetic, Normalizer(), Augment(crop_size=48), seed=seed, indices=indices)
        dataset.set_epoch(epoch)
        return dataset[index]

    image, target = item(0, 1, 2)
    again, again_target = item(0, 1, 2)
    assert torch.equal(image, again) and torch.equal(target.masks, again_target.masks)
    assert torch.equal(item(0, 1, 0, indices=[2, 3])[0], image)  # same sample within a subset
    assert not torch.equal(item(0, 2, 2)[0], image)  # a new epoch draws anew
    assert not torch.equal(item(1, 1, 2)[0], image)
    assert image.shape == (3, 48, 48)
    assert torch.equal(target.boxes, Target.from_masks(target.masks).boxes)


def test_loader_batches_are_lists(synthetic):
    dataset = InstanceDataset(synthetic, Normalizer(channels=1), Augment(crop_size=32))
    images, targets = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert len(images) == len(targets) == 3
    assert all(i.shape == (1, 32, 32) for i in images) and all(isinstance(t, Target) for t in targets)


@pytest.mark.parametrize("n, fraction, n_val", [(10, 0.2, 2), (2, 0.1, 1), (3, 0.9, 2), (1, 0.5, 0),
                                                (5, 0.0, 0)])
def test_split_sizes(n, fraction, n_val):
    train, val = split_train_val(n, fraction, seed=0)
    assert len(val) == n_val and sorted(train + val) == list(range(n))
    assert train == sorted(train) and val == sorted(val)


def test_split_is_seeded_and_accepts_datasets(synthetic):
    assert split_train_val(synthetic, 0.5, seed=4) == split_train_val(4, 0.5, seed=4)
    splits = {tuple(split_train_val(20, 0.25, seed=s)[1]) for s in range(5)}
    assert len(splits) > 1
    with pytest.raises(ValueError):
        split_train_val(10, 1.0, seed=0)


class CountingReader(InstanceReader):
    """A reader that counts the reads of each sample."""

    def __init__(self, reader: InstanceReader):
        self.reader, self.names, self.class_names = reader, reader.names, reader.class_names
        self.reads = [0] * len(reader)

    def _load(self, index: int) -> Sample:
        self.reads[index] += 1
        return self.reader[index]


def test_cached_samples_are_read_once_and_augmented_as_without_the_cache(synthetic):
    def items(dataset):
        out = []
        for epoch in range(3):
            dataset.set_epoch(epoch)
            out += [dataset[i] for i in range(len(dataset))]
        return out

    counting = CountingReader(synthetic)
    cached = InstanceDataset(counting, Normalizer(), Augment(crop_size=48), seed=1, cache_bytes=1 << 30)
    got = items(cached)
    assert counting.reads == [1, 1, 1, 1]
    for image, _ in got:  # what the caller does with a sample must not reach the cache
        image.fill_(7.0)
    want = items(InstanceDataset(synthetic, Normalizer(), Augment(crop_size=48), seed=1))
    for (image, target), (image_w, target_w) in zip(items(cached), want):
        assert torch.equal(image, image_w) and torch.equal(target.masks, target_w.masks)
        assert torch.equal(target.labels, target_w.labels) and target.seed == target_w.seed
    assert counting.reads == [1, 1, 1, 1]


def test_cache_keeps_what_fits_its_budget_and_empties_with_a_new_normaliser(synthetic):
    counting = CountingReader(synthetic)
    one = sum(t.numel() * t.element_size() for t in InstanceDataset(synthetic, Normalizer())._prepared(0))
    dataset = InstanceDataset(counting, Normalizer(), Augment(crop_size=48), cache_bytes=one + one // 2)
    for _ in range(2):
        dataset[0], dataset[1]
    assert counting.reads[:2] == [1, 2]  # the second sample did not fit next to the first
    dataset.normalizer = Normalizer(method="minmax")
    dataset[0]
    assert counting.reads[0] == 2
    unaugmented = InstanceDataset(counting, Normalizer(), cache_bytes=1 << 30)
    unaugmented[3], unaugmented[3]
    assert counting.reads[3] == 2  # only augmented samples are cached
