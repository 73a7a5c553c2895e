"""Prediction: a trained model on image files (``maskrcnn predict``).

``Predictor`` pairs a model (checkpoint or exported file) with the normalisation it was trained
with; ``predict_files`` runs it over files, folders and glob patterns and writes what
``outputs`` describes for each image and for the run.

SIGINT, SIGTERM or SIGUSR1 during ``predict_files`` let the image in progress finish (a streamed
image is abandoned at its next tile instead, leaving no file of it); the run then ends early
(``PredictRun.stopped_by``) with the run's files written for the images done, and
``skip_existing`` continues it (maskrcnn/runtime/signals.py).

Memory: ``Predictor.max_memory`` bounds the process; each image is processed whole, in tiles, or
(when even its whole-image outputs would not fit) streamed tile by tile to disk by maskrcnn.prediction.large,
as maskrcnn.runtime.memory decides. ``tile`` forces the tile size.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import IMAGE_EXTENSIONS, image_stem, read_image, read_image_size
from ..data.lazy import is_lazy_candidate, open_regions
from ..data.normalize import Normalizer
from ..data.planes import Planes
from ..errors import DataError, UserError
from ..metrics import PredictionRecord
from ..outputs.files import (COCO_JSON, IMAGES_JSON, PredictionFiles, RunOutputs, existing_prediction, read_prediction,
                             write_prediction)
from ..runtime.atomic import remove_stale_temporaries
from ..runtime.distributed import DistContext
from ..runtime.memory import Plan, default_max_memory, plan_inference
from ..runtime.signals import StopSignals
from ..structures import Detector, InstanceResult
from .diameter import SCALING_KEYS, AutoScale, Scaling, scaling_for
from .loading import LoadedModel, load_checkpoint_model, load_model
from .large import StreamStopped, streamed_shape
from .ranks import RankResult, merge_ranks, my_images
from .segment import segment
from .streaming import image_entry, predict_streamed_image, predict_together, stream_warning, streamed_together
from .tiling import TILE_OVERLAP


@dataclass
class Predictor:
    """A model ready for inference with the normalisation it was trained with."""

    model: Detector
    normalizer: Normalizer
    device: torch.device
    precision: str = "fp32"  # see maskrcnn.runtime.precision; exported models always run float32
    # images are resized by this factor before the model sees them (maskrcnn.prediction.segment), or under
    # AutoScale by a factor chosen per image from its nucleus diameter (maskrcnn.prediction.diameter)
    scale: float | AutoScale = 1.0
    tta: bool = False  # test-time augmentation: the 8 flips and quarter turns, merged by the mask NMS
    # bytes the whole process may use: picks whole, tiled or streamed (default $MASKRCNN_MAX_MEMORY or 2 GB)
    max_memory: int = field(default_factory=default_max_memory)
    engine: str = "torch"  # what computes the model: torch, openvino or onnxruntime (maskrcnn.export.engines)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        engine: str = "auto") -> "Predictor":
        """A built-in name or training checkpoint, rewritten for inference (``model.for_inference``)."""
        return cls._of(load_checkpoint_model(path, device, precision, engine))

    @classmethod
    def from_weights(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                     engine: str = "auto") -> "Predictor":
        """A built-in model's name, a checkpoint, or a file from ``maskrcnn export`` (.onnx run by
        OpenVINO or ONNX Runtime, a TorchScript .pt by torch.jit; on the CPU); ``engine`` as in
        maskrcnn.export.engines (auto: OpenVINO on the CPU where it is installed)."""
        return cls._of(load_model(path, device, precision, engine))

    @classmethod
    def _of(cls, loaded: LoadedModel) -> "Predictor":
        return cls(loaded.model, loaded.normalizer, loaded.device, loaded.precision, scale=loaded.scale,
                   engine=loaded.engine)

    @property
    def class_names(self) -> list[str]:
        return self.model.cfg.class_names

    def for_image(self, image: np.ndarray) -> tuple[str | None, "Predictor"]:
        """The model for a raw image: this one (maskrcnn.prediction.choice picks among built-in ones)."""
        return None, self

    def __call__(self, image: np.ndarray, tile: int | None = None, overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A raw image (H, W) or (H, W, C) of any dtype -> its instances, on the CPU."""
        return self.predict_normalized(self.normalizer(image), tile, overlap)

    def predict_normalized(self, image: torch.Tensor, tile: int | None = None,
                           overlap: int = TILE_OVERLAP) -> InstanceResult:
        """A normalised (C, H, W) float image -> its instances, on the CPU; resized as ``scaling``
        chooses; tiled with ``tile``, or when ``max_memory`` cannot hold the model on the whole image
        (tile size from maskrcnn.runtime.memory)."""
        return self.predict_scaled(image, tile, overlap)[0]

    def predict_scaled(self, image: torch.Tensor, tile: int | None = None,
                       overlap: int = TILE_OVERLAP) -> tuple[InstanceResult, Scaling]:
        """As ``predict_normalized``, with the Scaling the image was resized by (its estimated
        nucleus diameter under AutoScale)."""
        scaling = self.scaling(image)
        tile = tile or self.plan(tuple(image.shape[-2:]), None, overlap, in_memory=True, scale=scaling.scale).tile
        return self.predict_planned(image, tile, overlap, scaling.scale), scaling

    def scaling(self, image: torch.Tensor) -> Scaling:
        """How a normalised image (C, H, W) is resized: by ``scale``, or as AutoScale estimates."""
        return scaling_for(self.scale, image)

    def predict_planned(self, image: torch.Tensor, tile: int | None, overlap: int = TILE_OVERLAP,
                        scale: float | None = None, floor: float | None = None) -> InstanceResult:
        """A normalised (C, H, W) image as planned already: whole when ``tile`` is None, else tiled;
        ``scale`` as chosen for it (None: the fixed ``scale``, 1 under AutoScale); ``floor`` as in
        maskrcnn.prediction.segment (None: from this image)."""
        scale = self._fixed_scale() if scale is None else scale
        return segment(self.model, image, self.device, tile, overlap, self.precision, scale, self.tta, floor)

    def plan(self, shape: tuple[int, int], tile: int | None = None, overlap: int = TILE_OVERLAP,
             in_memory: bool = False, scale: float | None = None) -> Plan:
        """Whole, tiled or streamed for an image of ``shape`` (H, W) at ``scale`` (None: as in
        ``predict_planned``) under ``max_memory`` (maskrcnn.runtime.memory.plan_inference);
        ``in_memory``: never streamed."""
        scale = self._fixed_scale() if scale is None else scale
        return plan_inference(self.model.cfg, shape, self.max_memory, scale=scale, overlap=overlap, tile=tile,
                              in_memory=in_memory)

    def min_contrast(self, share: float) -> None:
        """Drop instances fainter than ``share`` of the way from the background to the objects' level
        (the model's ``mask_test_min_contrast`` for this predictor; maskrcnn.prediction.contrast)."""
        self.model.cfg = self.model.cfg.replace(mask_test_min_contrast=share)

    def _fixed_scale(self) -> float:
        return 1.0 if isinstance(self.scale, AutoScale) else self.scale


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted), zarr folders (one image each) and glob patterns -> image
    paths, in order, no repeats."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and is_lazy_candidate(path):  # an OME-Zarr / zarr folder is one image
            paths.append(path)
        elif path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.exists():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no such file, folder or matching pattern")
            paths += [p for p in matches if p.is_file()]
    return list(dict.fromkeys(paths))


def input_images(inputs: list[str] | list[Path]) -> list[Path]:
    """The images ``inputs`` name (see expand_inputs), checked: at least one, and no two whose outputs
    would share a name. The CLI calls it before loading a model, so that these errors come at once."""
    paths = expand_inputs([str(item) for item in inputs])
    if not paths:
        raise UserError(f"no images found in {' '.join(map(str, inputs))}")
    _check_unique_stems(paths)
    return paths


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
    diameters: list[float] = field(default_factory=list)  # the nucleus diameters --diameter auto estimated
    models: list[str] = field(default_factory=list)  # the built-in model chosen for each image (no --weights)
    segmented: int = 0  # images segmented and written, by every rank (``written`` lists this rank's)

    @property
    def images_json(self) -> Path:
        return self.coco_json.with_name(IMAGES_JSON)


def predict_files(predictor: Predictor | Any, inputs: list[str], out_dir: str | Path, *, tile: int | None = None,
                  overlap: int = TILE_OVERLAP, kaggle: bool = False, progress: bool = True,
                  skip_existing: bool = False, rois: bool = False, geojson: bool = False,
                  planes: Planes | None = None, dist: DistContext | None = None) -> PredictRun:
    """Predict every input image; a bad image is reported and skipped, the others still processed.
    ``predictor``: a Predictor, or anything with its ``for_image``, ``plan`` and ``class_names`` that
    picks one per image (maskrcnn.prediction.choice.ModelChoice).
    ``rois`` / ``geojson``: also write each image's instance outlines as an ImageJ ROI zip / a QuPath
    GeoJSON (see outputs_outlines). ``skip_existing``: keep the outputs of images that have all
    their files already, those two included when asked for (see outputs). ``planes``: the channel,
    z-slice (or projection) and time point of multi-dimensional images (maskrcnn.data.planes).
    ``dist``: under torchrun each rank segments its share of the images and rank 0 writes the run's
    files for all (maskrcnn.prediction.ranks); the returned run is the whole run's on rank 0."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by a run killed while writing
    paths = input_images(inputs)
    dist = dist or DistContext.single()
    together = streamed_together(predictor, paths, tile, overlap, planes, dist)  # streamed by every rank
    mine = my_images(len(paths), dist, together)
    run, written, skipped = RunOutputs(out, kaggle), [], []
    stopped_by, done = None, 0
    earlier = _earlier_run(out) if skip_existing else {}
    with StopSignals(graceful=True, unit="image") as signals:
        for index in tqdm(mine, desc="predict", unit="img", disable=not (progress and dist.is_main)):
            image_id, path = index + 1, paths[index]
            check = skip_existing and (dist.is_main or index not in together)  # rank 0 decides for shared ones
            if index in together:  # every rank comes here, and stops here when any rank was asked to
                kept = _kept_prediction(out, path, predictor.class_names, rois, geojson) if check else None
                if kept is None and dist.is_main:
                    stream_warning(path, together[index], run, rois, geojson)
                outcome = predict_together(predictor, run, image_id, path, together[index], overlap, planes, signals,
                                           progress, dist, kept is not None)
                if outcome is False:
                    stopped_by = signals.received
                    break
                if outcome is True and dist.is_main:
                    _add_kept(run, image_id, path, kept, earlier)
                    skipped.append(path)
                written += [outcome] if isinstance(outcome, PredictionFiles) else []
                done += dist.is_main
                continue
            if signals.received:  # after the image in progress: the rest are not started
                stopped_by = signals.received
                continue  # (to the next image all ranks segment together, or the end)
            kept = _kept_prediction(out, path, predictor.class_names, rois, geojson) if check else None
            if kept is not None:
                _add_kept(run, image_id, path, kept, earlier)
                skipped.append(path)
            else:
                try:
                    files = _predict_one(predictor, run, image_id, path, tile, overlap, rois, geojson, planes,
                                         signals, progress)
                except StreamStopped:  # a signal stopped a streamed image between tiles: none of its files
                    stopped_by = signals.received
                    continue  # (as above: the images all ranks segment together still meet the others)
                written += [files] if files else []
            done += 1
    segmented = len(written)
    if dist.active:
        merged = merge_ranks(run, RankResult(run.images, run.coco, run.kaggle_table, run.failed, segmented, skipped,
                                             stopped_by, done), dist, paths)
        segmented, skipped, stopped_by, done = merged.written, merged.skipped, merged.stopped_by, merged.done
    # rank 0 writes the run's files, for the images done: images.json lists them
    coco_json, kaggle_csv = run.write() if dist.is_main else run.paths()
    estimated = [entry["diameter"] for entry in run.images if entry.get("diameter_from") == "objects"]
    models = [entry["model"] for entry in run.images if "model" in entry]
    return PredictRun(written, run.failed, coco_json, kaggle_csv, skipped, stopped_by, done, len(paths), estimated,
                      models, segmented)


def _predict_one(predictor: Predictor, run: RunOutputs, image_id: int, path: Path, tile: int | None,
                 overlap: int, rois: bool, geojson: bool, planes: Planes | None = None,
                 signals: StopSignals | None = None, progress: bool = False) -> PredictionFiles | None:
    """Predict one image, write its files and add it to the run; None when it cannot be read.

    An image whose outputs do not fit ``predictor.max_memory`` is streamed (maskrcnn.prediction.large):
    StreamStopped when ``signals`` receives a stop before its last tile. A zarr folder is opened
    once, for its size and then its pixels; a file's size comes from its header."""
    folder = None
    try:
        folder = open_regions(path, planes) if path.is_dir() else None
        plan = predictor.plan(folder.shape if folder else read_image_size(path, planes), tile, overlap)
        if plan.mode == "stream":
            stream_warning(path, plan.tile, run, rois, geojson)
            return predict_streamed_image(predictor, run, image_id, path, plan.tile, overlap, planes, signals,
                                          progress, folder)
        image = folder.read(0, folder.shape[0], 0, folder.shape[1]) if folder else read_image(path, planes)
        model, chosen = predictor.for_image(image)
        normalized = chosen.normalizer(image)
        result, scaling = chosen.predict_scaled(normalized, tile, overlap)
    except DataError as err:
        run.failed.append((path, err.problem))
        return None
    finally:
        getattr(folder, "close", lambda: None)()
    files = write_prediction(run.out_dir, image_stem(path), image, normalized, result, predictor.class_names,
                             rois=rois, geojson=geojson)
    run.add(image_id, path, image.shape[:2], result, image_entry(scaling, model))
    return files


def _add_kept(run: RunOutputs, image_id: int, path: Path, kept: PredictionRecord | tuple[int, int],
              earlier: dict[str, dict]) -> None:
    """List an image an earlier run predicted (see _kept_prediction) as this run lists its own."""
    entry = earlier.get(str(path), {})
    if isinstance(kept, tuple):
        run.add_streamed(image_id, path, kept, entry.get("scaling"))
    else:
        run.add_record(image_id, path, kept, entry.get("scaling"), entry.get("coco"))


def _kept_prediction(out: Path, path: Path, class_names: list[str], rois: bool,
                     geojson: bool) -> PredictionRecord | tuple[int, int] | None:
    """The prediction of ``path`` an earlier run left in ``out`` (with the outline files asked for),
    or None to predict it (again); for a streamed image (maskrcnn.prediction.large) its (H, W)."""
    files = existing_prediction(out, image_stem(path), rois=rois, geojson=geojson)
    if files is not None and streamed_shape(files.label_image) is not None:
        return None if rois or geojson else streamed_shape(files.label_image)  # not read: slide-sized
    return read_prediction(files, class_names) if files else None


def _earlier_run(out: Path) -> dict[str, dict]:
    """What an earlier run into ``out`` recorded of each image, by file name: how it was resized
    (images.json) and its COCO records (results_coco.json, as computed, where the instance tables
    round boxes and scores), so that the images it kept are listed as a fresh run lists them; {}
    without a readable images.json."""
    try:
        entries = json.loads((out / IMAGES_JSON).read_text())
        earlier = {e["file_name"]: {"scaling": {k: e[k] for k in (*SCALING_KEYS, "model") if k in e}, "coco": []}
                   for e in entries}
        names = {e["id"]: e["file_name"] for e in entries}
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    try:
        for record in json.loads((out / COCO_JSON).read_text()):
            earlier[names[record["image_id"]]]["coco"].append(record)
    except (OSError, ValueError, TypeError, KeyError):  # none, or not that run's: rebuilt from the tables
        for entry in earlier.values():
            entry["coco"] = []
    return earlier


def _check_unique_stems(paths: list[Path]) -> None:
    """Outputs are named by stem: two inputs with one stem would overwrite each other's files."""
    by_stem: dict[str, Path] = {}
    for path in paths:
        stem = image_stem(path)
        if by_stem.setdefault(stem, path) != path:
            raise UserError(f"{path}: same name as {by_stem[stem]}; their outputs "
                            f"({stem}_labels.png, ...) would overwrite each other")
