"""What the napari widget does, without Qt or napari: segment an array, measure its instances,
fine-tune a model on an image and its corrected labels. The widget (``_widget.py``) runs these in a
worker thread and passes ``report`` (progress) and ``cancel`` (a ``threading.Event``).

Everything goes through the library's own code paths: ``Predictor`` (as ``maskrcnn predict``),
``outputs.instance_table`` (the rows of ``NAME_instances.csv``) and the training engine
(``TrainOptions(reader=...)``, as ``maskrcnn train --init``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.reader import InstanceReader, Sample
from ..errors import UserError
from ..outputs.files import TABLE_FIELDS, instance_table
from ..prediction.diameter import Scaling
from ..prediction.predict import Predictor
from ..prediction.tiling import TILE_OVERLAP, fitted_tile, tile_starts
from ..structures import InstanceResult
from ..train import HookBase

AUTO_MODEL = "auto"  # the model choice: the built-in nuclei or he model, as the image needs (predict's default)
AUTO_TILE_ABOVE = 2048  # images larger than this (either side) are segmented in tiles...
AUTO_TILE = 1024  # ...of at most this many pixels (as ``maskrcnn predict --tile 1024``)

MAX_MASK_BYTES = 2 * 2**30  # the (G, H, W) bool masks training reads an image's instances as

Report = Callable[[int, str], None]  # (percent 0..100, or -1 when unknown; a line of text)


class Cancelled(Exception):
    """The user pressed Stop."""


def _no_report(percent: int, text: str) -> None:
    pass


# --- models ----------------------------------------------------------------------------------------
def load_predictor(spec: str, diameter: float | None = None, min_contrast: float | None = None,
                   device: str = "auto", precision: str = "auto", engine: str = "auto"):
    """A built-in model's name, a checkpoint or an exported file, as ``predict --weights`` takes it;
    ``auto``: the built-in model each image needs (maskrcnn.prediction.choice), as ``predict`` without it.
    ``diameter`` (pixels) and ``min_contrast`` as ``predict --diameter`` and ``--min-contrast``; None:
    the model's own (``--diameter auto``)."""
    spec = spec.strip()
    if not spec:
        raise UserError("choose a model: a built-in name (e.g. nuclei) or a checkpoint / exported file")
    from ..builtin import is_builtin
    from ..prediction.choice import open_predictor

    auto = spec == AUTO_MODEL and not is_builtin(spec)
    if not auto and not is_builtin(spec) and not Path(spec).is_file():
        raise UserError(f"{spec}: no built-in model of that name and no such file")
    return open_predictor(None if auto else spec, device, precision, engine, diameter=diameter,
                          min_contrast=min_contrast, hint="set the diameter to auto")


def can_fine_tune(spec: str) -> None:
    """Raise UserError when ``spec`` is a model that training cannot start from (an exported file)."""
    from ..builtin import is_builtin
    from ..export.deploy import exported_kind

    if not is_builtin(spec) and Path(spec).is_file() and exported_kind(spec):
        raise UserError(f"{spec}: an exported model runs inference only; fine-tune the checkpoint it was "
                        "exported from")


# --- segmentation ---------------------------------------------------------------------------------
def auto_tile(shape: tuple[int, ...], tile: int = 0) -> int | None:
    """The tile size for an image of ``shape`` (H, W, ...): ``tile`` when > 0, else AUTO_TILE for
    images larger than AUTO_TILE_ABOVE on a side, else None (the whole image at once)."""
    if tile > 0:
        return tile
    return AUTO_TILE if max(shape[:2]) > AUTO_TILE_ABOVE else None


def tile_count(shape: tuple[int, ...], tile: int | None, overlap: int) -> int:
    """How many tiles ``maskrcnn.prediction.tiling.predict_tiled`` cuts an image of ``shape`` into."""
    if not tile:
        return 1
    height, width = shape[:2]
    rows = tile_starts(height, fitted_tile(height, tile, overlap), overlap)
    cols = tile_starts(width, fitted_tile(width, tile, overlap), overlap)
    return len(rows) * len(cols)


class _CountingDetector:
    """A Detector that reports each call (one per tile, or per plane of a stack) and stops between
    calls when cancelled."""

    def __init__(self, detector, total: int, report: Report, cancel: threading.Event | None,
                 unit: str = "tile") -> None:
        self._detector, self._total, self._report, self._cancel = detector, total, report, cancel
        self._done, self._unit = 0, unit

    def __call__(self, images):
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled()
        if self._total > 1:
            self._report(int(100 * self._done / self._total), f"segmenting {self._unit} {self._done + 1} of {self._total}")
        output = self._detector(images)
        self._done += 1
        return output

    def __getattr__(self, name):  # cfg, training, eval, train, ...: the wrapped detector's
        return getattr(self._detector, name)


def segment_array(predictor: Predictor, image: np.ndarray, tile: int | None = None, overlap: int = TILE_OVERLAP,
                  report: Report = _no_report, cancel: threading.Event | None = None
                  ) -> tuple[InstanceResult, list[dict], Scaling]:
    """A raw (H, W) or (H, W, C) image -> its instances and their measurements, as ``maskrcnn
    predict`` computes them (the label image of NAME_labels.png, the rows of NAME_instances.csv),
    and how it was resized (the nucleus diameter ``--diameter auto`` estimated, or the one given).
    ``predictor`` may choose the model by the image (``load_predictor("auto")``)."""
    image = np.asarray(image)
    model, predictor = predictor.for_image(image)
    if tile and not 0 <= overlap < tile:
        raise UserError(f"the tile overlap must be in [0, tile), got {overlap} for tile {tile}")
    total = tile_count(image.shape, tile, overlap)
    counting = dataclasses.replace(predictor, model=_CountingDetector(predictor.model, total, report, cancel))
    report(0 if total > 1 else -1, "segmenting" + (f" with {model}" if model else "")
           + (f" in {total} tiles" if total > 1 else ""))
    result, scaling = counting.predict_scaled(counting.normalizer(image), tile, overlap)
    report(100, "measuring")
    return result, instance_table(result, image, predictor.class_names), scaling


def segment_volume(predictor: Predictor, stack: np.ndarray, report: Report = _no_report,
                   cancel: threading.Event | None = None) -> tuple[np.ndarray, list[dict]]:
    """A raw (Z, H, W) or (Z, H, W, C) stack -> its 3-D labels and their rows (volume, 3-D centroid,
    bounding box), as ``maskrcnn predict --3d`` computes them; ``predictor`` may choose the model
    by the stack's middle plane (maskrcnn.prediction.volume.choice_plane)."""
    from ..prediction.volume import choice_plane, segment_stack, volume_table

    stack = np.asarray(stack)
    model, predictor = predictor.for_image(choice_plane(stack))
    counting = dataclasses.replace(predictor, model=_CountingDetector(predictor.model, len(stack), report, cancel,
                                                                      unit="plane"))
    report(0, f"segmenting {len(stack)} planes in 3-D" + (f" with {model}" if model else ""))
    labels = segment_stack(counting, stack).labels
    report(100, "measuring")
    return labels, volume_table(labels)


def table_fields(rows: list[dict]) -> list[str]:
    """The columns of an instance table: NAME_instances.csv's for 2-D rows, the rows' own (volume,
    3-D centroid, ...) for a stack's."""
    return list(rows[0]) if rows and "volume" in rows[0] else list(TABLE_FIELDS)


def features_table(rows: list[dict]) -> dict[str, list]:
    """The instance table as columns for a napari Labels layer's ``features``: ``index`` (the label
    id, which napari matches to label values) first, then the table's other columns."""
    columns = {"index": [r["id"] for r in rows]}
    columns.update({k: [r[k] for r in rows] for k in table_fields(rows) if k != "id"})
    return columns


# --- fine-tuning ----------------------------------------------------------------------------------
class ArrayReader(InstanceReader):
    """One image and its label image (0 background, each other id one instance) as a dataset.

    ``copies`` lists the sample that many times, so that a batch holds as many different random
    crops of it (augmentations are drawn per (seed, epoch, index)).
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray, class_names: list[str], name: str = "napari",
                 copies: int = 2) -> None:
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.ndim != 2:
            raise UserError(f"{name}: the labels must be one plane (H, W), got shape {labels.shape}")
        if tuple(image.shape[:2]) != tuple(labels.shape):
            raise UserError(f"{name}: the labels are {labels.shape[0]}x{labels.shape[1]} but the image is "
                            f"{image.shape[0]}x{image.shape[1]} (HxW)")
        if labels.dtype.kind not in "iub":
            raise UserError(f"{name}: labels must be integer ids, got {labels.dtype}")
        if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
            raise UserError(f"{name}: labels have negative ids")
        ids = np.unique(labels)
        ids = ids[ids > 0]
        if len(ids) * labels.size > MAX_MASK_BYTES:
            raise UserError(f"{name}: {len(ids)} instances on {labels.shape[0]}x{labels.shape[1]} pixels need "
                            f"{len(ids) * labels.size / 2**30:.1f} GB of masks; fine-tune on a crop of the image "
                            "and its labels")
        self.image = image
        self.masks = labels[None] == ids[:, None, None]  # (G, H, W) bool
        self.name = name
        self.class_names = list(class_names)
        self.names = [f"{name}#{i}" for i in range(copies)]

    @property
    def instances(self) -> int:
        return len(self.masks)

    def _load(self, index: int) -> Sample:
        return Sample(self.names[index], self.image, self.masks, np.ones(len(self.masks), np.int64), self.name)


class ProgressHook(HookBase):
    """A training hook (``maskrcnn.train.HookBase``'s points) that reports each step and stops the
    run when ``cancel`` is set (as a signal would: last.pt is written at the step reached)."""

    def __init__(self, report: Report, cancel: threading.Event | None, minutes: float | None,
                 iters: int | None) -> None:
        self.report, self.cancel, self.minutes, self.iters = report, cancel, minutes, iters

    def before_train(self) -> None:
        self.started = time.monotonic()
        self.report(0, "training")

    def before_step(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.trainer.request_stop("stopped", interrupted=True)

    def after_step(self) -> None:
        t = self.trainer
        if t.losses is None:
            return
        elapsed = time.monotonic() - self.started
        fractions = [t.step / self.iters] if self.iters else []
        if self.minutes:
            fractions.append(elapsed / (60 * self.minutes))
        percent = int(100 * min(1.0, max(fractions))) if fractions else -1
        loss = sum(v for k, v in t.losses.items() if k != "lr")
        self.report(percent, f"training: step {t.step}, loss {loss:.3f}, {elapsed:.0f} s")


def fine_tune(image: np.ndarray, labels: np.ndarray, init: str, out: str | Path, *, minutes: float | None = 1.0,
              iters: int | None = None, lr: float | None = None, warmup_iters: int = 10, device: str = "auto",
              seed: int = 0, name: str = "napari", report: Report = _no_report,
              cancel: threading.Event | None = None):
    """Train from ``init`` (a built-in name or a checkpoint) on one image and its label image for at
    most ``minutes`` and/or ``iters`` steps, into run folder ``out``; returns the ``TrainResult``
    (its ``last`` is the fine-tuned checkpoint). No validation: every labelled pixel trains.
    ``lr`` None: ``train``'s rate for a pretrained start (FINETUNE_LR)."""
    from ..builtin import resolve_weights
    from ..modeling.checkpoint import load_checkpoint
    from ..runtime.distributed import DistContext
    from ..runtime.runlock import run_lock
    from ..prediction.choice import builtin_for
    from ..train import Trainer, TrainOptions

    init = builtin_for(image) if init == AUTO_MODEL else init  # the built-in model this image needs
    can_fine_tune(init)
    if not minutes and not iters:
        raise UserError("give the fine-tuning a time budget (minutes) or a number of steps")
    class_names = load_checkpoint(resolve_weights(init)).config.class_names
    reader = ArrayReader(image, labels, class_names, name)
    if reader.instances == 0:
        raise UserError(f"{name}: the labels hold no instances to learn from")
    opts = TrainOptions(data=f"napari layers ({name})", out=str(out), reader=reader, init=init,
                        max_minutes=minutes or None, iters=iters or None, val_fraction=0.0,
                        val_every=10**9, lr=lr, warmup_iters=warmup_iters, device=device, seed=seed,
                        progress=False)
    hook = ProgressHook(report, cancel, minutes, iters)
    report(-1, f"preparing the fine-tuning ({reader.instances} instances)")
    with run_lock(out, DistContext.single(), command=f"napari fine-tune from {init}"):
        trainer = Trainer(opts)
        trainer.register(hook)
        return trainer.run()


def new_run_dir(folder: str) -> str:
    """A new fine-tuning run folder under ``folder`` (named by the time), or a temporary one."""
    folder = folder.strip()
    if not folder:
        return tempfile.mkdtemp(prefix="maskrcnn-finetune-")
    base = Path(folder).expanduser() / time.strftime("finetune-%Y%m%d-%H%M%S")
    run, count = base, 1
    while run.exists():  # two runs in one second
        run, count = Path(f"{base}_{count}"), count + 1
    return str(run)


def scaling_text(scaling: Scaling | None) -> str:
    """How an image was resized, for the status line ("" when it was not and nothing was estimated)."""
    if scaling is None or (scaling.source == "given" and scaling.scale == 1.0):
        return ""
    if scaling.source == "given":
        return f"resized x{scaling.scale:.2f} for the diameter given"
    if scaling.source == "none":
        return "too few nuclei to estimate their diameter: not resized"
    resized = f"resized x{scaling.scale:.2f}" if scaling.scale != 1.0 else "near the model's: not resized"
    return f"nucleus diameter {scaling.diameter:.0f} px estimated ({resized})"
