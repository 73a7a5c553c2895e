"""Reading each step's batch: in the training process (``--workers 0``) or in DataLoader workers.

Both paths read exactly the batches ``Trainer.next_batch`` draws (the epoch's batches, from
``batch_in_epoch`` on after a resume) and give the same images and targets: augmentations are a
pure function of (seed, epoch, index), and the samples are prepared on one intra-op thread either
way (torch gives each worker one; the inline path sets it for the moment), so a reduction such as
the intensity jitter's mean sums in the same order. Weights trained with 0 and N workers are equal.

With workers, ``torch.utils.data.DataLoader`` runs over a :class:`EpochBatchSampler` (the epoch's
batches from a position on), with a new iterator, and so new workers, per epoch: the dataset's
epoch is set before the iterator is made, so the workers see it. The workers ignore SIGINT,
SIGTERM and SIGUSR1: Ctrl-C reaches the whole process group, and the training process alone
decides how to stop (maskrcnn/runtime/signals.py), then ends its workers.

A sample that cannot be read does not raise in a worker (DataLoader would turn the error into
another one): :class:`SampleOrBad` gives a :class:`BadSample` in its place, and the training
process decides (``Trainer.usable``): stop the run with the sample's one-line error, or with
--skip-bad leave it out of the batch, warn, list it in RUN_DIR/skipped.txt and never read it
again in the run (``bad``, shared with the workers).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.reader import InstanceReader
from ..data.torch_dataset import InstanceDataset, collate
from ..data.views import RegionReader
from ..errors import DataError
from ..runtime.signals import STOP_SIGNALS
from ..structures import Target


@dataclass(frozen=True)
class BadSample:
    """What reading dataset position ``index`` gave instead of a sample: the reader's DataError
    (``path``, ``problem``), or, when the sample was known to be bad and not read, None for both."""

    index: int
    name: str
    path: str | None = None
    problem: str | None = None

    @property
    def known(self) -> bool:
        return self.problem is None


class Batch(NamedTuple):
    """One step's samples: the readable ones collated (``images``, ``targets``) and the others."""

    indices: list[int]
    images: list[Tensor]
    targets: list[Target]
    bad: list[BadSample]


def listed_names(reader: InstanceReader) -> Sequence[str]:
    """The names a reader's samples are listed under in RUN_DIR/skipped.txt: their files' sample
    names (a band of an image, as a single image trains and validates on, is listed as the image)."""
    while isinstance(reader, RegionReader):
        reader = reader.reader
    return reader.names


def listed_name(dataset: InstanceDataset, index: int) -> str:
    return listed_names(dataset.reader)[dataset.indices[index]]


class SampleOrBad(Dataset):
    """``dataset[i]``, or a :class:`BadSample` when it raises DataError or ``bad[i]`` is set."""

    def __init__(self, dataset: InstanceDataset, bad: Tensor) -> None:
        self.dataset, self.bad = dataset, bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Target] | BadSample:
        if self.bad[index]:
            return BadSample(index, listed_name(self.dataset, index))
        try:
            return self.dataset[index]
        except DataError as err:
            return BadSample(index, listed_name(self.dataset, index), err.path, err.problem)


def collate_batch(indices: Sequence[int], items: Sequence[tuple[Tensor, Target] | BadSample]) -> Batch:
    """``collate`` (data/torch_dataset.py) of the readable samples; the bad ones beside them."""
    good = [item for item in items if not isinstance(item, BadSample)]
    images, targets = collate(good)
    return Batch(list(indices), images, targets, [item for item in items if isinstance(item, BadSample)])


def _collate_positions(items: Sequence[tuple[int, tuple[Tensor, Target] | BadSample]]) -> Batch:
    return collate_batch([i for i, _ in items], [item for _, item in items])


class _Positioned(Dataset):
    """(index, item): a worker's batch carries its indices, which the training process checks."""

    def __init__(self, dataset: SampleOrBad) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, tuple[Tensor, Target] | BadSample]:
        return index, self.dataset[index]


class EpochBatchSampler(Sampler[list[int]]):
    """The rows of one epoch's batch table (``epoch_batches``) from ``start`` on, as index lists."""

    def __init__(self, batches: Tensor, start: int) -> None:
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for row in range(self.start, len(self.batches)):
            yield self.batches[row].tolist()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGINT (a terminal's Ctrl-C reaches the whole process group),
    SIGTERM and SIGUSR1 (Slurm signals every process of a job) are the training process's to
    handle; a worker that died of one would fail the DataLoader, and the graceful stop with it. A
    worker ends when the training process ends it (``BatchLoader.close``), or by itself when that
    process is gone (DataLoader's watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while the worker started (BatchLoader._start)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGUSR1 back while workers start: a new worker inherits the
    training process's handlers until ``ignore_stop_signals`` runs, and must not act on one. A
    signal held back here reaches the training process when this ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch on one intra-op thread, as in a DataLoader worker: a parallel reduction's result
    depends on the number of threads it is split over."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchLoader:
    """Reads the batch of each step, inline or with ``workers`` DataLoader workers.

    ``load(epoch, position, batches)`` gives row ``position`` of the epoch's batch table
    ``batches``. With workers it comes from the epoch's DataLoader iterator, which reads ahead;
    asking for another position than the next (a resume, a new epoch) starts a new iterator there.
    """

    def __init__(self, dataset: InstanceDataset, workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.workers, self.pin_memory = dataset, workers, pin_memory
        self.bad = torch.zeros(len(dataset), dtype=torch.bool)  # known bad: not read again
        if workers:
            self.bad.share_memory_()  # the workers read the flags the training process sets
        self.samples = SampleOrBad(dataset, self.bad)
        self._iterator: Iterator[Batch] | None = None
        self._next: tuple[int, int] | None = None  # the (epoch, position) the iterator gives next

    def load(self, indices: Sequence[int], epoch: int = 0, position: int = 0,
             batches: Tensor | None = None) -> Batch:
        """The samples at dataset positions ``indices``, row ``position`` of ``batches`` (epoch
        ``epoch``'s table) when that is given and there are workers."""
        if not self.workers or batches is None:
            with one_intra_op_thread():
                return collate_batch(indices, [self.samples[i] for i in indices])
        if self._next != (epoch, position):
            self._start(epoch, position, batches)
        batch = next(self._iterator)
        self._next = (epoch, position + 1)
        if batch.indices != list(indices):  # the sampler yields the trainer's rows: a bug otherwise
            raise RuntimeError(f"DataLoader gave the batch {batch.indices}, expected {list(indices)}")
        return batch

    def _start(self, epoch: int, position: int, batches: Tensor) -> None:
        self.close()
        loader = DataLoader(_Positioned(self.samples), batch_sampler=EpochBatchSampler(batches, position),
                            num_workers=self.workers, collate_fn=_collate_positions, pin_memory=self.pin_memory,
                            worker_init_fn=ignore_stop_signals, persistent_workers=False,
                            generator=torch.Generator().manual_seed(epoch))  # not torch's global RNG
        with _stop_signals_blocked():
            self._iterator = iter(loader)  # starts the workers (with the dataset's current epoch)

    def close(self) -> None:
        """End the workers: they finish the sample in hand and leave (what dropping the iterator
        does too). One stuck past DataLoader's timeouts is killed: it ignores SIGTERM, with which
        DataLoader would end it."""
        iterator, self._iterator, self._next = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is None:
            return
        shutdown()
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join()
