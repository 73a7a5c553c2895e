"""Prediction: a trained model on image files (``maskrcnn predict``).

``Predictor`` pairs a model (checkpoint or exported file) with the normalisation it was trained
with; ``predict_files`` runs it over files, folders and glob patterns and writes what
``outputs`` describes for each image and for the run.

SIGINT, SIGTERM or SIGUSR1 during ``predict_files`` let the image in progress finish; the run
then ends early (``PredictRun.stopped_by``) with the run's files written for the images done, and
``skip_existing`` continues it (maskrcnn/signals.py).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import remove_stale_temporaries
from .builtin import is_builtin, resolve_weights
from .checkpoint import load_checkpoint
from .data.io import IMAGE_EXTENSIONS, read_image
from .data.normalize import Normalizer
from .distributed import resolve_device
from .errors import DataError, UserError
from .inference import segment
from .model import MaskRCNN, for_inference
from .metrics import PredictionRecord
from .outputs import (IMAGES_JSON, PredictionFiles, RunOutputs, existing_prediction, read_prediction,
                      write_prediction)
from .precision import autocast_dtype
from .signals import StopSignals
from .structures import Detector, InstanceResult
from .tiling import TILE_OVERLAP


@dataclass
class Predictor:
    """A model ready for inference with the normalisation it was trained with."""

    model: Detector
    normalizer: Normalizer
    device: torch.device
    precision: str = "fp32"  # see maskrcnn.precision; exported models always run float32
    scale: float = 1.0  # images are resized by this factor before the model sees them (maskrcnn.inference)
    tta: bool = False  # test-time augmentation: the 8 flips and quarter turns, merged by the mask NMS

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "Predictor":
        """A training checkpoint, rewritten for inference (``model.for_inference``)."""
        target = resolve_device(device)
        autocast_dtype(precision, target)  # an unknown name fails before the load
        ckpt = load_checkpoint(resolve_weights(path), map_location=target)
        # every weight is in the checkpoint: the ImageNet file training started from is not needed here
        model = MaskRCNN(ckpt.config.replace(backbone_weights=None))
        model.load_state_dict(ckpt.model_state)
        return cls(for_inference(model.to(target)), Normalizer.from_dict(ckpt.normalizer), target, precision)

    @classmethod
    def from_weights(cls, path: str | Path, device: str = "auto", precision: str = "auto") -> "Predictor":
        """A built-in model's name, a checkpoint, or a file from ``maskrcnn export``: .onnx through
        onnxruntime, a TorchScript .pt through torch.jit (both on the CPU in float32, same results
        and outputs as the checkpoint at ``precision="fp32"``)."""
        if is_builtin(path):
            return cls.from_checkpoint(path, device, precision)
        from .deploy import exported_kind, load_exported

        if exported_kind(path):
            if precision not in ("auto", "fp32"):
                raise UserError(f"{path}: exported models run in float32; use --precision fp32 (or auto)")
            model, normalizer = load_exported(path, device)
            return cls(model, normalizer, torch.device("cpu"), "fp32")
        return cls.from_checkpoint(path, device, precision)

    @property
    def class_names(self) -> list[str]:
        return self.model.cfg.class_names

    def __call__(self, image: np.ndarray, tile: int | None = None, overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A raw image (H, W) or (H, W, C) of any dtype -> its instances, on the CPU."""
        return self.predict_normalized(self.normalizer(image), tile, overlap)

    def predict_normalized(self, image: torch.Tensor, tile: int | None = None, overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A normalised (C, H, W) float image -> its instances, on the CPU; tiled when ``tile`` is given."""
        return segment(self.model, image, self.device, tile, overlap, self.precision, self.scale, self.tta)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order, no repeats."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no such file, folder or matching pattern")
            paths += [p for p in matches if p.is_file()]
    return list(dict.fromkeys(paths))


@dataclass
class PredictRun:
    """What ``predict_files`` did: the files of each image written, the images that failed and
    why, the run's COCO results and (with kaggle) submission files; the images kept from an
    earlier run (``skip_existing``), and when a signal stopped it, which and after how many."""

    written: list[PredictionFiles]
    failed: list[tuple[Path, str]]
    coco_json: Path
    kaggle_csv: Path | None
    skipped: list[Path] = field(default_factory=list)
    stopped_by: str | None = None  # the signal's name when one ended the run before its last image
    done: int = 0  # images handled (written, failed or skipped): the first ``done`` of the inputs
    total: int = 0

    @property
    def images_json(self) -> Path:
        return self.coco_json.with_name(IMAGES_JSON)


def predict_files(predictor: Predictor, inputs: list[str], out_dir: str | Path, *, tile: int | None = None,
                  overlap: int = TILE_OVERLAP, kaggle: bool = False, progress: bool = True,
                  skip_existing: bool = False, rois: bool = False, geojson: bool = False) -> PredictRun:
    """Predict every input image; a bad image is reported and skipped, the others still processed.
    ``rois`` / ``geojson``: also write each image's instance outlines as an ImageJ ROI zip / a QuPath
    GeoJSON (see outputs_outlines). ``skip_existing``: keep the outputs of images that have all
    their files already, those two included when asked for (see outputs)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by a run killed while writing
    paths = expand_inputs(inputs)
    if not paths:
        raise UserError(f"no images found in {' '.join(inputs)}")
    _check_unique_stems(paths)
    run, written, skipped = RunOutputs(out, kaggle), [], []
    stopped_by, done = None, 0
    with StopSignals(graceful=True, unit="image") as signals:
        for image_id, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=not progress), start=1):
            kept = _kept_prediction(out, path, predictor.class_names, rois, geojson) if skip_existing else None
            if kept is not None:
                run.add_record(image_id, path, kept)
                skipped.append(path)
            else:
                files = _predict_one(predictor, run, image_id, path, tile, overlap, rois, geojson)
                written += [files] if files else []
            done = image_id
            if signals.received and done < len(paths):  # after the last image the run is whole anyway
                stopped_by = signals.received
                break
    coco_json, kaggle_csv = run.write()  # for the images done: images.json lists them
    return PredictRun(written, run.failed, coco_json, kaggle_csv, skipped, stopped_by, done, len(paths))


def _predict_one(predictor: Predictor, run: RunOutputs, image_id: int, path: Path, tile: int | None,
                 overlap: int, rois: bool, geojson: bool) -> PredictionFiles | None:
    """Predict one image, write its files and add it to the run; None when it cannot be read."""
    try:
        image = read_image(path)
        normalized = predictor.normalizer(image)
        result = predictor.predict_normalized(normalized, tile, overlap)
    except DataError as err:
        run.failed.append((path, err.problem))
        return None
    files = write_prediction(run.out_dir, path.stem, image, normalized, result, predictor.class_names,
                             rois=rois, geojson=geojson)
    run.add(image_id, path, image.shape[:2], result)
    return files


def _kept_prediction(out: Path, path: Path, class_names: list[str], rois: bool,
                     geojson: bool) -> PredictionRecord | None:
    """The prediction of ``path`` an earlier run left in ``out`` (with the outline files asked for),
    or None to predict it (again)."""
    files = existing_prediction(out, path.stem, rois=rois, geojson=geojson)
    return read_prediction(files, class_names) if files else None


def _check_unique_stems(paths: list[Path]) -> None:
    """Outputs are named by stem: two inputs with one stem would overwrite each other's files."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        if by_stem.setdefault(path.stem, path) != path:
            raise UserError(f"{path}: same name as {by_stem[path.stem]}; their outputs "
                            f"({path.stem}_labels.png, ...) would overwrite each other")
