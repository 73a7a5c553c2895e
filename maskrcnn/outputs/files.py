"""The files ``maskrcnn predict`` writes, per image and per run; every file is written atomically.

Per image NAME: NAME_labels.png (16-bit label image; .tif past 65535 instances), NAME_overlay.png
(coloured contours on the image), NAME_instances.csv (one row per id in the label image), and on
request the instances' outlines for Fiji (NAME_rois.zip) and QuPath (NAME.geojson), described in
outputs_outlines. For the whole run: results_coco.json (COCO results format), images.json (the
COCO image entries those records refer to), on request submission.csv (Kaggle DSB2018 run-length
encoding), and failed.txt listing the images that could not be read (removed when there are none).

``predict --skip-existing`` keeps an image whose three files (and the outline files asked for) are
there and read back (:func:`read_prediction`); the run's files still cover it, rebuilt from its
label image and instance table: the same masks, classes and Kaggle rows, boxes to 0.1 pixel and
scores to 4 decimals as the table holds them (a fresh prediction writes 0.01 and 5 in
results_coco.json).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.io import image_stem, read_label_image
from ..data.writers import write_label_image
from ..errors import DataError
from ..metrics import PredictionRecord, detection_records, prediction_record
from ..metrics.rle import kaggle_rle, label_runs
from ..runtime.atomic import atomic_write_bytes, atomic_write_text
from ..structures import InstanceResult
from .outlines import GEOJSON_SUFFIX, ROIS_SUFFIX, write_geojson, write_roi_zip
from .plots import display_image, overlay_image
from .polygons import label_outlines

TABLE_FIELDS = ["id", "class", "score", "area", "x0", "y0", "x1", "y1", "centroid_x", "centroid_y",
                "mean_intensity"]
KAGGLE_FIELDS = ["ImageId", "EncodedPixels"]
MAX_PNG_ID = 65535  # a 16-bit PNG holds ids up to this; more instances go to a TIFF
PNG_LEVEL = 3  # zlib level of the overlays (see write_png)
COCO_JSON, IMAGES_JSON, KAGGLE_CSV, FAILED_TXT = "results_coco.json", "images.json", "submission.csv", "failed.txt"


# --- per image ----------------------------------------------------------------------------------
@dataclass
class PredictionFiles:
    """The files written for one image: three always, the outlines on request (else None)."""

    label_image: Path
    overlay: Path
    table: Path
    rois: Path | None = None  # NAME_rois.zip, ImageJ ROIs
    geojson: Path | None = None  # NAME.geojson, for QuPath


def write_prediction(out_dir: Path, name: str, image: np.ndarray, normalized: torch.Tensor,
                     result: InstanceResult, class_names: list[str], *, rois: bool = False,
                     geojson: bool = False) -> PredictionFiles:
    """Write one image's label image, overlay and instance table into ``out_dir``, and with ``rois``
    and ``geojson`` its instances' outlines (see outputs_outlines).

    image: the raw (H, W) or (H, W, C) image (for mean intensities); normalized: (C, H, W) in
    [0, 1], what the overlay is drawn on.
    """
    labels = result.label_image.numpy()
    suffix = ".png" if len(result) <= MAX_PNG_ID else ".tif"
    files = PredictionFiles(out_dir / f"{name}_labels{suffix}", out_dir / f"{name}_overlay.png",
                            out_dir / f"{name}_instances.csv")
    write_label_image(files.label_image, labels)
    write_png(files.overlay, overlay_image(display_image(normalized), labels))
    rows = instance_table(result, image, class_names)
    write_csv(files.table, rows, TABLE_FIELDS)
    outlines = label_outlines(labels) if rois or geojson else {}
    if rois:
        files.rois = out_dir / f"{name}{ROIS_SUFFIX}"
        write_roi_zip(files.rois, outlines, len(rows))
    if geojson:
        files.geojson = out_dir / f"{name}{GEOJSON_SUFFIX}"
        write_geojson(files.geojson, outlines, rows)
    return files


def existing_prediction(out_dir: Path, name: str, *, rois: bool = False,
                        geojson: bool = False) -> PredictionFiles | None:
    """The files of image NAME, with its outline files when ``rois`` / ``geojson`` ask for them, when
    all of them are in ``out_dir`` (written whole: atomically)."""
    labels = out_dir / f"{name}_labels.png"
    if not labels.is_file():
        labels = out_dir / f"{name}_labels.tif"
    files = PredictionFiles(labels, out_dir / f"{name}_overlay.png", out_dir / f"{name}_instances.csv",
                            out_dir / f"{name}{ROIS_SUFFIX}" if rois else None,
                            out_dir / f"{name}{GEOJSON_SUFFIX}" if geojson else None)
    wanted = (files.label_image, files.overlay, files.table, files.rois, files.geojson)
    return files if all(p.is_file() for p in wanted if p is not None) else None


def read_prediction(files: PredictionFiles, class_names: list[str]) -> PredictionRecord | None:
    """The prediction an earlier run wrote to ``files``, from its label image and instance table;
    None when they do not read back as this model's (then the image is predicted again)."""
    try:
        labels = read_label_image(files.label_image)
        with open(files.table, newline="") as f:
            rows = list(csv.DictReader(f))
        classes = {name: index for index, name in enumerate(class_names)}
        label_ids = [classes[r["class"]] if r["class"] in classes else int(r["class"]) for r in rows]
        boxes = np.array([[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in rows]).reshape(-1, 4)
        scores = np.array([float(r["score"]) for r in rows])
        ids = [int(r["id"]) for r in rows]
    except (DataError, OSError, KeyError, ValueError, TypeError):
        return None
    if ids != list(range(1, len(rows) + 1)) or (labels.size and labels.max() > len(rows)):
        return None  # the table does not describe this label image
    return PredictionRecord(files.table.name, label_image=labels, labels=np.array(label_ids, np.int64),
                            boxes=boxes, scores=scores)


def instance_table(result: InstanceResult, image: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per id of the label image: class, score, area, bbox, centroid, mean intensity.

    image: (H, W) or (H, W, C); the intensity is the mean of its first three channels.
    """
    labels = result.label_image.numpy().astype(np.int64)
    k = len(result)
    gray = image.astype(np.float64) if image.ndim == 2 else image[..., :3].astype(np.float64).mean(axis=2)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=k + 1)[1:]
    ys, xs = np.indices(labels.shape)
    # per-id sums by bincount: one pass over the pixels however many instances there are
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


def coco_records(image_id: int, result: InstanceResult) -> list[dict]:
    """COCO results-format records of the result's instances (RLE of each one's visible pixels).

    The records the metrics score, rounded (boxes to 0.01 pixel, scores to 5 decimals) to keep
    results_coco.json small.
    """
    return record_coco(image_id, prediction_record(f"image {image_id}", result))


def record_coco(image_id: int, prediction: PredictionRecord) -> list[dict]:
    """:func:`coco_records` of a prediction record."""
    records = detection_records(image_id, prediction)
    for record in records:
        record["bbox"] = [round(v, 2) for v in record["bbox"]]
        record["score"] = round(record["score"], 5)
    return records


def _same_records(earlier: list[dict], records: list[dict]) -> bool:
    """Whether an earlier run's COCO records are those rebuilt from its files: the same masks and
    classes, in order, with boxes and scores as the instance table rounds them (0.1 px, 4 decimals)."""
    return len(earlier) == len(records) and all(
        a.get("segmentation") == b["segmentation"] and a.get("category_id") == b["category_id"]
        and abs(a.get("score", -1.0) - b["score"]) <= 6e-5 and len(a.get("bbox", ())) == 4
        and all(abs(u - v) <= 0.11 for u, v in zip(a.get("bbox", ()), b["bbox"])) for a, b in zip(earlier, records))


def kaggle_rows(name: str, result: InstanceResult) -> list[dict]:
    """DSB2018 submission rows of one image: one per instance, ids ascending."""
    return label_kaggle_rows(name, result.label_image.numpy())


def label_kaggle_rows(name: str, labels: np.ndarray) -> list[dict]:
    """:func:`kaggle_rows` of an (H, W) label image."""
    runs = label_runs(labels)
    if not runs:  # the competition expects one row, empty, for an image with nothing found
        return [{"ImageId": name, "EncodedPixels": ""}]
    return [{"ImageId": name, "EncodedPixels": kaggle_rle(*runs[i])} for i in sorted(runs)]


def write_png(path: Path, array: np.ndarray) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as a PNG."""
    buffer = io.BytesIO()
    # zlib level 3: on predict's overlays 2.3x faster than Pillow's default 6 and 6% smaller files
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    atomic_write_bytes(path, buffer.getvalue())


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    """Write dict rows as a CSV with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# --- per run ------------------------------------------------------------------------------------
@dataclass
class RunOutputs:
    """What a run writes for all its images together, gathered image by image and written at the end."""

    out_dir: Path
    kaggle: bool = False
    coco: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    kaggle_table: list[dict] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, image_id: int, path: Path, image_size: tuple[int, int], result: InstanceResult,
            scaling: dict | None = None) -> None:
        """Record one predicted image: its COCO records, its COCO image entry (with ``scaling``: the
        scale it was segmented at and the nucleus diameter behind it) and its Kaggle rows."""
        self.add_record(image_id, path, prediction_record(f"image {image_id}", result), scaling)

    def add_record(self, image_id: int, path: Path, prediction: PredictionRecord, scaling: dict | None = None,
                   coco: list[dict] | None = None) -> None:
        """:meth:`add` for a prediction record (e.g. one read back by :func:`read_prediction`);
        ``coco``: the image's records as an earlier run wrote them (its boxes and scores unrounded
        by the instance table), used when they are the records of this prediction."""
        height, width = prediction.label_image.shape
        records = record_coco(image_id, prediction)
        if coco and _same_records(coco, records):
            records = [record | {"image_id": image_id} for record in coco]
        self.coco += records
        self.images.append({"id": image_id, "file_name": str(path), "height": height, "width": width,
                            **(scaling or {})})
        if self.kaggle:
            self.kaggle_table += label_kaggle_rows(image_stem(path), prediction.label_image)

    def add_streamed(self, image_id: int, path: Path, image_size: tuple[int, int], scaling: dict | None = None) -> None:
        """Record an image streamed by maskrcnn.prediction.large: its image entry (``"streamed": true``) only;
        it has no COCO records or Kaggle rows (see maskrcnn.prediction.large)."""
        height, width = image_size
        self.images.append({"id": image_id, "file_name": str(path), "height": height, "width": width,
                            "streamed": True, **(scaling or {})})

    def paths(self) -> tuple[Path, Path | None]:
        """The COCO results path and the submission path (None without kaggle) that :meth:`write` writes."""
        return self.out_dir / COCO_JSON, (self.out_dir / KAGGLE_CSV if self.kaggle else None)

    def write(self) -> tuple[Path, Path | None]:
        """Write the run's files; returns the COCO results path and the submission path (None without kaggle)."""
        coco_json = self.out_dir / COCO_JSON
        atomic_write_text(coco_json, json.dumps(self.coco))
        atomic_write_text(self.out_dir / IMAGES_JSON, json.dumps(self.images, indent=1))
        kaggle_csv = None
        if self.kaggle:
            kaggle_csv = self.out_dir / KAGGLE_CSV
            write_csv(kaggle_csv, self.kaggle_table, KAGGLE_FIELDS)
        failed_txt = self.out_dir / FAILED_TXT
        if self.failed:
            atomic_write_text(failed_txt, "".join(f"{p}\t{why}\n" for p, why in self.failed))
        else:  # a list from an earlier run into this folder would now be wrong
            failed_txt.unlink(missing_ok=True)
        return coco_json, kaggle_csv
