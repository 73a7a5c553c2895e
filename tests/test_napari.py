"""The napari plugin (maskrcnn/napari), headless: the dock widget on a napari ``ViewerModel`` (layers,
dims, camera: everything the widget uses, without the OpenGL canvas, which Qt's offscreen platform
cannot create), pytest-qt's ``qtbot`` for the event loop, and a real ``napari.Viewer`` (which builds
without OpenGL as long as it draws no layer) for the manifest's dock widget. napari's own pytest
plugin (``make_napari_viewer``) is not needed: ``-p no:napari`` leaves the other tests without its
autouse fixtures.

The widget's Labels layer must be what ``maskrcnn predict`` writes for the same image and model,
whole and tiled, and its features the rows of NAME_instances.csv. Fine-tuning:
tests/test_napari_finetune.py; the diameter and floor: tests/test_napari_scale.py.
"""

from __future__ import annotations

import csv
import importlib.metadata
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_helpers import (JOB_TIMEOUT_MS, assert_features_match, napari, nuclei, predicted, tiny_model,  # noqa: F401 (fixtures)
                            viewer, wait_done, widget)

from cli_helpers import cli

from maskrcnn.napari import _sample
from maskrcnn.napari._core import auto_tile, tile_count
from maskrcnn.napari._widget import MaskRCNNWidget

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MANIFEST = Path(__file__).resolve().parents[1] / "maskrcnn" / "napari" / "napari.yaml"


# --- the manifest and the sample data ------------------------------------------------------------
def test_manifest_declares_the_widget_and_the_samples():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "maskrcnn"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Mask R-CNN"]
    assert {s.key for s in manifest.contributions.sample_data} == {"nuclei", "nuclei_large"}
    points = importlib.metadata.entry_points(group="napari.manifest")
    assert any(p.value == "maskrcnn.napari:napari.yaml" for p in points), "pip install -e . registers the plugin"


def _plugin_registered() -> None:
    from npe2 import PluginManager, PluginManifest

    manager = PluginManager.instance()
    if "maskrcnn" not in manager:  # an installation from before the entry point existed
        manager.register(PluginManifest.from_file(MANIFEST))


@pytest.mark.slow
def test_sample_data_opens_through_the_manifest(viewer):
    _plugin_registered()
    layers = viewer.open_sample("maskrcnn", "nuclei")
    image, truth = (layer for layer in viewer.layers)
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    assert image.data.shape == (256, 256) and image.data.dtype == np.uint8
    assert truth.data.shape == (256, 256) and truth.data.max() >= 5
    np.testing.assert_array_equal(image.data, _sample.synthetic_nuclei()[0][0])  # a fixed seed: the same every time


@pytest.mark.slow
def test_dock_widget_opens_from_the_manifest_in_a_real_viewer(qtbot):
    _plugin_registered()
    real = napari.Viewer(show=False)  # builds headless: OpenGL is only needed to draw layers
    try:
        _, dock = real.window.add_plugin_dock_widget("maskrcnn", "Mask R-CNN")
        assert isinstance(dock, MaskRCNNWidget)  # napari gives it a proxy of the viewer: public API only
        assert dock.model_combo.currentText() == "auto" and dock.image_combo.count() == 0
    finally:
        real.close()


# --- segmentation ---------------------------------------------------------------------------------
def test_automatic_tiling_above_2048_pixels():
    assert auto_tile((2048, 2048)) is None
    assert auto_tile((2049, 300)) == 1024 and auto_tile((300, 3000, 3)) == 1024
    assert auto_tile((100, 100), tile=64) == 64
    assert tile_count((2048, 2048), 1024, 128) == 9 and tile_count((100, 100), None, 128) == 1


@pytest.mark.slow
def test_widget_segments_in_a_worker_thread_like_predict(qtbot, widget, viewer, tiny_model, capsys, tmp_path):
    image, _ = nuclei(96)
    viewer.add_image(image, name="cells")
    assert widget.image_combo.currentText() == "cells"  # the active layer
    progress = []
    widget._signals.progress.connect(lambda p, text: progress.append(text))

    worker = widget.segment()
    assert worker is not None and widget.busy
    assert len(viewer.layers) == 1  # the call returned before the work was done
    wait_done(qtbot, widget)
    assert widget.work_threads and widget.work_threads[-1] != threading.get_ident()
    assert any(text.startswith("loading") for text in progress)

    layer = viewer.layers["cells masks"]
    assert widget.output_layer is layer and type(layer).__name__ == "Labels"
    labels, rows = predicted(capsys, tmp_path, image, tiny_model)
    assert labels.max() > 0  # open thresholds: the untrained model finds something
    np.testing.assert_array_equal(layer.data, labels)
    assert_features_match(layer, rows)
    assert widget.table.rowCount() == len(rows)
    assert layer.metadata["maskrcnn"]["model"] == str(tiny_model) and layer.metadata["maskrcnn"]["tile"] is None

    widget.segment()  # the model is loaded once
    assert widget.fine_tune() is None and widget.status.text().startswith("busy")  # one job at a time
    wait_done(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["cells masks [1]"].data, labels)
    assert sum(text.startswith("loading") for text in progress) == 1


@pytest.mark.slow
def test_widget_segments_in_tiles_like_predict_tile(qtbot, widget, viewer, tiny_model, capsys, tmp_path):
    image, _ = nuclei((150, 170), seed=1)
    viewer.add_image(image, name="big")
    widget.tile_spin.setValue(96)
    widget.overlap_spin.setValue(32)
    progress = []
    widget._signals.progress.connect(lambda p, text: progress.append(text))
    widget.segment()
    wait_done(qtbot, widget)
    assert tile_count(image.shape, 96, 32) == 6 and "segmenting tile 6 of 6" in progress  # 2 rows of 3
    labels, rows = predicted(capsys, tmp_path, image, tiny_model, "--tile", 96, "--overlap", 32)
    layer = viewer.layers["big masks"]
    np.testing.assert_array_equal(layer.data, labels)
    assert_features_match(layer, rows)


@pytest.mark.slow
def test_widget_segments_the_plane_in_view_of_a_stack(qtbot, widget, viewer, tiny_model, capsys, tmp_path):
    planes = [nuclei(64, seed=s)[0] for s in range(3)]
    stack = viewer.add_image(np.stack(planes), name="stack", scale=(2.0, 0.5, 0.5))
    viewer.dims.set_current_step(0, 1)
    widget.segment()
    wait_done(qtbot, widget)
    layer = viewer.layers["stack masks"]
    assert layer.data.shape == (3, 64, 64) and tuple(layer.scale) == tuple(stack.scale)
    labels, _ = predicted(capsys, tmp_path, planes[1], tiny_model)
    np.testing.assert_array_equal(layer.data[1], labels)
    assert not layer.data[0].any() and not layer.data[2].any()
    assert layer.metadata["maskrcnn"]["plane"] == (1,)


@pytest.mark.slow
def test_widget_segments_a_stack_in_3d_like_predict_3d(qtbot, widget, viewer, tiny_model, capsys, tmp_path):
    """The 3-D switch: every plane, joined into 3-D instances; the labels, table and a row click as
    ``maskrcnn predict --3d`` writes them (NAME_labels.tif, NAME_instances.csv)."""
    import tifffile

    base, _ = nuclei(64, seed=4)
    # nuclei through every plane; 6 planes: a plain TIFF of at most 4 pages reads as channels
    stack = np.stack([base, base, np.roll(base, 1, axis=1), base, base, np.roll(base, -1, axis=0)])
    viewer.add_image(stack, name="zstack", scale=(2.0, 0.5, 0.5))
    widget.volume_check.setChecked(True)
    progress = []
    widget._signals.progress.connect(lambda p, text: progress.append(text))
    widget.segment()
    wait_done(qtbot, widget)
    layer = viewer.layers["zstack 3-D masks"]
    tifffile.imwrite(tmp_path / "zstack.tif", stack, photometric="minisblack")
    code, _, err = cli(capsys, "predict", tmp_path / "zstack.tif", "--3d", "--weights", tiny_model,
                       "--out", tmp_path / "pred", "--no-progress")
    assert code == 0, err
    want = tifffile.imread(tmp_path / "pred" / "zstack_labels.tif")
    assert layer.data.shape == (6, 64, 64) and tuple(layer.scale) == (2.0, 0.5, 0.5)
    assert want.max() > 0  # the untrained model finds something in every plane, joined in 3-D
    np.testing.assert_array_equal(layer.data, want)
    with open(tmp_path / "pred" / "zstack_instances.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(layer.features["index"]) == [int(r["id"]) for r in rows]
    assert [str(v) for v in layer.features["volume"]] == [r["volume"] for r in rows]
    assert widget.table.fields[:2] == ["id", "volume"] and widget.table.rowCount() == len(rows)
    assert any("plane 6 of 6" in text for text in progress)
    widget._on_row_clicked(0, 0)  # the plane through the instance's centroid comes into view
    row = next(r for r in rows if int(r["id"]) == widget.table.label_at(0))
    assert viewer.dims.point[0] == pytest.approx(2.0 * float(row["centroid_z"]), abs=2.0)

    viewer.add_image(np.zeros((2, 3, 16, 16), np.uint8), name="4d")
    assert widget.segment() is None and "one z axis" in widget.status.text()


@pytest.mark.slow
def test_widget_segments_an_rgb_image_like_predict(qtbot, widget, viewer, tiny_model, capsys, tmp_path):
    gray, _ = nuclei(80, seed=3)
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    layer = viewer.add_image(rgb, name="rgb")
    assert layer.rgb
    widget.segment()
    wait_done(qtbot, widget)
    labels, rows = predicted(capsys, tmp_path, rgb, tiny_model)
    np.testing.assert_array_equal(viewer.layers["rgb masks"].data, labels)
    assert_features_match(viewer.layers["rgb masks"], rows)  # mean intensity over the colour channels


def test_widget_says_what_is_missing_and_starts_nothing(widget, viewer, tmp_path):
    assert widget.segment() is None and "open or choose an image layer" in widget.status.text()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")
    widget.model_combo.setCurrentText(str(tmp_path / "missing.pt"))
    assert widget.fine_tune() is None and "labels layer" in widget.status.text()
    assert not widget.busy


def test_a_bad_model_path_is_reported_on_the_status_line(qtbot, widget, viewer, tmp_path):
    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")
    widget.model_combo.setCurrentText(str(tmp_path / "missing.pt"))
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    assert "missing.pt: no built-in model of that name and no such file" in widget.status.text()
    assert len(viewer.layers) == 1
