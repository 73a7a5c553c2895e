"""Prediction: a trained model on image files (``maskrcnn predict``).

``Predictor`` pairs a model (checkpoint or exported file) with the normalisation it was trained
with; ``predict_files`` runs it over files, folders and glob patterns and writes what
``outputs`` describes for each image and for the run.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import remove_stale_temporaries
from .checkpoint import load_checkpoint
from .data.io import IMAGE_EXTENSIONS, read_image
from .data.normalize import Normalizer
from .distributed import resolve_device
from .errors import DataError, UserError
from .inference import segment
from .model import MaskRCNN, for_inference
from .outputs import PredictionFiles, RunOutputs, write_prediction
from .structures import Detector, InstanceResult
from .tiling import TILE_OVERLAP


@dataclass
class Predictor:
    """A model ready for inference with the normalisation it was trained with."""

    model: Detector
    normalizer: Normalizer
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Predictor":
        target = resolve_device(device)
        ckpt = load_checkpoint(path, map_location=target)
        # every weight is in the checkpoint: the ImageNet file training started from is not needed here
        model = MaskRCNN(ckpt.config.replace(backbone_weights=None))
        model.load_state_dict(ckpt.model_state)
        return cls(for_inference(model.to(target)), Normalizer.from_dict(ckpt.normalizer), target)

    @classmethod
    def from_weights(cls, path: str | Path, device: str = "auto") -> "Predictor":
        """A checkpoint, or a file from ``maskrcnn export``: .onnx through onnxruntime, a TorchScript
        .pt through torch.jit (both on the CPU, same results and outputs as the checkpoint)."""
        from .deploy import exported_kind, load_exported

        if exported_kind(path):
            model, normalizer = load_exported(path, device)
            return cls(model, normalizer, torch.device("cpu"))
        return cls.from_checkpoint(path, device)

    @property
    def class_names(self) -> list[str]:
        return self.model.cfg.class_names

    def __call__(self, image: np.ndarray, tile: int | None = None, overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A raw image (H, W) or (H, W, C) of any dtype -> its instances, on the CPU."""
        return self.predict_normalized(self.normalizer(image), tile, overlap)

    def predict_normalized(self, image: torch.Tensor, tile: int | None = None, overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A normalised (C, H, W) float image -> its instances, on the CPU; tiled when ``tile`` is given."""
        return segment(self.model, image, self.device, tile, overlap)


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
    """What ``predict_files`` did: the files of each image written, the images skipped and why,
    and the run's COCO results and (with kaggle) submission files."""

    written: list[PredictionFiles]
    failed: list[tuple[Path, str]]
    coco_json: Path
    kaggle_csv: Path | None


def predict_files(predictor: Predictor, inputs: list[str], out_dir: str | Path, *, tile: int | None = None,
                  overlap: int = TILE_OVERLAP, kaggle: bool = False, progress: bool = True) -> PredictRun:
    """Predict every input image; a bad image is reported and skipped, the others still processed."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by a run killed while writing
    paths = expand_inputs(inputs)
    if not paths:
        raise UserError(f"no images found in {' '.join(inputs)}")
    _check_unique_stems(paths)
    run, written = RunOutputs(out, kaggle), []
    for image_id, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=not progress), start=1):
        try:
            image = read_image(path)
            normalized = predictor.normalizer(image)
            result = predictor.predict_normalized(normalized, tile, overlap)
        except DataError as err:
            run.failed.append((path, err.problem))
            continue
        written.append(write_prediction(out, path.stem, image, normalized, result, predictor.class_names))
        run.add(image_id, path, image.shape[:2], result)
    coco_json, kaggle_csv = run.write()
    return PredictRun(written, run.failed, coco_json, kaggle_csv)


def _check_unique_stems(paths: list[Path]) -> None:
    """Outputs are named by stem: two inputs with one stem would overwrite each other's files."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        if by_stem.setdefault(path.stem, path) != path:
            raise UserError(f"{path}: same name as {by_stem[path.stem]}; their outputs "
                            f"({path.stem}_labels.png, ...) would overwrite each other")
