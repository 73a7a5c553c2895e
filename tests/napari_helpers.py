"""What the napari tests share (tests/test_napari*.py): Qt's offscreen platform, a tiny model, a
headless viewer and the dock widget on it, and ``maskrcnn predict``'s outputs for comparison.
Importing it skips the importing module when napari or pytest-qt is not installed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Qt reads this when the QApplication is made (pytest-qt's session-wide ``qapp``): no display needed.
# Only Qt reads it, and only if it is unset: a developer's own display setting is kept.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from cli_helpers import cli  # noqa: E402
from conftest import TINY_RUN  # noqa: E402

from maskrcnn.data.io import read_label_image  # noqa: E402
from maskrcnn.data.normalize import Normalizer  # noqa: E402
from maskrcnn.data.synthetic import synth_nuclei  # noqa: E402
from maskrcnn.data.writers import write_image  # noqa: E402
from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from maskrcnn.modeling.model import MaskRCNN  # noqa: E402
from maskrcnn.napari._widget import MaskRCNNWidget  # noqa: E402
from maskrcnn.outputs.files import TABLE_FIELDS  # noqa: E402
from maskrcnn.presets import nuclei_config  # noqa: E402

JOB_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained tiny model with open thresholds: it finds (up to 10) instances anywhere."""
    cfg = nuclei_config(**TINY_RUN)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer(channels=cfg.in_channels).to_dict()))
    return path


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def widget(qtbot, viewer, tiny_model):
    w = MaskRCNNWidget(viewer)
    qtbot.addWidget(w)
    w.model_combo.setCurrentText(str(tiny_model))
    yield w
    if w.worker is not None:  # never leave a job running into the next test
        w.stop()
        qtbot.waitUntil(lambda: not w.busy, timeout=JOB_TIMEOUT_MS)


def nuclei(size, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return synth_nuclei(size, np.random.default_rng(seed), n_range=(4, 8), diameter_range=(8.0, 20.0))


def wait_done(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    assert widget.last_error is None, widget.status.text()


def predicted(capsys, tmp_path, image: np.ndarray, weights, *flags) -> tuple[np.ndarray, list[dict]]:
    """``maskrcnn predict`` in this process: the label image and instance table it writes."""
    src, out = tmp_path / "in", tmp_path / "pred"
    src.mkdir(exist_ok=True)
    write_image(src / "img.png", image)
    code, _, err = cli(capsys, "predict", src / "img.png", "--weights", weights, "--out", out, "--no-progress", *flags)
    assert code == 0, err
    with open(out / "img_instances.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return read_label_image(out / "img_labels.png"), rows


def assert_features_match(layer, rows: list[dict]) -> None:
    features = layer.features
    assert list(features["index"]) == [int(r["id"]) for r in rows]
    for key in TABLE_FIELDS[1:]:
        want = [r[key] for r in rows]
        got = [str(v) for v in features[key]]
        assert got == want, key
