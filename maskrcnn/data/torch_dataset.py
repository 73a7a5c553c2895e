"""The torch Dataset over a reader (``InstanceDataset``: normalisation, augmentation, targets),
batch collation and train/validation splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..structures import Target
from .augment import Augment
from .datasets import InstanceReader
from .normalize import Normalizer


class InstanceDataset(Dataset):
    """A reader's samples as ``(image (C, H, W) float32, Target)`` pairs for training.

    Augmentation randomness is a pure function of ``(seed, epoch, reader index)``, so every worker,
    DDP rank and resumed run sees the same sample for the same epoch. Call :meth:`set_epoch`
    before each epoch (with DataLoader workers, before the epoch's iterator is created, i.e.
    without ``persistent_workers``). Empty masks are dropped; boxes are the masks' extents.
    ``indices`` restricts the dataset to a subset of the reader (e.g. a train/val split).

    With augmentation, samples are kept in memory once read and normalised, up to ``cache_bytes``
    in all (the first ones that fit): fine-tuning on a few images reads each of them at every
    step, and decoding a label image with hundreds of nuclei into masks and normalising it took
    about a quarter of a 128x128 training step (what the augmentation then cuts from it is drawn
    fresh each time, so the samples are the same with or without the cache).
    """

    def __init__(self, reader: InstanceReader, normalizer: Normalizer, augment: Augment | None = None,
                 seed: int = 0, indices: Sequence[int] | None = None, cache_bytes: int = 0):
        self.reader = reader
        self._normalizer = normalizer
        self.augment = augment
        self.seed = seed
        self.indices = list(range(len(reader))) if indices is None else list(indices)
        self.epoch = 0
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._cached_bytes = 0

    @property
    def normalizer(self) -> Normalizer:
        return self._normalizer

    @normalizer.setter
    def normalizer(self, normalizer: Normalizer) -> None:
        """A new normaliser (e.g. a resumed run's) empties the cache of samples normalised before."""
        self._normalizer, self._cache, self._cached_bytes = normalizer, {}, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        source = self.indices[index]
        image, masks, labels = self._prepared(source)
        if self.augment is not None:
            image, masks, labels = self.augment(image, masks, labels, self.generator(source))
        keep = masks.flatten(1).any(dim=1)
        return image, Target.from_masks(masks[keep], labels[keep], seed=self.sampling_seed(source))

    def _prepared(self, source: int) -> tuple[Tensor, Tensor, Tensor]:
        """Reader sample ``source`` normalised: image (C, H, W), masks (G, H, W), labels (G,); from
        the cache when it is there. Only augmented samples are cached: augmentation copies what it
        keeps, so nothing handed out shares memory with the cache."""
        if source in self._cache:
            return self._cache[source]
        sample = self.reader[source]
        prepared = (self.normalizer(sample.image), torch.from_numpy(sample.masks), torch.from_numpy(sample.labels))
        size = sum(t.numel() * t.element_size() for t in prepared)
        if self.augment is not None and self._cached_bytes + size <= self.cache_bytes:
            self._cache[source] = prepared
            self._cached_bytes += size
        return prepared

    def generator(self, source: int) -> torch.Generator:
        """Augmentation generator of reader sample ``source`` in the current epoch.

        Keyed by the reader's index, so a sample is augmented alike in any subset.
        """
        state = np.random.SeedSequence([self.seed, self.epoch, source]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def sampling_seed(self, source: int) -> int:
        """Seed of the model's RCNN/mask box sampling for reader sample ``source`` this epoch.

        A stream apart from the augmentation's; it travels on the Target, so the sample draws the
        same boxes in any batch, on any process, and after a resume.
        """
        state = np.random.SeedSequence([self.seed, self.epoch, source, 1]).generate_state(2, dtype=np.uint32)
        return int(state[0]) << 32 | int(state[1])


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """DataLoader ``collate_fn``: images keep their own sizes, so batches are lists."""
    return [image for image, _ in batch], [target for _, target in batch]


def split_train_val(dataset: Sequence | int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Random, seed-determined (train, val) index lists, each sorted.

    The validation set has round(n * val_fraction) images, but at least 1 when
    ``val_fraction > 0`` and there are >= 2 images, and never all of them.
    ``val_fraction == 0`` gives an empty validation set.
    """
    n = dataset if isinstance(dataset, int) else len(dataset)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 or n < 2 else min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
