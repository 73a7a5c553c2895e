"""Run a model over an annotated dataset and score it (``maskrcnn evaluate`` and validation)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..data.datasets import InstanceReader
from ..data.normalize import Normalizer
from ..metrics import EvaluationReport, evaluate, prediction_record, truth_record
from ..runtime.distributed import DistContext
from ..runtime.memory import plan_inference
from ..structures import Detector
from .diameter import AutoScale, scaling_for
from .segment import segment
from .tiling import TILE_OVERLAP


def evaluate_model(model: Detector, normalizer: Normalizer, reader: InstanceReader, *,
                   device: torch.device | str = "cpu", progress: bool = True, tile: int | None = None,
                   overlap: int = TILE_OVERLAP, dist: DistContext | None = None,
                   precision: str = "fp32", scale: float | AutoScale = 1.0, tta: bool = False,
                   max_memory: int | None = None) -> EvaluationReport:
    """Predict every image of ``reader`` (at ``precision``, ``scale`` and with ``tta`` as in
    ``maskrcnn.prediction.segment.segment``; an AutoScale ``scale`` is chosen per image, as
    ``predict`` does) and score against its annotation.

    Without ``tile``, each image is processed whole or, given ``max_memory`` (bytes for the whole
    process; ``maskrcnn evaluate --max-memory``), in tiles sized to fit it (maskrcnn.runtime.memory; images
    here always fit in memory). None (validation during training): whole.

    Under torch.distributed each rank predicts its share of the images and every rank returns
    the report over all of them.
    """
    dist = dist or DistContext.single()
    was_training = model.training
    model.eval()
    records = []
    shard = range(dist.rank, len(reader), dist.world_size)
    for index in tqdm(shard, desc="evaluate", unit="img", disable=not (progress and dist.is_main)):
        sample = reader[index]
        image = normalizer(sample.image)
        factor = scaling_for(scale, image).scale
        auto = tile or (plan_inference(model.cfg, tuple(image.shape[-2:]), max_memory, scale=factor,
                                       overlap=overlap, in_memory=True).tile if max_memory else None)
        result = segment(model, image, device, auto, overlap, precision, factor, tta)
        records.append((index, truth_record(sample), prediction_record(sample.name, result)))
    model.train(was_training)
    gathered = sorted((r for part in dist.all_gather_objects(records) for r in part), key=lambda r: r[0])
    truths = [t for _, t, _ in gathered]
    predictions = [p for _, _, p in gathered]
    return evaluate(truths, predictions, max_dets=model.cfg.rcnn_test_max_detections)
