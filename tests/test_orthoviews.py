"""The orthogonal-views 3-D method: combining the YX, ZX and ZY views' instances into 3-D nuclei."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from maskrcnn.prediction.orthoviews import _plane_index, combine_views, resample_depth, view_labels


def balls(shape, centres, radius):
    """(Z, H, W) labels of balls (ids 1..n, isotropic voxels)."""
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for i, (cz, cy, cx) in enumerate(centres, start=1):
        labels[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = i
    return labels


def per_slice(labels, axis):
    """The labels as a view along ``axis`` would give them: each slice's instances, ids unique per slice."""
    out = np.zeros(labels.shape, np.int64)
    used = 0
    for k in range(labels.shape[axis]):
        part = np.take(labels, k, axis=axis)
        ids = np.unique(part[part > 0])
        lut = np.zeros(int(labels.max()) + 1, np.int64)
        lut[ids] = np.arange(used + 1, used + 1 + len(ids))
        index = [slice(None)] * 3
        index[axis] = k
        out[tuple(index)] = lut[part]
        used += len(ids)
    return out


def test_three_agreeing_views_give_back_the_nuclei_even_where_they_touch():
    truth = balls((12, 24, 40), [(6, 12, 10), (6, 12, 19), (6, 12, 32)], 5)  # the first two touch
    views = np.stack([per_slice(truth, 0), per_slice(truth, 1), per_slice(truth, 2)])
    got = combine_views(views)
    assert got.max() == 3
    for i in range(1, 4):  # one id per nucleus, exactly its voxels
        ids = np.unique(got[truth == i])
        assert len(ids) == 1 and ids[0] > 0 and ((got == ids[0]) == (truth == i)).all()


def test_a_boundary_drawn_by_one_view_separates_and_one_view_alone_adds_no_voxels():
    truth = balls((10, 20, 20), [(5, 10, 10)], 6)
    merged = truth.copy()
    yx = per_slice(truth, 0)
    halves = truth.copy()
    halves[:, :, 10:][halves[:, :, 10:] > 0] = 2  # the ZX view cuts the nucleus at x = 10
    zx = per_slice(halves, 1)
    zy = per_slice(merged, 2)
    got = combine_views(np.stack([yx, zx, zy]))
    assert len(np.unique(got[truth > 0])) == 2  # cut where ZX draws a boundary (x steps: YX and ZX judge)
    assert (got[truth == 0] == 0).all()
    extra = np.zeros_like(yx)
    extra[0, 0, 0] = yx.max() + 1  # a voxel only one view calls nucleus
    assert combine_views(np.stack([yx + extra, per_slice(truth, 1), zy]))[0, 0, 0] == 0


def test_view_labels_segments_every_slice_of_the_resampled_stack():
    truth = balls((8, 24, 24), [(4, 8, 8), (4, 16, 17)], 3)
    stack = torch.from_numpy((truth > 0).astype(np.float32))[None]  # (C, Z, H, W)
    seen = []

    def predict(image):  # a 2-D "model": connected parts of the bright pixels
        seen.append(tuple(image.shape))
        return ndimage.label(image[0].numpy() > 0.5)[0]

    views = view_labels(predict, stack, anisotropy=2.0)
    assert seen.count((1, 24, 24)) == 8 and seen.count((1, 16, 24)) == 48  # YX planes; ZX and ZY of 16 planes
    got = combine_views(views)
    assert got.max() == 2 and (got > 0).sum() == pytest.approx((truth > 0).sum(), rel=0.1)


def test_resampling_in_z_and_back():
    stack = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    tall = resample_depth(stack, 2.5)
    assert tall.shape == (1, 10, 2, 2) and resample_depth(stack, 1.0) is stack
    back = tall[:, _plane_index(4, 10)]
    assert torch.allclose(back, stack, atol=0.3)
