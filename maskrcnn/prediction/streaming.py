"""``predict_files``'s streamed images (maskrcnn.prediction.large): the model and scale chosen from
each one's central window, its tile, its files and its entry in the run; alone, or with every rank.

Under torchrun an image streamed under ``--max-memory`` is segmented by all ranks together (its
tiles spread over them) rather than by one rank: :func:`streamed_together` lists these images, as
rank 0 plans them (the memory plan depends on each process's resident memory, and the ranks must
agree). At each such image every rank meets the others (:func:`predict_together`): a stop signalled
to any rank stops them all there, and rank 0 alone decides whether ``--skip-existing`` keeps it,
chooses its model, scale and tile, records it and writes its files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.io import image_stem, read_image_size
from ..data.lazy import open_regions
from ..data.planes import Planes
from ..data.regions import RegionSource
from ..errors import DataError, UserError
from ..outputs.files import PredictionFiles, RunOutputs
from ..runtime.distributed import DistContext
from ..runtime.signals import StopSignals
from .diameter import AutoScale, Scaling, central_box
from .large import SAMPLE_PIXELS, StreamStopped, predict_streamed, region_source

if TYPE_CHECKING:
    from .predict import Predictor


def image_entry(scaling: Scaling, model: str | None) -> dict:
    """What images.json records of how an image was predicted: its scaling, and the built-in model
    chosen for it when the run chose per image."""
    return scaling.to_dict() | ({"model": model} if model else {})


def stream_warning(path: Path, tile: int, run: RunOutputs, rois: bool, geojson: bool) -> None:
    """Say that ``path`` is streamed, and which of the files asked for it will not have."""
    missing = [name for name, asked in (("ROIs", rois), ("GeoJSON", geojson), ("Kaggle rows", run.kaggle),
                                        ("COCO records", True)) if asked]
    warnings.warn(f"{path}: larger than --max-memory allows in memory: streamed in tiles of {tile} to "
                  f"{image_stem(path)}_labels.tif (tiled BigTIFF), without {', '.join(missing)}")


def streamed_together(predictor: Predictor, paths: list[Path], tile: int | None, overlap: int,
                      planes: Planes | None, dist: DistContext) -> dict[int, int]:
    """Under torchrun, {input index: tile} of the inputs rank 0 plans to stream (from their headers);
    {} in one process. An unreadable image is left to the rank it falls to, which reports it."""
    if not dist.active:
        return {}
    planned, problem = {}, None
    if dist.is_main:
        try:
            for index, path in enumerate(paths):
                try:
                    plan = predictor.plan(_shape(path, planes), tile, overlap)
                except DataError:
                    continue
                if plan.mode == "stream":
                    planned[index] = plan.tile
        except UserError as err:  # --max-memory too small: every rank ends with it
            problem = str(err)
    planned, problem = dist.all_gather_objects((planned, problem))[0]
    if problem is not None:
        raise UserError(problem)
    return planned


def _shape(path: Path, planes: Planes | None) -> tuple[int, int]:
    if not path.is_dir():
        return read_image_size(path, planes)
    folder = open_regions(path, planes)
    try:
        return folder.shape
    finally:
        getattr(folder, "close", lambda: None)()


def predict_together(predictor: Predictor, run: RunOutputs, image_id: int, path: Path, tile: int,
                     overlap: int, planes: Planes | None, signals: StopSignals, progress: bool,
                     dist: DistContext, kept: bool) -> PredictionFiles | bool | None:
    """One image every rank streams together (see the module). ``kept``: rank 0's
    ``--skip-existing`` found its files (rank 0 records it; other ranks' value is ignored).

    Returns rank 0's files (None on other ranks, or when the image cannot be read: rank 0 lists it
    as failed), True when kept, False when a rank asked to stop (here or between tiles: every rank
    returns False, and none of the image's files is written).
    """
    parts = dist.all_gather_objects((signals.received is not None, kept))
    if any(stop for stop, _ in parts):
        return False
    if parts[0][1]:
        return True
    try:
        return predict_streamed_image(predictor, run, image_id, path, tile, overlap, planes, signals, progress,
                                      dist=dist)
    except StreamStopped:
        return False
    except DataError as err:
        if dist.is_main:
            run.failed.append((path, err.problem))
        return None


def predict_streamed_image(predictor: Predictor, run: RunOutputs, image_id: int, path: Path, tile: int,
                           overlap: int, planes: Planes | None, signals: StopSignals | None, progress: bool,
                           source: RegionSource | None = None,
                           dist: DistContext | None = None) -> PredictionFiles | None:
    """Stream one image tile by tile and write its files (see maskrcnn.prediction.large): from ``source`` when
    it is open already, else read lazily when maskrcnn.data.lazy can (a TIFF or zarr, with the
    ``slides`` extra installed) or decoded whole. The caller closes a ``source`` it gave.
    ``dist``: every rank calls this together; rank 0 records the image and returns its files."""
    from tqdm import tqdm

    dist = dist or DistContext.single()
    opened = source is None
    bar = tqdm(desc=f"{path.name} tiles", unit="tile", leave=False, disable=not (progress and dist.is_main))
    try:
        setup, problem = None, None
        try:
            source = region_source(path, planes) if opened else source
            setup = _setup(predictor, source) if dist.is_main else None
        except UserError as err:  # every rank must hear of it, or the others would wait for this one
            if not dist.active:
                raise
            problem = (err.path, err.problem) if isinstance(err, DataError) else str(err)
        parts = dist.all_gather_objects((setup, problem))
        for _, problem in parts:
            if problem is not None:
                raise DataError(*problem) if isinstance(problem, tuple) else UserError(problem)
        model, scaling = parts[0][0]
        chosen = predictor if model is None else predictor.predictor(model)

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        stop = (lambda: signals.received is not None) if signals is not None else None
        done = predict_streamed(chosen, source, run.out_dir, image_stem(path), tile, overlap, scale=scaling.scale,
                                should_stop=stop, progress=advance, dist=dist)
    finally:
        bar.close()
        if opened and source is not None:
            getattr(source, "close", lambda: None)()
    if not dist.is_main:
        return None
    run.add_streamed(image_id, path, done.shape, image_entry(scaling, model))
    return PredictionFiles(done.label_image, done.overlay, done.table)


def _setup(predictor: Predictor, source: RegionSource) -> tuple[str | None, Scaling]:
    """The built-in model (None: ``predictor`` itself) and the scaling of a streamed image, judged by
    its central window. (Its tile is the one planned for it: a plan given a tile keeps it.)"""
    window = source.read(*central_box(source.shape))
    model, chosen = predictor.for_image(window)
    if isinstance(chosen.scale, AutoScale):
        return model, chosen.scaling(_normalized_window(chosen, source, window))
    return model, Scaling(chosen.scale)


def _normalized_window(predictor: Predictor, source: RegionSource, window: np.ndarray) -> torch.Tensor:
    """The central window of a streamed image that AutoScale judges it by, normalised with the
    whole image's intensity range (as its tiles are)."""
    return predictor.normalizer(window, predictor.normalizer.intensity_range(source.sample(SAMPLE_PIXELS)))
