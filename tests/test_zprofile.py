"""3-D instances refined along z by their profiles: contrast against the ring around a mask, the
half-maximum trim of out-of-focus planes, faint instances dropped, nuclei stacked in z split at a
waist, nuclei stacked at a slant split where the centre drifts, and the same relabelling on planes
kept on disk."""

from __future__ import annotations

import numpy as np
import pytest

from maskrcnn.prediction import zprofile
from maskrcnn.prediction.volume import stitch_planes
from maskrcnn.prediction.zprofile import Profiles, plane_profile


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_contrast_is_the_mask_mean_against_its_own_ring_of_background():
    labels = np.zeros((30, 40), np.int32)
    labels[disc(labels.shape, 10, 10, 4)] = 3
    labels[disc(labels.shape, 20, 30, 4)] = 8
    image = np.full(labels.shape, 0.1)
    image[labels == 3] = 0.9  # bright on 0.1
    image[labels == 8] = 0.2  # faint: the ring around 8 is raised to 0.15
    ring8 = disc(labels.shape, 20, 30, 9) & (labels == 0)
    image[ring8] = 0.15
    profile = plane_profile(labels, image)
    assert profile.ids.tolist() == [3, 8]
    assert profile.area.tolist() == [int((labels == 3).sum()), int((labels == 8).sum())]
    assert profile.contrast == pytest.approx([0.8, 0.05])
    dark = plane_profile(labels, 1.0 - image)  # dark nuclei on a light ground: the same contrast
    assert dark.contrast == pytest.approx(profile.contrast)


def test_out_of_focus_planes_are_trimmed_to_the_half_maximum():
    shape = (24, 24)
    contrast = [0.1, 0.3, 0.8, 1.0, 0.9, 0.45, 0.2]  # a nucleus in planes 2-4, its blur beyond
    planes = np.zeros((len(contrast), *shape), np.int32)
    images = np.zeros(planes.shape)
    for z, c in enumerate(contrast):
        planes[z][disc(shape, 12, 12, 5)] = z + 1  # the 2-D model outlines every plane alike
        images[z][disc(shape, 12, 12, 5)] = c
    out = stitch_planes(planes, images=images)
    assert [bool(p.any()) for p in out] == [False, False, True, True, True, False, False]
    assert int(out.max()) == 1
    untrimmed = stitch_planes(planes)  # without the images: stitching alone keeps all seven
    assert all(p.any() for p in untrimmed)


def test_instances_that_never_stand_out_are_dropped_and_the_rest_renumbered():
    shape = (24, 40)
    planes = np.zeros((3, *shape), np.int32)
    images = np.full(planes.shape, 0.02)
    for z in range(3):
        planes[z][disc(shape, 12, 10, 5)] = 1  # noise outlined as a nucleus
        planes[z][disc(shape, 12, 30, 5)] = 2
        images[z][disc(shape, 12, 10, 5)] = 0.02 + zprofile.MIN_CONTRAST / 2
        images[z][disc(shape, 12, 30, 5)] = 0.5
    out = stitch_planes(planes, images=images)
    assert int(out.max()) == 1 and int(out[1, 12, 30]) == 1 and int(out[1, 12, 10]) == 0


def test_two_nuclei_stacked_in_z_are_split_at_their_waist():
    shape = (40, 40)
    radii = [5, 8, 10, 8, 6, 7, 9, 6]  # two nuclei one on the other, narrowing at plane 4 (stitched as one)
    planes = np.stack([np.where(disc(shape, 20, 20, r), 1, 0) for r in radii]).astype(np.int32)
    images = planes * 0.6
    assert int(stitch_planes(planes).max()) == 1  # stitching alone joins them
    out = stitch_planes(planes, images=images)
    first, second = int(out[2, 20, 20]), int(out[6, 20, 20])
    assert {first, second} == {1, 2}
    assert [int(out[z, 20, 20]) for z in range(8)] == [first] * 4 + [second] * 4  # the waist joins its smaller neighbour
    planes = np.stack([np.where(disc(shape, 20, 20, r), 1, 0) for r in [4, 8, 10, 9, 8, 9, 6]]).astype(np.int32)
    assert int(stitch_planes(planes, images=planes * 0.6).max()) == 1  # narrowing to 0.79 of both sides: one


@pytest.mark.parametrize("block", [zprofile.CENTRE_ROWS, 7])  # the plane in one block of rows, or five
def test_centres_are_the_mean_row_and_column_of_each_mask(block, monkeypatch):
    monkeypatch.setattr(zprofile, "CENTRE_ROWS", block)
    labels = np.zeros((30, 40), np.int32)
    labels[disc(labels.shape, 10, 12, 4)] = 2
    labels[5:9, 30:36] = 7  # rows 5-8, columns 30-35
    profile = plane_profile(labels, np.where(labels > 0, 0.8, 0.1))
    assert profile.centre == pytest.approx(np.array([[10.0, 12.0], [6.5, 32.5]]))


def test_nuclei_stacked_at_a_slant_are_split_where_the_centre_passes_halfway():
    shape = (40, 60)
    planes = np.zeros((10, *shape), np.int32)
    for z in range(10):  # one nucleus in planes 0-5, another beside it in planes 4-9: one blob in 4-5
        planes[z][disc(shape, 20, 22, 8) if z <= 5 else np.zeros(shape, bool)] = 1
        planes[z][disc(shape, 20, 36, 8) if z >= 4 else np.zeros(shape, bool)] = 1
    images = planes * 0.6
    assert int(stitch_planes(planes).max()) == 1  # stitching alone joins them
    out = stitch_planes(planes, images=images)
    left, right = int(out[0, 20, 22]), int(out[9, 20, 36])
    assert {left, right} == {1, 2}
    # the blob planes have their centre exactly halfway (29): the second nucleus begins there
    assert [int(out[z].max()) for z in range(10)] == [left] * 4 + [right] * 6
    assert (out[:4] > 0).sum() == 4 * disc(shape, 20, 22, 8).sum()


def test_a_nucleus_leaning_less_than_the_drift_limit_stays_whole():
    shape, radius = (40, 60), 8
    shift = 0.95 * zprofile.DRIFT * radius / 9  # per plane: the ends' centres 0.95 DRIFT radii apart
    planes = np.stack([np.where(disc(shape, 20, 24 + z * shift, radius), 1, 0) for z in range(10)]).astype(np.int32)
    assert int(stitch_planes(planes, images=planes * 0.6).max()) == 1
    further = 1.2 * zprofile.DRIFT * radius / 9  # 1.2 DRIFT radii: split in two
    planes = np.stack([np.where(disc(shape, 20, 24 + z * further, radius), 1, 0) for z in range(10)]).astype(np.int32)
    assert int(stitch_planes(planes, images=planes * 0.6).max()) == 2


def test_a_small_section_before_the_first_large_one_does_not_move_the_cut():
    shape = (40, 60)
    profiles = Profiles()  # one id throughout, as stitching could leave it
    sections = [(36, 3)] + [(22, 8)] * 3 + [(36, 8)] * 3  # a speck on the right, then left, then right
    for cx, r in sections:
        plane = np.where(disc(shape, 20, cx, r), 1, 0).astype(np.int32)
        profiles.add(plane, plane * 0.6)
    relabel = profiles.relabel(min_planes=2)
    assert relabel.count == 2
    assert [int(relabel.planes[z][1][0]) for z in range(7)] == [1, 1, 1, 1, 2, 2, 2]


def test_relabelling_is_per_plane_and_covers_gaps():
    profiles = Profiles()
    shape = (10, 10)
    for z, present in enumerate([True, True, False, True, True]):  # one id, absent from plane 2
        plane = np.zeros(shape, np.int32)
        if present:
            plane[2:7, 2:7] = 5
        profiles.add(plane, np.where(plane > 0, 0.7, 0.0))
    relabel = profiles.relabel(min_planes=2)
    assert relabel.count == 2  # the two runs of planes are two instances
    mapped = [int(relabel(z, np.full(shape, 5, np.int32))[0, 0]) for z in (0, 1, 3, 4)]
    assert mapped == [1, 1, 2, 2]
