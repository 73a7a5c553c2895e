"""Shared fixtures: hand-drawn square instances."""

from __future__ import annotations

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
