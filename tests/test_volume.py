"""Z-stacks: stitching planes into 3-D instances, 3-D metrics and measurements, the synthetic
stacks, and a stack segmented end to end by the built-in model."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from maskrcnn.data.synthetic_3d import Stack, synth_stack
from maskrcnn.metrics import match_instances
from maskrcnn.prediction.volume import segment_stack, stitch_planes, volume_overlaps, volume_table


def disc(shape, cy, cx, r, value):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, value, 0)


def test_a_nucleus_spanning_planes_gets_one_id_and_touching_nuclei_keep_two():
    shape = (40, 60)
    planes = np.zeros((4, *shape), np.int32)
    for z in range(4):  # nucleus A drifts a little from plane to plane, its per-plane id changes
        planes[z] += disc(shape, 12 + z, 12, 8, 5 + z)
    for z in (1, 2, 3):  # B and C touch in every plane, side by side
        planes[z] += disc(shape, 28, 30, 6, 20) + disc(shape, 28, 43, 6, 30)
    planes[3][planes[3] == 20] = 0  # B ends before the last plane
    planes[3] += disc(shape, 10, 50, 5, 40)  # D appears only there, far from everything
    out = stitch_planes(planes, min_planes=1)
    a = {int(v) for z in range(4) for v in np.unique(out[z][disc(shape, 12 + z, 12, 6, 1) > 0])}
    assert a == {1}  # one id on all four planes
    b, c = int(out[1, 28, 30]), int(out[1, 28, 43])
    assert b != c and {int(out[2, 28, 30]), int(out[2, 28, 43])} == {b, c} and int(out[3, 28, 43]) == c
    assert int(out[3, 10, 50]) not in (0, 1, b, c)
    assert sorted(np.unique(out))[1:] == [1, 2, 3, 4]
    thick = stitch_planes(planes)  # by default a one-plane instance (D) is dropped
    assert int(thick[3, 10, 50]) == 0 and int(thick.max()) == 3


def test_an_instance_overlapping_less_than_the_threshold_starts_a_new_one():
    shape = (30, 30)
    planes = np.stack([disc(shape, 15, 8, 6, 1), disc(shape, 15, 17, 6, 1)])  # IoU about 0.1
    assert len(np.unique(stitch_planes(planes, threshold=0.25, min_planes=1))) == 3
    assert len(np.unique(stitch_planes(planes, threshold=0.05))) == 2


def test_3d_metrics_and_measurements_against_a_hand_computed_case():
    truth = np.zeros((2, 4, 4), np.int32)
    truth[:, :2, :2] = 1  # 8 voxels
    truth[1, 2:, 2:] = 2  # 4 voxels
    pred = np.zeros_like(truth)
    pred[0, :2, :2] = 7  # half of nucleus 1: IoU 4 / 8
    pred[1, 2:, 2:] = 9
    pred[1, 3, 0] = 9  # one extra voxel: IoU 4 / 5
    overlaps = volume_overlaps(truth, pred)
    iou = {(int(overlaps.true_ids[t]), int(overlaps.pred_ids[p])): v
           for t, p, v in zip(overlaps.true_index, overlaps.pred_index, overlaps.iou)}
    assert iou == {(1, 7): pytest.approx(0.5), (2, 9): pytest.approx(0.8)}
    stats = match_instances(overlaps)
    at = {round(float(t), 2): i for i, t in enumerate(stats.thresholds)}
    # a match needs IoU above the threshold: at 0.5 only nucleus 2 (TP 1, FP 1, FN 1), at 0.8 none
    assert stats.accuracy[at[0.5]] == pytest.approx(1 / 3) and stats.f1[at[0.5]] == pytest.approx(0.5)
    assert stats.accuracy[at[0.75]] == pytest.approx(1 / 3) and stats.accuracy[at[0.8]] == 0.0
    rows = volume_table(truth)
    assert rows[0] == {"id": 1, "volume": 8, "centroid_z": 0.5, "centroid_y": 0.5, "centroid_x": 0.5,
                       "z0": 0, "y0": 0, "x0": 0, "z1": 2, "y1": 2, "x1": 2}
    assert rows[1]["volume"] == 4 and (rows[1]["z0"], rows[1]["z1"]) == (1, 2)


def test_synthetic_stacks_are_deterministic_with_every_id_present():
    image, labels = synth_stack((12, 64, 64), np.random.default_rng(4), Stack(count=6, anisotropy=3.0))
    again, same = synth_stack((12, 64, 64), np.random.default_rng(4), Stack(count=6, anisotropy=3.0))
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, same)
    assert image.dtype == np.uint16 and labels.shape == (12, 64, 64)
    assert set(np.unique(labels)) == set(range(int(labels.max()) + 1)) and labels.max() >= 3
    inside = labels > 0
    assert image[inside].mean() > 1.5 * image[~inside].mean()


@pytest.mark.slow
def test_the_builtin_model_segments_a_synthetic_stack_in_3d():
    from maskrcnn.prediction.predict import Predictor

    image, truth = synth_stack((16, 96, 96), np.random.default_rng(1), Stack(count=8, diameter=20.0))
    result = segment_stack(Predictor.from_weights("nuclei", device="cpu"), image)
    assert result.labels.shape == truth.shape and len(result.plane_instances) == 16
    stats = match_instances(volume_overlaps(truth, result.labels))
    at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
    assert stats.accuracy[at50] > 0.5  # a mechanism check; accuracy is measured by benchmarks/volume.py


@pytest.mark.slow
def test_predict_3d_writes_a_3d_label_image_that_evaluates_against_the_truth(tmp_path, capsys):
    import csv
    import json

    import tifffile

    from cli_helpers import cli

    image, truth = synth_stack((10, 80, 80), np.random.default_rng(3), Stack(count=6, diameter=20.0))
    tifffile.imwrite(tmp_path / "stack.tif", image, metadata={"axes": "ZYX"})
    (tmp_path / "bad.tif").write_bytes(b"no tiff")
    code, out, err = cli(capsys, "predict", tmp_path / "stack.tif", tmp_path / "bad.tif", "--3d", "--weights",
                         "nuclei", "--out", tmp_path / "o", "--device", "cpu", "--no-progress")
    assert code == 2 and "bad.tif" in err and "1 stack(s) segmented in 3-D" in out
    labels = tifffile.imread(tmp_path / "o" / "stack_labels.tif")
    assert labels.shape == truth.shape and labels.max() > 0
    rows = list(csv.DictReader((tmp_path / "o" / "stack_instances.csv").read_text().splitlines()))
    assert len(rows) == len(np.unique(labels)) - 1
    assert sum(int(r["volume"]) for r in rows) == int((labels > 0).sum())
    entry, = json.loads((tmp_path / "o" / "images.json").read_text())
    assert entry["depth"] == 10 and entry["nuclei"] == int(labels.max())
    assert (tmp_path / "o" / "stack_overlay.png").is_file() and (tmp_path / "o" / "failed.txt").is_file()
    stats = match_instances(volume_overlaps(truth, labels.astype(np.int64)))  # the file round-trips to metrics
    assert stats.tp.sum() > 0
    code, _, err = cli(capsys, "predict", tmp_path / "stack.tif", "--3d", "--z", "2", "--out", tmp_path / "z")
    assert code == 2 and "--z" in err
    code, _, err = cli(capsys, "predict", tmp_path / "stack.tif", "--zarr", "--out", tmp_path / "z")
    assert code == 2 and "--zarr is for --3d" in err and err.count("\n") == 1


def test_3d_overlaps_counted_plane_by_plane_equal_the_whole_volumes_joint_histogram(tmp_path):
    from maskrcnn.metrics import label_overlaps
    from maskrcnn.prediction.plane_store import PlaneStore

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 7, (6, 20, 30)).astype(np.uint16)
    pred = rng.integers(0, 9, (6, 20, 30)) * 1000  # sparse, large ids
    pred[2] = 0  # a plane with nothing predicted
    whole = label_overlaps(truth.reshape(-1, 30), pred.reshape(-1, 30))
    store = PlaneStore(pred.shape, tmp_path)
    try:
        for z, plane in enumerate(pred):
            store[z] = plane
        planes = volume_overlaps(truth, store)  # read a plane at a time from disk
    finally:
        store.close()
    assert np.array_equal(planes.true_ids, whole.true_ids) and np.array_equal(planes.pred_ids, whole.pred_ids)
    assert np.allclose(planes.matrix(), whole.matrix()) and len(planes.iou) == len(whole.iou)
    empty = volume_overlaps(np.zeros((2, 4, 4), np.int32), np.zeros((2, 4, 4), np.int32))
    assert len(empty.true_ids) == len(empty.pred_ids) == len(empty.iou) == 0
    with pytest.raises(ValueError, match="differ in size"):
        volume_overlaps(truth, pred[:, :10])


@pytest.mark.slow
def test_evaluate_3d_reading_and_keeping_planes_one_at_a_time_scores_as_in_memory(tmp_path, monkeypatch):
    import tifffile

    import maskrcnn.prediction.evaluate_3d as evaluate_3d
    import maskrcnn.prediction.volume as volume
    from maskrcnn.data.lazy_stack import LazyStack
    from maskrcnn.prediction.evaluate_3d import evaluate_stacks
    from maskrcnn.prediction.plane_store import PlaneStore
    from maskrcnn.prediction.predict import Predictor

    image, truth = synth_stack((6, 64, 64), np.random.default_rng(2), Stack(count=5, diameter=18.0))
    for sub, array in (("images", image), ("masks", truth.astype(np.uint16))):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "s.tif", array, metadata={"axes": "ZYX"})
    predictor = Predictor.from_weights("nuclei", "cpu", engine="torch")
    whole = evaluate_stacks(predictor, tmp_path)
    opened, kept = [], []
    original_open, original_segment = evaluate_3d.open_stack, evaluate_3d.segment_stack

    def spy_open(*args, **kwargs):
        opened.append(original_open(*args, **kwargs))
        return opened[-1]

    def spy_segment(*args, **kwargs):
        kept.append(original_segment(*args, **kwargs).labels)
        return volume.VolumeResult(kept[-1], None, [])

    monkeypatch.setattr(evaluate_3d, "open_stack", spy_open)
    monkeypatch.setattr(evaluate_3d, "segment_stack", spy_segment)
    monkeypatch.setattr(volume, "labels_fit", lambda *a, **k: False)  # as if the labels outgrew the budget
    planes = evaluate_stacks(predictor, tmp_path, lazy_from=0)
    assert [type(v) for v in opened] == [LazyStack, LazyStack] and isinstance(kept[0], PlaneStore)
    assert planes == whole and whole.overall.tp > 0
    assert not kept[0].path.exists()  # the temporary plane store is gone


@pytest.mark.slow
def test_evaluate_3d_scores_the_predicted_labels_as_truth_perfectly_and_counts_a_missed_nucleus(tmp_path, capsys):
    """predict --3d's label image (its OME-Zarr) round-trips through evaluate --3d: as the truth it
    scores 1.0; with one nucleus added to the truth that nothing predicts, acc@0.5 is n / (n + 1) by hand."""
    import json
    import shutil

    import tifffile

    from cli_helpers import cli

    image, _ = synth_stack((8, 72, 72), np.random.default_rng(5), Stack(count=5, diameter=18.0))
    # a dark band beside the stack, far from its nuclei: room for a nucleus the model cannot see
    image = np.pad(image, ((0, 0), (0, 0), (0, 32)), constant_values=int(image.min()))
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    tifffile.imwrite(data / "images" / "s.tif", image, metadata={"axes": "ZYX"})
    flags = ["--weights", "nuclei", "--device", "cpu", "--no-progress"]
    assert cli(capsys, "predict", data / "images" / "s.tif", "--3d", "--zarr", "--out", tmp_path / "o", *flags)[0] == 0
    predicted = tifffile.imread(tmp_path / "o" / "s_labels.tif")
    n = int(predicted.max())
    assert n >= 2 and not predicted[:, :, 82:].any()
    shutil.copytree(tmp_path / "o" / "s_labels.ome.zarr", data / "masks" / "s.ome.zarr")  # the OME-Zarr labels as truth
    code, out, err = cli(capsys, "evaluate", "--3d", "--data", data, "--out", tmp_path / "r.json", *flags)
    assert code == 0, err
    overall = json.loads((tmp_path / "r.json").read_text())["overall"]
    assert (overall["accuracy_50"], overall["dsb_score"], overall["tp"], overall["fp"]) == (1.0, 1.0, n, 0)
    shutil.rmtree(data / "masks" / "s.ome.zarr")

    truth = predicted.astype(np.int32)
    truth[2:6, 30:38, 90:98] = n + 1  # a nucleus in the dark band, 4 planes deep
    tifffile.imwrite(data / "masks" / "s.tif", truth, metadata={"axes": "ZYX"})
    assert cli(capsys, "evaluate", "--3d", "--data", data, "--out", tmp_path / "r.json", *flags)[0] == 0
    stack, = json.loads((tmp_path / "r.json").read_text())["stacks"]
    assert (stack["truth"], stack["tp"], stack["fn"]) == (n + 1, n, 1)
    assert stack["accuracy_50"] == pytest.approx(n / (n + 1)) and stack["f1_50"] == pytest.approx(2 * n / (2 * n + 1))

    tifffile.imwrite(data / "masks" / "s.tif", truth[:, :40], metadata={"axes": "ZYX"})
    code, _, err = cli(capsys, "evaluate", "--3d", "--data", data, *flags)
    assert code == 2 and err.count("\n") == 1 and "s.tif" in err and "labels of shape" in err


@pytest.mark.slow
def test_predict_3d_by_the_orthogonal_views_writes_labels_of_the_stack(tmp_path, capsys):
    import json

    import tifffile

    from cli_helpers import cli

    image, truth = synth_stack((8, 64, 64), np.random.default_rng(7), Stack(count=4, diameter=20.0, anisotropy=2.0))
    tifffile.imwrite(tmp_path / "stack.tif", image, metadata={"axes": "ZYX"})
    flags = ["--3d", "--weights", "nuclei", "--device", "cpu", "--no-progress"]
    code, out, err = cli(capsys, "predict", tmp_path / "stack.tif", "--out", tmp_path / "o", "--3d-method", "ortho",
                         "--anisotropy", "2", *flags)
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "o" / "stack_labels.tif")
    assert labels.shape == truth.shape
    assert match_instances(volume_overlaps(truth, labels.astype(np.int64))).tp.sum() > 0  # a mechanism check
    assert json.loads((tmp_path / "o" / "images.json").read_text())[0]["anisotropy"] == 2.0
    code, _, err = cli(capsys, "predict", tmp_path / "stack.tif", "--out", tmp_path / "b", "--anisotropy", "0", *flags)
    assert code == 2 and err.count("\n") == 1 and "--anisotropy" in err


def test_a_thick_fluorescence_stack_gets_the_fluorescence_model():
    """The maximum projection of a thick, crowded stack is bright all over, like brightfield; the
    model is chosen on the middle plane instead."""
    from maskrcnn.prediction.choice import builtin_for
    from maskrcnn.prediction.volume import choice_plane

    image, _ = synth_stack((100, 128, 128), np.random.default_rng(5), Stack(count=330, diameter=20.0))
    assert builtin_for(image.max(axis=0)) == "he"  # what the projection would have chosen
    assert builtin_for(choice_plane(image)) == "nuclei"


def test_a_stacks_scale_is_estimated_on_its_planes_not_a_fixed_one():
    from maskrcnn.prediction.diameter import AutoScale
    from maskrcnn.prediction.volume import stack_scaling

    image, _ = synth_stack((12, 256, 256), np.random.default_rng(6), Stack(count=60, diameter=40.0))
    normalise = lambda plane: torch.from_numpy(plane[None] / float(image.max()))  # noqa: E731
    found = stack_scaling(AutoScale(20.0), image, normalise)
    assert found.source == "objects" and found.scale < 0.8  # 40 px nuclei are shrunk toward 20 px
    assert stack_scaling(1.5, image, normalise).scale == 1.5
