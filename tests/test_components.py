"""maskrcnn.components: 8-connected component labels of batched binary maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from maskrcnn.components import component_labels
from maskrcnn.modeling.mask.paste import largest_component


def expected_labels(binary: np.ndarray) -> np.ndarray:
    """scipy's 8-connected components, each relabelled by its largest flat index + 1."""
    pieces, count = ndimage.label(binary, structure=np.ones((3, 3), int))
    flat = np.arange(1, binary.size + 1).reshape(binary.shape)
    top = ndimage.maximum(flat, pieces, index=np.arange(1, count + 1)) if count else np.zeros(0)
    return np.concatenate([[0], np.asarray(top, np.int64)])[pieces]


def test_labels_are_8_connected():
    binary = torch.zeros(1, 6, 7, dtype=torch.bool)
    binary[0, 0, 0] = binary[0, 1, 1] = True  # diagonal neighbours: one component
    binary[0, 4:6, 3:7] = True
    binary[0, 0, 6] = True
    labels = component_labels(binary)[0]
    assert labels[0, 0] == labels[1, 1] == 1 * 7 + 1 + 1  # the larger flat index (7 + 1) + 1
    assert len(labels[labels > 0].unique()) == 3 and torch.equal(labels > 0, binary[0])
    assert labels[4:6, 3:7].unique().tolist() == [5 * 7 + 6 + 1]


@pytest.mark.parametrize("density", [0.3, 0.5, 0.6, 0.8])
@pytest.mark.parametrize("shape", [(40, 28, 28), (3, 37, 61)])
def test_labels_match_scipy_on_random_maps(density, shape):
    rng = np.random.default_rng(int(density * 10) + shape[1])
    binary = rng.random(shape) < density
    labels = component_labels(torch.from_numpy(binary)).numpy()
    for i in range(shape[0]):
        np.testing.assert_array_equal(labels[i], expected_labels(binary[i]))


def test_a_long_winding_component_is_one_label():
    """A serpentine path through a 64 x 64 map (about 2000 pixels end to end): one label, its end's."""
    binary = np.zeros((64, 64), bool)
    binary[::4, :63] = True  # rows joined alternately at the right and the left
    for k, row in enumerate(range(0, 60, 4)):
        binary[row:row + 5, 62 if k % 2 == 0 else 0] = True
    labels = component_labels(torch.from_numpy(binary)[None])[0].numpy()
    np.testing.assert_array_equal(labels, expected_labels(binary))
    assert len(np.unique(labels[binary])) == 1


def test_empty_inputs():
    assert component_labels(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 5, 5)
    assert not component_labels(torch.zeros(2, 5, 5, dtype=torch.bool)).any()


def test_largest_component_keeps_scipys_largest_piece():
    rng = np.random.default_rng(3)
    binary = rng.random((50, 28, 28)) < 0.55
    kept = largest_component(torch.from_numpy(binary)).numpy()
    for i in range(len(binary)):
        pieces, _ = ndimage.label(binary[i], structure=np.ones((3, 3), int))
        sizes = np.bincount(pieces.ravel())[1:]
        assert kept[i].sum() == sizes.max()
        assert len(np.unique(pieces[kept[i]])) == 1
