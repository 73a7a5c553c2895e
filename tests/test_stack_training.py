"""train --3d: the planes (and side views) of Z-stacks with 3-D labels as 2-D samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from maskrcnn.data.stack_reader import StackPlanesReader, stretch_depth
from maskrcnn.errors import DataError


def write_pair(root, name, image, labels, anisotropy=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    metadata = {"axes": "ZYX", **({"PhysicalSizeZ": anisotropy, "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0}
                                  if anisotropy else {})}
    tifffile.imwrite(root / "images" / f"{name}.ome.tif", image, metadata=metadata)
    tifffile.imwrite(root / "masks" / f"{name}.tif", labels)


def box_stack():
    """(6, 20, 30): nucleus 1 a box on z 1..3, nucleus 2 on z 2..4; z 0 and 5 empty."""
    labels = np.zeros((6, 20, 30), np.uint16)
    labels[1:4, 2:8, 3:10] = 1
    labels[2:5, 10:18, 15:27] = 2
    image = (labels > 0).astype(np.uint16) * 1000 + 100
    return image, labels


def test_planes_with_nuclei_are_samples_with_one_instance_per_nucleus_cut(tmp_path):
    image, labels = box_stack()
    write_pair(tmp_path, "a", image, labels)
    reader = StackPlanesReader(tmp_path)
    assert reader.names == [f"a[z={z}]" for z in (1, 2, 3, 4)]  # empty planes 0 and 5 left out
    counts = [len(reader[i].masks) for i in range(len(reader))]
    assert counts == [1, 2, 2, 1]
    sample = reader[1]  # z = 2: both nuclei, in id order
    assert sample.image.shape == (20, 30) and sample.image.dtype == np.uint16
    assert np.array_equal(sample.masks[0], labels[2] == 1) and np.array_equal(sample.masks[1], labels[2] == 2)
    assert list(sample.labels) == [1, 1]


def test_side_views_are_stretched_by_the_anisotropy_from_the_file(tmp_path):
    image, labels = box_stack()
    write_pair(tmp_path, "a", image, labels, anisotropy=2.0)
    reader = StackPlanesReader(tmp_path, side_views=True)
    y_slices = [n for n in reader.names if "[y=" in n]
    x_slices = [n for n in reader.names if "[x=" in n]
    # a stride of ceil(20 / 6) = 4 rows and ceil(30 / 6) = 5 columns, only slices that cut a nucleus
    assert y_slices == [f"a[y={y}]" for y in (4, 12, 16)]
    assert x_slices == [f"a[x={x}]" for x in (5, 15, 20, 25)]
    side = reader[reader.names.index("a[y=12]")]  # cuts nucleus 2 only: z 2..4 becomes rows 4..9 of 12
    assert side.image.shape == (12, 30) and len(side.masks) == 1
    rows = np.flatnonzero(side.masks[0].any(axis=1))
    assert list(rows) == list(range(4, 10))
    assert np.array_equal(np.flatnonzero(side.masks[0].any(axis=0)), np.arange(15, 27))
    assert StackPlanesReader(tmp_path, side_views=True, anisotropy=1.0)[reader.names.index("a[y=12]")].image.shape \
        == (6, 30)  # the flag overrides the file


def test_stretching_keeps_the_dtype_and_maps_ids_to_the_nearest_plane():
    plane = np.array([[0, 10], [100, 110]], np.uint8)
    ids = np.array([[0, 1], [2, 2]])
    tall, tall_ids = stretch_depth(plane, ids, 2.0)
    assert tall.dtype == np.uint8 and tall.shape == (4, 2)
    assert tall[0, 0] == 0 and tall[-1, 0] == 100 and 0 < tall[1, 0] < tall[2, 0] < 100
    assert tall_ids.tolist() == [[0, 1], [0, 1], [2, 2], [2, 2]]


def test_a_label_stack_of_another_shape_is_one_clear_error(tmp_path):
    image, labels = box_stack()
    write_pair(tmp_path, "a", image[:, :, :20], labels)
    reader = StackPlanesReader(tmp_path)
    with pytest.raises(DataError, match=r"labels of shape \(6, 20, 30\) for a stack of \(6, 20, 20\)"):
        reader.check_header(0)


def test_validation_holds_out_whole_stacks_or_a_band_of_a_single_one(tmp_path):
    from maskrcnn.runtime.distributed import DistContext
    from maskrcnn.train.setup import TrainOptions, split_stacks

    image, labels = box_stack()
    for name in ("a", "b", "c", "d", "e"):
        write_pair(tmp_path / "five", name, image, labels)
    opts = TrainOptions(data=str(tmp_path / "five"), out=str(tmp_path / "run"), three_d=True, side_views=True)
    dist = DistContext.from_environment("cpu")
    train, val = split_stacks(opts, dist, tmp_path / "skipped.txt", tmp_path / "skipped.txt")
    stacks_of = lambda reader: {name.split("[")[0] for name in reader.names}  # noqa: E731
    assert len(stacks_of(val)) == 1 and len(stacks_of(train)) == 4 and not stacks_of(train) & stacks_of(val)
    assert any("[y=" in name for name in train.names) and all("[z=" in name for name in val.names)

    write_pair(tmp_path / "one", "a", image, labels)
    opts = TrainOptions(data=str(tmp_path / "one"), out=str(tmp_path / "run"), three_d=True, side_views=True)
    train, val = split_stacks(opts, dist, tmp_path / "skipped.txt", tmp_path / "skipped.txt")
    assert all(s.image.shape[-1] == 24 for s in (train[i] for i in range(len(train))) if "[x=" not in s.name)
    assert {val[i].image.shape for i in range(len(val))} == {(20, 6)}
    assert max(int(n.split("x=")[1][:-1]) for n in train.names if "[x=" in n) < 24  # no ZY slice of the band


def test_side_views_need_3d_data(tmp_path, capsys):
    from maskrcnn.cli.main import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--side-views"]) == 2
    assert "--side-views and --anisotropy are for --3d data" in capsys.readouterr().err


@pytest.mark.slow
def test_train_3d_runs_end_to_end_and_its_model_evaluates_in_3d(tmp_path, capsys):
    """train --3d --side-views from the built-in model on three synthetic stacks (one held out for
    validation by the split), then evaluate --3d of its checkpoint on a fourth stack."""
    from maskrcnn.cli.main import main
    from maskrcnn.data.synthetic_3d import Stack, synth_stack

    data, held = tmp_path / "data", tmp_path / "held"
    for i in range(3):
        image, truth = synth_stack((12, 96, 96), np.random.default_rng(50 + i), Stack(diameter=18.0, count=6))
        write_pair(data, f"s{i}", image, truth.astype(np.uint16), anisotropy=2.0)
    image, truth = synth_stack((12, 96, 96), np.random.default_rng(99), Stack(diameter=18.0, count=6))
    write_pair(held, "h", image, truth.astype(np.uint16), anisotropy=2.0)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--3d", "--side-views", "--init", "nuclei", "--out", str(run),
                 "--iters", "20", "--val-every", "20", "--no-progress", "--device", "cpu"]) == 0
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--data", str(held), "--3d", "--weights", str(run / "last.pt"), "--out",
                 str(tmp_path / "report.json")]) == 0
    assert "all stacks" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["overall"]["truth"] == len(np.unique(truth)) - 1
