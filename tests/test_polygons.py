"""Instance outlines along pixel edges (maskrcnn.outputs.polygons) and the files made of them: ImageJ ROI
zips for Fiji and GeoJSON for QuPath (maskrcnn.outputs.outlines, ``predict --rois --geojson``).

Every check rasterises a polygon the way Fiji and QuPath do, pixel centres inside it, with a
library of its own (matplotlib's Path, shapely), and compares with the instance's pixels: the
same, holes filled.
"""

from __future__ import annotations

import csv
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from roifile import ROI_TYPE, roiread

from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.presets import nuclei_config
from maskrcnn.data.io import read_label_image
from maskrcnn.data.writers import write_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.outputs.files import TABLE_FIELDS
from maskrcnn.outputs.outlines import geojson_collection, roi_name, write_roi_zip
from maskrcnn.outputs.polygons import closed, label_outlines

from cli_helpers import cli
from conftest import TINY_RUN

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape as geojson_shape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers ------------------------------------------------------------------------------------
def pixel_centres(shape: tuple[int, int]) -> np.ndarray:
    """(H * W, 2) x, y centres of the pixels, row by row."""
    ys, xs = np.indices(shape)
    return np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)


def rasterise(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies inside any of the rings (matplotlib's point-in-path)."""
    inside = np.zeros(shape[0] * shape[1], bool)
    for ring in rings:
        ring = np.asarray(ring, float)
        if not np.array_equal(ring[0], ring[-1]):
            ring = closed(ring)
        inside |= MplPath(ring, closed=True).contains_points(pixel_centres(shape))
    return inside.reshape(shape)


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: all but the pixels reached from the border through 4-connected
    pixels outside the mask."""
    outside = np.pad(~mask, 1)
    reached = np.zeros_like(outside)
    reached[0, :] = reached[-1, :] = reached[:, 0] = reached[:, -1] = True
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if np.array_equal(grown, reached):
            return ~reached[1:-1, 1:-1]
        reached = grown


def assert_outlines_exact(labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Each instance's rings rasterise to exactly its pixels, holes filled; returns the outlines."""
    outlines = label_outlines(labels)
    assert sorted(outlines) == sorted(set(np.unique(labels).tolist()) - {0})
    for i, rings in outlines.items():
        np.testing.assert_array_equal(rasterise(rings, labels.shape), filled(labels == i), err_msg=f"id {i}")
    return outlines


def contents(path) -> dict[str, bytes] | bytes:
    """A file's bytes; a zip's entries and their bytes (the entries' times differ between runs)."""
    if path.suffix != ".zip":
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def disc(shape, cy, cx, ry, rx) -> np.ndarray:
    ys, xs = np.indices(shape)
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def blobs(rng: np.random.Generator, shape=(40, 48), count=8) -> np.ndarray:
    """A label image of random overlapping ellipses, later ones over earlier ones (cut, even split)."""
    labels = np.zeros(shape, np.int32)
    for i in range(1, count + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        labels[disc(shape, cy, cx, rng.uniform(0.6, 9), rng.uniform(0.6, 9))] = i
    return labels


# --- tracing ------------------------------------------------------------------------------------
def test_a_single_pixel_is_its_square():
    labels = np.zeros((4, 5), np.int32)
    labels[2, 3] = 7
    (ring,), = label_outlines(labels).values()
    np.testing.assert_array_equal(ring, [[3, 2], [4, 2], [4, 3], [3, 3]])


def test_an_l_shape_has_its_six_corners_and_no_collinear_vertex():
    labels = np.zeros((7, 7), np.int32)
    labels[1:6, 1:3] = 1
    labels[4:6, 3:6] = 1
    (ring,), = assert_outlines_exact(labels).values()
    assert len(ring) == 6
    np.testing.assert_array_equal(ring, [[1, 1], [3, 1], [3, 4], [6, 4], [6, 6], [1, 6]])


def test_rings_run_along_pixel_edges_without_collinear_vertices_and_enclose_their_area():
    labels = blobs(np.random.default_rng(1), count=12)
    for i, rings in label_outlines(labels).items():
        for ring in rings:
            assert ring.dtype.kind == "i"
            step = np.roll(ring, -1, axis=0) - ring
            assert ((step == 0).sum(axis=1) == 1).all()  # each side is horizontal or vertical
            turn = step[:, 0] * np.roll(step, -1, axis=0)[:, 1] - step[:, 1] * np.roll(step, -1, axis=0)[:, 0]
            assert (turn != 0).all()  # every vertex is a corner
        x, y = rings[0][:, 0], rings[0][:, 1]
        twice_area = (x * np.roll(y, -1) - np.roll(x, -1) * y).sum()
        assert twice_area == 2 * filled(labels == i).sum() or len(rings) > 1  # positive: clockwise on screen


@pytest.mark.parametrize("seed", range(6))
def test_random_ellipses_cut_by_each_other_rasterise_back_exactly(seed):
    assert_outlines_exact(blobs(np.random.default_rng(seed)))


def test_random_noise_instances_rasterise_back_exactly():
    rng = np.random.default_rng(7)
    labels = (rng.random((30, 30)) < 0.55) * rng.integers(1, 5, (30, 30))
    assert_outlines_exact(labels.astype(np.int32))


def test_pixels_touching_diagonally_are_one_self_touching_ring():
    labels = np.array([[1, 0, 0, 1],
                       [0, 1, 1, 0],
                       [0, 1, 0, 0],
                       [1, 0, 1, 1]], np.int32)
    outlines = assert_outlines_exact(labels)
    assert len(outlines[1]) == 1


def test_two_instances_in_a_checkerboard_each_get_one_ring():
    labels = (np.indices((6, 6)).sum(axis=0) % 2 + 1).astype(np.int32)
    outlines = assert_outlines_exact(labels)
    assert [len(rings) for rings in outlines.values()] == [1, 1]


def test_the_exterior_covers_holes_and_islands_in_them():
    labels = np.zeros((9, 9), np.int32)
    labels[1:8, 1:8] = 1
    labels[3:6, 3:6] = 0
    labels[4, 4] = 1  # an island of the same instance inside its hole
    labels[2, 5] = 2  # another instance's pixel inside instance 1: a hole of 1 all the same, covered
    outlines = assert_outlines_exact(labels)
    assert len(outlines[1]) == 1 and len(outlines[1][0]) == 4


def test_an_instance_in_pieces_gets_one_ring_per_piece_largest_first():
    labels = np.zeros((8, 10), np.int32)
    labels[1:4, 1:4] = 3
    labels[5:7, 6:9] = 3
    labels[6, 1] = 3
    outlines = assert_outlines_exact(labels)
    assert [len(r) for r in outlines[3]] == [4, 4, 4]
    assert [int(r[0, 0]) for r in outlines[3]] == [1, 6, 1]  # 9, 6, 1 pixels


def test_instances_on_the_image_border_and_an_empty_image():
    labels = np.ones((5, 6), np.int32)
    labels[:, 3:] = 2
    outlines = assert_outlines_exact(labels)
    np.testing.assert_array_equal(outlines[1][0], [[0, 0], [3, 0], [3, 5], [0, 5]])
    assert label_outlines(np.zeros((3, 3), np.int32)) == {}


# --- the files, from outlines -------------------------------------------------------------------------
def test_roi_names_are_zero_padded_ids():
    assert [roi_name(1, 3), roi_name(42, 9999), roi_name(7, 10000), roi_name(12345, 12345)] == \
        ["0001", "0042", "00007", "12345"]


def test_roi_zip_holds_a_polygon_per_instance_and_a_composite_for_one_in_pieces(tmp_path):
    labels = blobs(np.random.default_rng(3), count=6)
    labels[0, 0], labels[-1, -1] = 7, 7  # instance 7 in two pieces
    outlines = label_outlines(labels)
    write_roi_zip(tmp_path / "a_rois.zip", outlines, 7)
    rois = roiread(tmp_path / "a_rois.zip")
    assert [roi.name for roi in rois] == [roi_name(i, 7) for i in sorted(outlines)]
    for roi in rois:
        i = int(roi.name)
        assert roi.roitype == (ROI_TYPE.RECT if i == 7 else ROI_TYPE.POLYGON) and roi.composite == (i == 7)
        np.testing.assert_array_equal(rasterise(roi.coordinates(multi=True), labels.shape), filled(labels == i))


def test_geojson_polygons_are_valid_closed_counter_clockwise_and_exact():
    labels = blobs(np.random.default_rng(4), count=6)
    labels[0, 0], labels[-1, -1] = 7, 7
    rows = [{"id": i, "class": "nucleus", "score": 0.5, "area": int((labels == i).sum())} for i in range(1, 8)]
    rows = [row for row in rows if row["area"]]
    collection = geojson_collection(label_outlines(labels), rows)
    assert len(collection["features"]) == len(rows)
    for feature, row in zip(collection["features"], rows):
        geometry = geojson_shape(feature["geometry"])
        rings = feature["geometry"]["coordinates"]
        rings = [rings[0]] if feature["geometry"]["type"] == "Polygon" else [p[0] for p in rings]
        assert all(ring[0] == ring[-1] for ring in rings)
        assert feature["geometry"]["type"] == ("MultiPolygon" if row["id"] == 7 else "Polygon")
        one_piece = feature["geometry"]["type"] == "Polygon"
        assert not one_piece or geometry.exterior.is_ccw  # RFC 7946's right-hand rule, in x-y terms
        assert geometry.area == filled(labels == row["id"]).sum()
        centres = pixel_centres(labels.shape)
        inside = shapely.contains_xy(geometry, centres[:, 0], centres[:, 1]).reshape(labels.shape)
        np.testing.assert_array_equal(inside, filled(labels == row["id"]))
        assert feature["properties"]["measurements"] == {k: v for k, v in row.items() if k != "class"}


# --- predict --rois --geojson -------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny model with open thresholds: it finds some instances anywhere."""
    folder = tmp_path_factory.mktemp("model")
    cfg = nuclei_config(**TINY_RUN)
    torch.manual_seed(0)
    save_checkpoint(folder / "m.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    return folder / "m.pt"


@pytest.fixture(scope="module")
def predicted(weights, tmp_path_factory):
    """One image predicted with --rois --geojson: (its folder, the output folder)."""
    folder = tmp_path_factory.mktemp("predict")
    image = np.full((64, 64), 30, np.uint8)
    for cy, cx, r in ((16, 18, 7), (40, 44, 9), (48, 14, 5), (20, 50, 6)):
        image[disc(image.shape, cy, cx, r, r)] = 200
    write_image(folder / "cells.png", image)
    code = main([str(a) for a in ("predict", folder / "cells.png", "--weights", weights, "--out", folder / "out",
                                  "--rois", "--geojson", "--device", "cpu", "--precision", "fp32",
                                  "--no-progress")])
    assert code == 0
    return folder, folder / "out"


@pytest.mark.slow
def test_predict_writes_an_roi_per_instance_that_is_the_instance(predicted):
    _, out = predicted
    labels = read_label_image(out / "cells_labels.png")
    count = int(labels.max())
    assert count > 0, "the untrained model with open thresholds should find something"
    rois = roiread(out / "cells_rois.zip")
    assert [roi.name for roi in rois] == [roi_name(i, count) for i in range(1, count + 1)]
    for roi in rois:
        instance = labels == int(roi.name)
        mask = rasterise(roi.coordinates(multi=True), labels.shape)
        assert (mask & instance).sum() / (mask | instance).sum() >= 0.95
        np.testing.assert_array_equal(mask, filled(instance))


@pytest.mark.slow
def test_predict_writes_geojson_qupath_detections_with_the_table_measurements(predicted, weights):
    _, out = predicted
    labels = read_label_image(out / "cells_labels.png")
    with open(out / "cells_instances.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    collection = json.loads((out / "cells.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(rows) == labels.max()
    centres = pixel_centres(labels.shape)
    for feature, row in zip(features, rows):
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"] == {"name": "nucleus"} == {"name": row["class"]}
        measurements = props["measurements"]
        assert set(measurements) == set(TABLE_FIELDS) - {"class"}
        assert {k: float(v) for k, v in measurements.items()} == {k: float(row[k]) for k in measurements}
        assert measurements["id"] == int(props["name"]) == int(row["id"])
        geometry = geojson_shape(feature["geometry"])
        inside = shapely.contains_xy(geometry, centres[:, 0], centres[:, 1]).reshape(labels.shape)
        instance = labels == measurements["id"]
        assert (inside & instance).sum() / (inside | instance).sum() >= 0.95
        np.testing.assert_array_equal(inside, filled(instance))


@pytest.mark.slow
@pytest.mark.parametrize("flag, missing", [("--rois", "cells_rois.zip"), ("--geojson", "cells.geojson")])
def test_skip_existing_predicts_again_an_image_whose_outline_file_is_missing(predicted, weights, tmp_path, capsys,
                                                                             flag, missing):
    folder, out = predicted
    again = tmp_path / "out"
    shutil.copytree(out, again)
    args = ("predict", folder / "cells.png", "--weights", weights, "--out", again, "--device", "cpu",
            "--precision", "fp32", "--no-progress", "--skip-existing")
    code, stdout, _ = cli(capsys, *args, flag)
    assert code == 0 and "1 skipped" in stdout  # all there: kept
    (again / missing).unlink()
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and "1 skipped" in stdout  # not asked for: its absence does not matter
    code, stdout, _ = cli(capsys, *args, flag)
    assert code == 0 and stdout.startswith("1 image(s) segmented;") and "skipped" not in stdout
    assert contents(again / missing) == contents(out / missing)
