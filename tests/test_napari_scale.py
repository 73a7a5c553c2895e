"""The napari widget's nucleus diameter and faint-instance floor: the same resize and floor as
``maskrcnn predict --diameter`` and ``--min-contrast``, and the estimate said on the status line
and kept in the layer's metadata (as images.json records it). Headless, as tests/test_napari.py."""

from __future__ import annotations

import numpy as np
import pytest

from napari_helpers import JOB_TIMEOUT_MS, predicted, tiny_model, viewer, wait_done, widget  # noqa: F401 (fixtures)

from maskrcnn.builtin import trained_diameter
from maskrcnn.data.synthetic import synth_nuclei
from maskrcnn.errors import UserError
from maskrcnn.napari import _core as core
from maskrcnn.prediction.choice import ModelChoice
from maskrcnn.prediction.diameter import AutoScale, Scaling

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def large_nuclei() -> np.ndarray:
    """Nuclei about 40 px across: twice the built-in model's trained diameter."""
    image, _ = synth_nuclei(192, np.random.default_rng(3), n_range=(6, 9), diameter_range=(36.0, 44.0))
    return image


def test_load_predictor_applies_a_diameter_and_a_floor_as_predict_does():
    trained = trained_diameter("nuclei")
    predictor = core.load_predictor("nuclei", device="cpu", diameter=2 * trained, min_contrast=0.3)
    assert predictor.scale == pytest.approx(0.5) and predictor.model.cfg.mask_test_min_contrast == 0.3
    own = core.load_predictor("nuclei", device="cpu")
    assert isinstance(own.scale, AutoScale) and own.model.cfg.mask_test_min_contrast == 0.1  # the model's own
    choice = core.load_predictor(core.AUTO_MODEL, device="cpu", diameter=trained / 2, min_contrast=0.0)
    assert isinstance(choice, ModelChoice) and choice.scale == pytest.approx(2.0) and choice.min_contrast == 0.0
    assert choice.predictor("nuclei").model.cfg.mask_test_min_contrast == 0.0


def test_a_diameter_for_a_model_that_states_none_is_refused(tiny_model):  # noqa: F811
    with pytest.raises(UserError, match="tiny.pt: this model does not state the nucleus diameter"):
        core.load_predictor(str(tiny_model), diameter=30.0)
    assert core.load_predictor(str(tiny_model), min_contrast=0.2).scale == 1.0  # its own: the image as it is


def test_scaling_text_says_what_was_estimated_and_done():
    assert core.scaling_text(Scaling(0.5, 40.0, 12, "objects")) == "nucleus diameter 40 px estimated (resized x0.50)"
    assert core.scaling_text(Scaling(1.0, 21.0, 30, "objects")).endswith("(near the model's: not resized)")
    assert core.scaling_text(Scaling(1.0, None, 0, "none")).startswith("too few nuclei")
    assert core.scaling_text(Scaling(0.25)) == "resized x0.25 for the diameter given"
    assert core.scaling_text(Scaling(1.0)) == "" and core.scaling_text(None) == ""


@pytest.mark.slow
def test_widget_estimates_the_diameter_or_takes_the_one_given_like_predict(qtbot, widget, viewer, capsys,  # noqa: F811
                                                                          tmp_path):
    image = large_nuclei()
    viewer.add_image(image, name="large")
    widget.model_combo.setCurrentText("nuclei")
    widget.segment()
    wait_done(qtbot, widget)
    auto = viewer.layers["large masks"]
    sizing = {key: auto.metadata["maskrcnn"][key] for key in ("scale", "diameter", "diameter_from")}
    assert sizing["diameter_from"] == "objects" and 30 < sizing["diameter"] < 55 and sizing["scale"] < 0.8
    assert f"nucleus diameter {sizing['diameter']:.0f} px estimated" in widget.status.text()
    (tmp_path / "auto").mkdir()
    labels, _ = predicted(capsys, tmp_path / "auto", image, "nuclei", "--device", "cpu")
    np.testing.assert_array_equal(auto.data, labels)  # predict's --diameter auto

    widget.diameter_spin.setValue(20.0)  # as given: the built-in model's own size, so not resized
    widget.contrast_spin.setValue(0.0)
    widget.segment()
    wait_done(qtbot, widget)
    given = viewer.layers["large masks [1]"]
    assert given.metadata["maskrcnn"]["diameter_from"] == "given" and given.metadata["maskrcnn"]["scale"] == 1.0
    assert widget._predictor[1].model.cfg.mask_test_min_contrast == 0.0
    (tmp_path / "given").mkdir()
    labels, _ = predicted(capsys, tmp_path / "given", image, "nuclei", "--device", "cpu", "--diameter", "20",
                          "--min-contrast", "0")
    np.testing.assert_array_equal(given.data, labels)
    assert not np.array_equal(given.data, auto.data)  # 40 px nuclei at twice the model's size come out otherwise


@pytest.mark.slow
def test_widget_refuses_a_diameter_its_model_cannot_use(qtbot, widget, viewer, tiny_model):  # noqa: F811
    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")
    widget.diameter_spin.setValue(25.0)
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    assert "does not state the nucleus diameter" in widget.status.text() and len(viewer.layers) == 1
