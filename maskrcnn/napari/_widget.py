"""The napari dock widget: segment an image layer, measure the instances, fine-tune on corrections.

Work runs in a napari worker thread (``napari.qt.threading.create_worker``), so the viewer stays
responsive; it reports progress through a Qt signal, which Qt delivers in the main thread. Layers
are read in the main thread before a job starts (copies of the plane in view) and written there
when it returns.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QProgressBar, QPushButton, QVBoxLayout, QWidget)

from ..errors import UserError
from ..outputs.files import write_csv
from . import _controls as controls
from ._core import (Cancelled, auto_tile, can_fine_tune, features_table, fine_tune, load_predictor, new_run_dir,
                    scaling_text, segment_array, segment_volume)
from ._layers import add_result, is_kind, show_instance, shown_plane, shown_stack
from ._table import InstanceTable


class _Signals(QObject):
    progress = Signal(int, str)  # percent (-1: unknown), text


class MaskRCNNWidget(QWidget):
    """Segment with a Mask R-CNN model; fine-tune it on labels corrected in napari."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None  # the running job's worker, None when idle
        self.work_threads: list[int] = []  # the thread each job ran in (threading.get_ident())
        self.last_error: BaseException | None = None  # the last job's error, None after a success
        self.rows: list[dict] = []  # the instance table of the last segmentation
        self.output_layer = None  # the Labels layer the last segmentation added
        self._predictor = None  # (model settings, Predictor): the model last loaded (see _model_key)
        self._cancel = threading.Event()
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)
        self._started = 0.0
        self._build()
        self._refresh_layers()
        for name in ("inserted", "removed", "moved"):
            getattr(self.viewer.layers.events, name).connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self._on_active_layer()

    # --- layout ------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.model_combo = controls.model_combo()
        model_row = controls.with_browse(self.model_combo, "choose a checkpoint or exported model file",
                                         self._browse_model)
        self.image_combo = QComboBox()
        self.tile_spin = controls.tile_spin()
        self.overlap_spin = controls.overlap_spin()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.volume_check = controls.volume_check()
        self.diameter_spin = controls.diameter_spin()
        self.contrast_spin = controls.contrast_spin()

        form = QFormLayout()
        form.addRow("Model", model_row)
        form.addRow("Image", self.image_combo)
        form.addRow("Tile", controls.hbox(self.tile_spin, "overlap", self.overlap_spin))
        form.addRow("Nucleus diameter", self.diameter_spin)
        form.addRow("Faint floor", self.contrast_spin)
        form.addRow("", self.volume_check)

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("the corrected labels of the image (0 background, one id per instance)")
        self.minutes_spin = controls.minutes_spin()
        self.steps_spin = controls.steps_spin()
        self.run_dir_edit = controls.run_dir_edit()
        run_row = controls.with_browse(self.run_dir_edit, "choose the folder for the runs", self._browse_run_dir)
        self.finetune_button = QPushButton("Fine-tune and re-segment")
        self.finetune_button.clicked.connect(self.fine_tune)
        tune_form = QFormLayout()
        tune_form.addRow("Labels", self.labels_combo)
        tune_form.addRow("Budget", controls.hbox(self.minutes_spin, "steps", self.steps_spin))
        tune_form.addRow("Runs in", run_row)
        tune_box = QGroupBox("Fine-tune on corrected labels")
        tune_layout = QVBoxLayout(tune_box)
        tune_layout.addLayout(tune_form)
        tune_layout.addWidget(self.finetune_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        self.stop_button = controls.stop_button(self.stop)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress_bar, 1)
        progress_row.addWidget(self.stop_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.table = InstanceTable()
        self.table.cellClicked.connect(self._on_row_clicked)
        self.save_button = QPushButton("Save table…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_table)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.segment_button)
        layout.addWidget(tune_box)
        layout.addLayout(progress_row)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("Instances (as maskrcnn predict's NAME_instances.csv)"))
        layout.addWidget(self.table, 1)
        layout.addWidget(self.save_button)

    # --- layers ------------------------------------------------------------------------------------
    def _layers_of(self, kind: str) -> list:
        return [layer for layer in self.viewer.layers if is_kind(layer, kind)]

    def _refresh_layers(self, event=None) -> None:
        if event is not None and getattr(event, "type", None) == "inserted":
            event.value.events.name.connect(self._refresh_layers)
        for combo, kind in ((self.image_combo, "Image"), (self.labels_combo, "Labels")):
            controls.refill(combo, [layer.name for layer in self._layers_of(kind)])

    def _on_active_layer(self, event=None) -> None:
        """Follow the viewer: the active Image layer is the one to segment, the active Labels layer
        the one to train on."""
        layer = self.viewer.layers.selection.active
        if is_kind(layer, "Image"):
            self.image_combo.setCurrentText(layer.name)
        elif is_kind(layer, "Labels"):
            self.labels_combo.setCurrentText(layer.name)

    def _layer(self, combo: QComboBox, kind: str):
        name = combo.currentText()
        if not name or name not in self.viewer.layers:
            raise UserError(f"open or choose {'an' if kind[0] in 'aeiou' else 'a'} {kind} layer first")
        return self.viewer.layers[name]

    # --- actions -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def segment(self):
        """Segment the chosen image layer (the plane in view) in a worker thread; returns the worker
        (None when nothing could start: the status line says why)."""
        if self.busy:
            return self._refuse(UserError("busy: wait for the running job, or press Stop"))
        try:
            layer = self._layer(self.image_combo, "image")
            key = spec, _, _ = self._model_key()
            predictor = self._predictor[1] if self._predictor and self._predictor[0] == key else None
            if self.volume_check.isChecked():
                return self._start(self._volume_job, (key, predictor, shown_stack(layer)),
                                   lambda out: self._show_result(out, layer, (), spec, None, 0, "3-D masks"))
            image, index = shown_plane(layer, self.viewer)
            tile = auto_tile(image.shape, self.tile_spin.value())
            overlap = self.overlap_spin.value()
        except UserError as err:
            return self._refuse(err)
        return self._start(self._segment_job, (key, predictor, image, tile, overlap),
                           lambda out: self._show_result(out, layer, index, spec, tile, overlap, "masks"))

    def _model_key(self) -> tuple[str, float | None, float | None]:
        """The model and the settings it is loaded with: (spec, diameter or None for auto, floor or None)."""
        return (self.model_combo.currentText().strip(), self.diameter_spin.value() or None,
                controls.contrast_value(self.contrast_spin))

    def fine_tune(self):
        """Fine-tune the current model on the chosen image and labels layers (the planes in view) in
        a worker thread, then re-segment the image with it and make it the current model."""
        if self.busy:
            return self._refuse(UserError("busy: wait for the running job, or press Stop"))
        try:
            spec = self.model_combo.currentText().strip()
            if not spec:
                raise UserError("choose the model to start from")
            can_fine_tune(spec)
            image_layer = self._layer(self.image_combo, "image")
            labels_layer = self._layer(self.labels_combo, "labels")
            image, index = shown_plane(image_layer, self.viewer)
            labels, _ = shown_plane(labels_layer, self.viewer)
            minutes, steps = self.minutes_spin.value(), self.steps_spin.value()
            if not minutes and not steps:
                raise UserError("give the fine-tuning a time budget or a number of steps")
            out = new_run_dir(self.run_dir_edit.text())
            tile = auto_tile(image.shape, self.tile_spin.value())
            overlap = self.overlap_spin.value()
        except UserError as err:
            return self._refuse(err)
        floor = controls.contrast_value(self.contrast_spin)
        job_args = (spec, image, labels, labels_layer.name, out, minutes, steps, tile, overlap, floor)
        return self._start(self._fine_tune_job, job_args,
                           lambda res: self._fine_tuned(res, image_layer, index, tile, overlap))

    def stop(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("stopping…")

    # --- jobs (run in the worker thread: no Qt calls but the progress signal) -----------------------
    def _report(self, percent: int, text: str) -> None:
        self._signals.progress.emit(percent, text)

    def _segment_job(self, key, predictor, image, tile, overlap):
        self.work_threads.append(threading.get_ident())
        if predictor is None:
            self._report(-1, f"loading {key[0]}")
            predictor = load_predictor(*key)
        result, rows, scaling = segment_array(predictor, image, tile, overlap, self._report, self._cancel)
        return key, predictor, result.label_image.numpy(), rows, scaling

    def _volume_job(self, key, predictor, stack):
        self.work_threads.append(threading.get_ident())
        predictor = predictor or load_predictor(*key)
        return (key, predictor, *segment_volume(predictor, stack, self._report, self._cancel), None)

    def _fine_tune_job(self, spec, image, labels, name, out, minutes, steps, tile, overlap, floor):
        self.work_threads.append(threading.get_ident())
        run = fine_tune(image, labels, spec, out, minutes=minutes or None, iters=steps or None, name=name,
                        report=self._report, cancel=self._cancel)
        self._cancel.clear()  # a Stop during training ended it early; the re-segmentation still runs
        # the fine-tuned model learnt the image at its own scale: it sees images as they are (no diameter)
        return run, self._segment_job((str(run.last), None, floor), None, image, tile, overlap)

    # --- running and results (main thread) --------------------------------------------------------
    def _start(self, job, args, on_result):
        from napari.qt.threading import create_worker

        self._cancel.clear()
        self.last_error = None
        worker = create_worker(job, *args, _start_thread=False, _ignore_errors=True)  # errors: _on_error
        worker.returned.connect(on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._started = time.monotonic()
        self._set_busy(True)
        worker.start()
        return worker

    def _refuse(self, err: UserError) -> None:
        """Nothing starts: say why (and keep a running job's own last_error)."""
        if not self.busy:
            self.last_error = err
        self.status.setText(str(err))
        return None

    def _set_busy(self, busy: bool) -> None:
        self.segment_button.setEnabled(not busy)
        self.finetune_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        if busy:
            self.progress_bar.setRange(0, 0)  # busy until the job says how far it is
        else:
            self.progress_bar.setRange(0, 100)

    def _on_progress(self, percent: int, text: str) -> None:
        if self.worker is None:
            return
        if percent < 0:
            self.progress_bar.setRange(0, 0)
        else:
            self.progress_bar.setRange(0, 100)
            self.progress_bar.setValue(percent)
        self.status.setText(text)

    def _on_error(self, err: BaseException) -> None:
        self.last_error = err
        if isinstance(err, Cancelled):
            self.status.setText("stopped")
            return
        if not isinstance(err, UserError):  # a bug: napari shows it with its traceback
            self.status.setText(f"error: {type(err).__name__}: {err}")
            raise err
        self.status.setText(f"error: {err}")
        from napari.utils.notifications import show_error

        show_error(f"Mask R-CNN: {err}")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_busy(False)

    def _show_result(self, out, layer, index, spec, tile, overlap, suffix: str) -> None:
        key, predictor, labels, rows, scaling = out
        self._predictor = (key, predictor)
        metadata = {"model": spec, "tile": tile, "overlap": overlap, "plane": index, "image": layer.name}
        if scaling is not None:
            metadata.update(scaling.to_dict())  # as images.json records it
        self.output_layer = add_result(self.viewer, layer, index, labels, f"{layer.name} {suffix}",
                                       features_table(rows), metadata)
        self.rows = rows
        self.table.fill(rows)
        self.save_button.setEnabled(bool(rows))
        tiled = f" in tiles of {tile} px" if tile else ""
        self.progress_bar.setValue(100)
        sized = scaling_text(scaling)
        self.status.setText(f"{len(rows)} instances{tiled} in {time.monotonic() - self._started:.1f} s "
                            f"with {spec}{'; ' + sized if sized else ''} -> layer '{self.output_layer.name}'")

    def _fine_tuned(self, res, image_layer, index, tile, overlap) -> None:
        run, out = res
        checkpoint = out[0][0]
        if self.model_combo.findText(checkpoint) < 0:
            self.model_combo.addItem(checkpoint)
        self.model_combo.setCurrentText(checkpoint)
        self.diameter_spin.setValue(0.0)  # auto: the fine-tuned model sees images as they are
        self._show_result(out, image_layer, index, checkpoint, tile, overlap, "masks (fine-tuned)")
        how = "stopped" if run.interrupted else f"stopped by {run.stopped_by}"
        self.status.setText(f"fine-tuned {run.steps} steps ({how}); the model is now {checkpoint}. "
                            + self.status.text())

    # --- table -------------------------------------------------------------------------------------
    def _on_row_clicked(self, row: int, column: int) -> None:
        """Select that instance's label in the layer and centre the view on it."""
        layer = self.output_layer
        if layer is None or layer not in self.viewer.layers:
            return
        label = self.table.label_at(row)
        if label is None:
            return
        layer.selected_label = label
        found = next((r for r in self.rows if r["id"] == label), None)
        if found is not None:
            show_instance(self.viewer, layer, found)

    def _save_table(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the instance table", "instances.csv", "CSV (*.csv)")
        if path:
            write_csv(Path(path), self.rows, self.table.fields)
            self.status.setText(f"saved {len(self.rows)} rows to {path}")

    # --- file choosers -----------------------------------------------------------------------------
    def _browse_model(self) -> None:
        controls.browse_model(self, self.model_combo)

    def _browse_run_dir(self) -> None:
        controls.browse_folder(self, self.run_dir_edit)
