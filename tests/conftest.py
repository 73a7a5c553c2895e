"""Shared fixtures: hand-drawn square instances; one torch thread for tiny-image runs."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from maskrcnn.structures import Target


def _squares_target(height: int, width: int, squares: list[tuple[int, int, int]],
                    labels: list[int] | None = None) -> Target:
    masks = torch.zeros(len(squares), height, width, dtype=torch.bool)
    for k, (x0, y0, side) in enumerate(squares):
        masks[k, y0:y0 + side, x0:x0 + side] = True
    return Target.from_masks(masks, None if labels is None else torch.tensor(labels))


@pytest.fixture
def squares():
    """``squares(height, width, [(x0, y0, side), ...], labels=None) -> Target`` of axis-aligned squares."""
    return _squares_target


@contextmanager
def _torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny images gain nothing from intra-op threads; on a busy machine they cost 10x or more.
    (Child processes get the same with OMP_NUM_THREADS=1.) For a module: ``usefixtures``."""
    with _torch_threads(1):
        yield


@pytest.fixture
def one_thread():
    """The same, for one test."""
    with _torch_threads(1):
        yield
