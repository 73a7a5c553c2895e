"""Prediction: a trained model on image files, and the files written for each image.

Per image NAME: NAME_labels.png (16-bit label image; .tif past 65535 instances), NAME_overlay.png
(coloured contours on the image), NAME_instances.csv (one row per id in the label image), and
for the whole run results_coco.json (COCO results format) and, on request, submission.csv
(Kaggle DSB2018 run-length encoding).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from .checkpoint import load_checkpoint
from .data.io import read_image, write_label_image
from .data.normalize import Normalizer
from .distributed import resolve_device
from .errors import DataError, UserError
from .model import MaskRCNN
from .structures import Detector, InstanceResult
from .rle import coco_rle, kaggle_rle, label_runs
from .inference import segment
from .tiling import TILE_OVERLAP

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy"}


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
        return cls(model.to(target).eval(), Normalizer.from_dict(ckpt.normalizer), target)

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
        return segment(self.model, image, self.device, tile, overlap)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order, no repeats."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.exists():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no such file, folder or matching pattern")
            paths += [p for p in matches if p.is_file()]
    return list(dict.fromkeys(paths))


# --- per-image outputs ------------------------------------------------------------------------
def instance_table(result: InstanceResult, image: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per id of the label image: class, score, area, bbox, centroid, mean intensity."""
    labels = result.label_image.numpy().astype(np.int64)
    k = len(result)
    gray = image.astype(np.float64) if image.ndim == 2 else image[..., :3].astype(np.float64).mean(axis=2)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=k + 1)[1:]
    ys, xs = np.indices(labels.shape)
    cy = np.bincount(flat, ys.ravel(), minlength=k + 1)[1:] / np.maximum(area, 1)
    cx = np.bincount(flat, xs.ravel(), minlength=k + 1)[1:] / np.maximum(area, 1)
    intensity = np.bincount(flat, gray.ravel(), minlength=k + 1)[1:] / np.maximum(area, 1)
    boxes = result.boxes.numpy()
    rows = []
    for i in range(k):
        label = int(result.labels[i])
        rows.append({
            "id": i + 1, "class": class_names[label] if label < len(class_names) else str(label),
            "score": round(float(result.scores[i]), 4), "area": int(area[i]),
            "x0": round(float(boxes[i, 0]), 1), "y0": round(float(boxes[i, 1]), 1),
            "x1": round(float(boxes[i, 2]), 1), "y1": round(float(boxes[i, 3]), 1),
            "centroid_x": round(float(cx[i]), 2), "centroid_y": round(float(cy[i]), 2),
            "mean_intensity": round(float(intensity[i]), 3),
        })
    return rows


def overlay_image(display: np.ndarray, label_image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture with each instance's contour drawn in its own colour."""
    lab = label_image
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge &= lab > 0
    rng = np.random.default_rng(12345)
    palette = rng.integers(80, 256, size=(int(lab.max()) + 1, 3), dtype=np.uint8)
    palette[:, rng.integers(0, 3, size=len(palette))[0]] = 255  # saturated, visible on grey images
    out = display.copy()
    out[edge] = palette[lab[edge]]
    return out


def display_image(normalized: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 for viewing."""
    array = (normalized.clamp(0, 1) * 255).round().byte().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    return np.ascontiguousarray(array.transpose(1, 2, 0))


def write_png(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


TABLE_FIELDS = ["id", "class", "score", "area", "x0", "y0", "x1", "y1", "centroid_x", "centroid_y",
                "mean_intensity"]


@dataclass
class PredictionFiles:
    label_image: Path
    overlay: Path
    table: Path


def write_prediction(out_dir: Path, name: str, image: np.ndarray, normalized: torch.Tensor,
                     result: InstanceResult, class_names: list[str]) -> PredictionFiles:
    labels = result.label_image.numpy()
    suffix = ".png" if len(result) < 65536 else ".tif"
    files = PredictionFiles(out_dir / f"{name}_labels{suffix}", out_dir / f"{name}_overlay.png",
                            out_dir / f"{name}_instances.csv")
    write_label_image(files.label_image, labels)
    write_png(files.overlay, overlay_image(display_image(normalized), labels))
    write_csv(files.table, instance_table(result, image, class_names), TABLE_FIELDS)
    return files


def coco_records(image_id: int, result: InstanceResult) -> list[dict]:
    """COCO results-format records (RLE segmentation of each instance's visible pixels)."""
    labels = result.label_image.numpy()
    h, w = labels.shape
    runs = label_runs(labels)
    boxes = result.boxes.numpy()
    records = []
    for i in range(len(result)):
        starts, lengths = runs[i + 1]
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        records.append({"image_id": image_id, "category_id": int(result.labels[i]),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(result.scores[i]), 5),
                        "segmentation": coco_rle(starts, lengths, h, w)})
    return records


def kaggle_rows(name: str, result: InstanceResult) -> list[dict]:
    runs = label_runs(result.label_image.numpy())
    if not runs:  # the competition expects one row, empty, for an image with nothing found
        return [{"ImageId": name, "EncodedPixels": ""}]
    return [{"ImageId": name, "EncodedPixels": kaggle_rle(*runs[i])} for i in sorted(runs)]


@dataclass
class PredictRun:
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
    by_stem: dict[str, Path] = {}
    for path in paths:  # outputs are named by stem: two inputs with one stem would overwrite each other
        if by_stem.setdefault(path.stem, path) != path:
            raise UserError(f"{path}: same name as {by_stem[path.stem]}; their outputs "
                            f"({path.stem}_labels.png, ...) would overwrite each other")
    written, failed, coco, kaggle_table = [], [], [], []
    images_meta = []
    for image_id, path in enumerate(tqdm(paths, desc="predict", unit="img", disable=not progress), start=1):
        try:
            image = read_image(path)
            normalized = predictor.normalizer(image)
            result = predictor.predict_normalized(normalized, tile, overlap)
        except DataError as err:
            failed.append((path, err.problem))
            continue
        written.append(write_prediction(out, path.stem, image, normalized, result, predictor.class_names))
        coco += coco_records(image_id, result)
        images_meta.append({"id": image_id, "file_name": str(path), "height": image.shape[0], "width": image.shape[1]})
        if kaggle:
            kaggle_table += kaggle_rows(path.stem, result)
    coco_json = out / "results_coco.json"
    atomic_write_text(coco_json, json.dumps(coco))
    atomic_write_text(out / "images.json", json.dumps(images_meta, indent=1))
    kaggle_csv = None
    if kaggle:
        kaggle_csv = out / "submission.csv"
        write_csv(kaggle_csv, kaggle_table, ["ImageId", "EncodedPixels"])
    if failed:
        atomic_write_text(out / "failed.txt", "".join(f"{p}\t{why}\n" for p, why in failed))
    else:  # a list from an earlier run into this folder would now be wrong
        (out / "failed.txt").unlink(missing_ok=True)
    return PredictRun(written, failed, coco_json, kaggle_csv)
