"""Large Z-stacks under the memory budget: labels on disk a plane at a time, written page by page."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from maskrcnn.data.synthetic_3d import Stack, synth_stack
from maskrcnn.prediction.plane_store import PlaneStore
from maskrcnn.prediction.stacks import write_label_volume
from maskrcnn.prediction.volume import Stitcher, relabel_volume, segment_stack, stitch_planes, volume_table
from maskrcnn.runtime.atomic import remove_stale_temporaries


def random_planes(seed: int = 0) -> np.ndarray:
    """(6, 40, 50) per-plane label images of drifting boxes, ids per plane."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((6, 40, 50), np.int32)
    for n in range(5):
        y, x, z0 = rng.integers(0, 30), rng.integers(0, 40), rng.integers(0, 4)
        for z in range(z0, min(6, z0 + rng.integers(1, 4))):
            planes[z, y:y + 9, x + z:x + z + 9] = n + 1 + 10 * z
    return planes


def test_the_store_relabels_on_reading_as_stitching_in_memory_does(tmp_path):
    planes = random_planes()
    images = np.where(planes > 0, 0.2 + 0.1 * (planes % 5), 0.0)  # the boxes' brightness differs along z
    stitcher = Stitcher()
    store = PlaneStore(planes.shape, tmp_path)
    for z, plane in enumerate(planes):
        store[z] = stitcher.add(plane, images[z])
    relabel_volume(store, stitcher.profiles)
    expected = stitch_planes(planes, images=images)
    assert expected.max() >= 2
    assert np.array_equal(np.stack(list(store)), expected) and store.max() == expected.max()
    assert volume_table(store) == volume_table(expected)
    write_label_volume(tmp_path / "labels.tif", store)
    assert np.array_equal(tifffile.imread(tmp_path / "labels.tif"), expected)
    store.close()
    assert not list(tmp_path.glob(".*.tmp"))


def test_volume_table_reads_a_plane_at_a_time_and_matches_a_hand_count():
    labels = np.zeros((3, 4, 5), np.int32)
    labels[0:2, 1:3, 1:4] = 7  # 12 voxels, centroid (0.5, 1.5, 2)
    labels[2, 3, 4] = 2
    rows = {r["id"]: r for r in volume_table(labels)}
    assert rows[7] == {"id": 7, "volume": 12, "centroid_z": 0.5, "centroid_y": 1.5, "centroid_x": 2.0,
                       "z0": 0, "y0": 1, "x0": 1, "z1": 2, "y1": 3, "x1": 4}
    assert rows[2]["volume"] == 1 and (rows[2]["z0"], rows[2]["z1"], rows[2]["x0"]) == (2, 3, 4)


def test_a_killed_runs_label_store_is_removed_by_the_next_run(tmp_path):
    store = PlaneStore((2, 8, 8), tmp_path)
    store.path.rename(tmp_path / ".labels.999999999.abcd.tmp")  # as if its process were gone
    store.blocks.file.close()
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".labels.999999999.abcd.tmp"]


def test_label_volumes_past_65535_ids_are_written_as_32_bit_pages(tmp_path):
    labels = np.zeros((2, 20, 30), np.int32)
    labels[1, 5, 5], labels[0, 19, 29] = 70000, 3
    write_label_volume(tmp_path / "big.tif", labels)
    back = tifffile.imread(tmp_path / "big.tif")
    assert back.dtype == np.uint32 and np.array_equal(back, labels)
    labels[1, 5, 5] = 9
    write_label_volume(tmp_path / "small.tif", labels)
    assert tifffile.imread(tmp_path / "small.tif").dtype == np.uint16


@pytest.mark.slow
def test_a_stack_over_the_budget_keeps_its_labels_on_disk_with_the_same_result(tmp_path):
    from maskrcnn.prediction.predict import Predictor

    image, _ = synth_stack((10, 96, 96), np.random.default_rng(3), Stack(count=8, diameter=20.0))
    predictor = Predictor.from_weights("nuclei", device="cpu")
    in_memory = segment_stack(predictor, image)
    predictor.max_memory = 1  # nothing fits: the labels go to disk (planes this small stay whole)
    spilled = segment_stack(predictor, image, spill=tmp_path)
    assert isinstance(spilled.labels, PlaneStore) and isinstance(in_memory.labels, np.ndarray)
    assert np.array_equal(np.stack(list(spilled.labels)), in_memory.labels)
    assert spilled.plane_instances == in_memory.plane_instances
    spilled.labels.close()


def test_orthogonal_views_past_the_budget_say_so():
    import warnings

    from maskrcnn.prediction.volume import _check_views_fit

    stack = np.zeros((10, 64, 64), np.uint16)
    with pytest.warns(UserWarning, match=r"--3d-method ortho holds about 0.0 GB .* stitching \(the default\)"):
        _check_views_fit(stack, 2.0, budget=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_views_fit(stack, 2.0, budget=1 << 50)


def test_label_volumes_are_written_as_ome_zarr_that_reads_back_with_its_voxel_size(tmp_path):
    pytest.importorskip("zarr")
    from maskrcnn.data.stack_reader import anisotropy_of, read_stack
    from maskrcnn.prediction.stacks import write_label_zarr

    planes = random_planes()
    stitcher = Stitcher()
    store = PlaneStore(planes.shape, tmp_path)
    for z, plane in enumerate(planes):
        store[z] = stitcher.add(plane)
    relabel_volume(store, stitcher.profiles)
    target = tmp_path / "stack_labels.ome.zarr"
    write_label_zarr(target, store, anisotropy=2.5)
    assert np.array_equal(read_stack(target), stitch_planes(planes)) and anisotropy_of(target, None) == 2.5
    write_label_zarr(target, np.zeros(planes.shape, np.int32))  # a rerun replaces the folder whole
    assert read_stack(target).max() == 0 and anisotropy_of(target, None) == 1.0
    store.close()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    stale = tmp_path / ".stack_labels.ome.zarr.999999999.abcd.tmp"
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "c").write_bytes(b"half a chunk")
    assert remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()
