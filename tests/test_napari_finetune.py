"""The napari widget's fine-tuning on labels corrected in napari (headless, as tests/test_napari.py):
it trains from the current model in a worker thread, then re-segments with the result."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from napari_helpers import JOB_TIMEOUT_MS, nuclei, tiny_model, viewer, wait_done, widget  # noqa: F401

from maskrcnn.napari._core import ArrayReader
from maskrcnn.prediction.predict import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_array_reader_turns_label_ids_into_masks():
    labels = np.zeros((8, 9), np.int32)
    labels[1:3, 1:3], labels[5:7, 2:8] = 7, 2  # ids need not be 1..K
    reader = ArrayReader(np.zeros((8, 9), np.uint8), labels, ["background", "nucleus"])
    sample = reader[0]
    assert sample.masks.shape == (2, 8, 9) and sample.masks.dtype == bool
    assert sample.masks[0].sum() == 12 and sample.masks[1].sum() == 4  # id 2, then id 7
    assert sample.labels.tolist() == [1, 1] and len(reader) == 2


@pytest.mark.slow
def test_fine_tune_on_corrected_labels_then_resegment(qtbot, widget, viewer, tiny_model, tmp_path):
    image, truth = nuclei(96, seed=2)
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth, name="corrected")
    assert widget.labels_combo.currentText() == "corrected"
    widget.minutes_spin.setValue(1.0)
    widget.steps_spin.setValue(2)
    widget.run_dir_edit.setText(str(tmp_path / "runs"))
    widget.diameter_spin.setValue(30.0)  # the tiny model states no diameter: fine-tuning does not use one
    progress = []
    widget._signals.progress.connect(lambda p, text: progress.append(text))

    assert widget.fine_tune() is not None and widget.busy
    wait_done(qtbot, widget)
    assert widget.work_threads[-1] != threading.get_ident()
    assert any(text.startswith("training: step 2") for text in progress)
    checkpoint = Path(widget.model_combo.currentText())
    assert checkpoint.name == "last.pt" and checkpoint.parent.parent == tmp_path / "runs"
    assert (checkpoint.parent / "metrics.jsonl").is_file()
    assert "fine-tuned 2 steps" in widget.status.text()

    layer = viewer.layers["cells masks (fine-tuned)"]
    expected = Predictor.from_weights(checkpoint)(image)  # the fine-tuned model, as predict runs it
    np.testing.assert_array_equal(layer.data, expected.label_image.numpy())
    assert layer.metadata["maskrcnn"]["model"] == str(checkpoint)
    # the fine-tuned model sees images as they are: the diameter is back to auto, and Segment reuses it
    assert widget.diameter_spin.value() == 0.0 and widget._predictor[0] == widget._model_key()


def test_fine_tuning_needs_instances_and_a_trainable_model(qtbot, widget, viewer, tmp_path):
    viewer.add_image(np.zeros((64, 64), np.uint8), name="cells")
    viewer.add_labels(np.zeros((64, 64), np.int32), name="empty")
    widget.steps_spin.setValue(1)
    widget.run_dir_edit.setText(str(tmp_path / "runs"))
    widget.fine_tune()
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    assert "the labels hold no instances to learn from" in widget.status.text()


@pytest.mark.slow
def test_stop_ends_the_fine_tuning_early_and_still_resegments(qtbot, widget, viewer, tmp_path):
    image, truth = nuclei(96, seed=4)
    viewer.add_image(image, name="cells")
    viewer.add_labels(truth, name="corrected")
    widget.minutes_spin.setValue(5.0)  # no step limit: only Stop ends it soon
    widget.run_dir_edit.setText(str(tmp_path / "runs"))
    progress = []
    widget._signals.progress.connect(lambda p, text: progress.append(text))
    widget.fine_tune()
    qtbot.waitUntil(lambda: any(t.startswith("training: step") for t in progress), timeout=JOB_TIMEOUT_MS)
    assert widget.busy  # the viewer's event loop ran while the model trained
    widget.stop()
    wait_done(qtbot, widget)
    assert "(stopped)" in widget.status.text() and "cells masks (fine-tuned)" in viewer.layers
    assert Path(widget.model_combo.currentText()).is_file()
