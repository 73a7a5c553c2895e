"""The dock widget's inputs, each configured (ranges, units, tooltips) where it is made."""

from __future__ import annotations

from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QSpinBox, QWidget)

from ..builtin import builtin_names
from ..prediction.tiling import TILE_OVERLAP
from ._core import AUTO_MODEL, AUTO_TILE, AUTO_TILE_ABOVE


def model_combo() -> QComboBox:
    """Editable: a built-in name, or any model file typed or chosen."""
    combo = QComboBox()
    combo.setEditable(True)
    combo.addItems([AUTO_MODEL, *builtin_names()])
    combo.setToolTip(f"{AUTO_MODEL}: the built-in he model for brightfield images, nuclei for fluorescence; "
                     "or a built-in model's name, or a checkpoint (.pt) or exported (.onnx, .pt) file")
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


def tile_spin() -> QSpinBox:
    """Tile size in pixels; 0 shows as 'auto'."""
    spin = QSpinBox()
    spin.setRange(0, 1 << 16)
    spin.setSingleStep(256)
    spin.setSpecialValueText("auto")
    spin.setSuffix(" px")
    spin.setToolTip(f"tile size for large images; auto: tiles of {AUTO_TILE} px above "
                    f"{AUTO_TILE_ABOVE} px, else the whole image at once")
    return spin


def overlap_spin() -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(0, 1 << 15)
    spin.setValue(TILE_OVERLAP)
    spin.setSuffix(" px")
    spin.setToolTip("overlap of neighbouring tiles: more than twice the largest object")
    return spin


def diameter_spin() -> QDoubleSpinBox:
    """The nuclei's diameter in pixels; 0 shows as 'auto'."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 4096.0)
    spin.setDecimals(1)
    spin.setSingleStep(5.0)
    spin.setSuffix(" px")
    spin.setSpecialValueText("auto")
    spin.setToolTip("typical nucleus diameter in the image, in pixels: the image is resized to the built-in "
                    "model's (as predict --diameter); auto: the built-in models estimate it per image, other "
                    "models see the image as it is")
    return spin


def contrast_spin() -> QDoubleSpinBox:
    """The faint-instance floor; its minimum (-0.05) shows as 'model's' (the model's own setting)."""
    spin = QDoubleSpinBox()
    spin.setRange(-0.05, 1.0)
    spin.setDecimals(2)
    spin.setSingleStep(0.05)
    spin.setSpecialValueText("model's")
    spin.setValue(-0.05)
    spin.setToolTip("drop instances fainter than this share of the way from the background to the nuclei's "
                    "level (as predict --min-contrast); 0 keeps every instance; model's: the model's own "
                    "(0.1 for the built-in nuclei model)")
    return spin


def contrast_value(spin: QDoubleSpinBox) -> float | None:
    """The floor chosen, None for the model's own."""
    return None if spin.value() < 0 else spin.value()


def minutes_spin() -> QDoubleSpinBox:
    """Fine-tuning time budget; 0 shows as 'no limit'."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 24 * 60.0)
    spin.setDecimals(1)
    spin.setValue(1.0)
    spin.setSuffix(" min")
    spin.setSpecialValueText("no limit")
    return spin


def steps_spin() -> QSpinBox:
    """Fine-tuning step budget; 0 shows as 'no limit'."""
    spin = QSpinBox()
    spin.setRange(0, 10**6)
    spin.setSpecialValueText("no limit")
    spin.setToolTip("training steps at most (the time budget may end it first)")
    return spin


def run_dir_edit() -> QLineEdit:
    edit = QLineEdit()
    edit.setPlaceholderText("a temporary folder")
    edit.setToolTip("where each fine-tuning writes its run folder (last.pt, metrics.jsonl)")
    return edit


def with_browse(field: QWidget, tooltip: str, on_click) -> QHBoxLayout:
    """``field`` stretched, with a '…' button after it that calls ``on_click``."""
    button = QPushButton("…")
    button.setToolTip(tooltip)
    button.clicked.connect(on_click)
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


def refill(combo: QComboBox, names: list[str]) -> None:
    """Offer ``names``, keeping the current choice when it is still among them (without signals)."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def stop_button(on_click) -> QPushButton:
    button = QPushButton("Stop")
    button.setEnabled(False)
    button.setToolTip("segmentation: stop after the tile in progress; fine-tuning: end it after the step in "
                      "progress and re-segment with the weights so far")
    button.clicked.connect(on_click)
    return button


def hbox(*items: QWidget | str) -> QHBoxLayout:
    """A row of widgets, strings between them as labels (e.g. a spin box, "steps", another)."""
    row = QHBoxLayout()
    for item in items:
        row.addWidget(QLabel(item) if isinstance(item, str) else item)
    return row


def volume_check() -> QCheckBox:
    check = QCheckBox("3-D: the whole stack")
    check.setToolTip("segment every plane of a z-stack and join them into 3-D nuclei (as maskrcnn predict "
                     "--3d); off: the plane in view")
    return check


def browse_model(parent: QWidget, combo: QComboBox) -> None:
    """Let the user pick a model file; it becomes (and stays listed as) the combo's choice."""
    path, _ = QFileDialog.getOpenFileName(parent, "Choose a model", "", "Models (*.pt *.onnx);;All files (*)")
    if path:
        if combo.findText(path) < 0:
            combo.addItem(path)
        combo.setCurrentText(path)


def browse_folder(parent: QWidget, edit: QLineEdit) -> None:
    path = QFileDialog.getExistingDirectory(parent, "Folder for fine-tuning runs")
    if path:
        edit.setText(path)
