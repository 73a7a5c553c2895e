"""Run a model over an annotated dataset and score it (``maskrcnn evaluate`` and validation)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .data.datasets import InstanceReader, Sample
from .data.normalize import Normalizer
from .distributed import DistContext
from .metrics import EvaluationReport, PredictionRecord, TruthRecord, encode_masks, evaluate
from .inference import segment
from .tiling import TILE_OVERLAP
from .structures import Detector, InstanceResult


def truth_record(sample: Sample) -> TruthRecord:
    """The truth as RLEs (bounded memory) plus a label image when the instances do not overlap."""
    masks = sample.masks
    label_image = None
    if len(masks) == 0 or masks.sum(axis=0, dtype=np.int32).max() <= 1:
        ids = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
        label_image = (masks * ids).max(axis=0) if len(masks) else np.zeros(sample.image.shape[:2], np.int32)
    return TruthRecord(sample.name, label_image=label_image, masks=encode_masks(masks), labels=sample.labels)


def prediction_record(name: str, result: InstanceResult) -> PredictionRecord:
    """Label-image ids run 1..K in the order of the result's rows, so boxes and scores line up."""
    return PredictionRecord(name, label_image=result.label_image.numpy(), labels=result.labels.numpy(),
                            boxes=result.boxes.numpy(), scores=result.scores.numpy())


def evaluate_model(model: Detector, normalizer: Normalizer, reader: InstanceReader, *,
                   device: torch.device | str = "cpu", progress: bool = True, tile: int | None = None,
                   overlap: int = TILE_OVERLAP, dist: DistContext | None = None) -> EvaluationReport:
    """Predict every image of ``reader`` and score against its annotation.

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
        result = segment(model, normalizer(sample.image), device, tile, overlap)
        records.append((index, truth_record(sample), prediction_record(sample.name, result)))
    model.train(was_training)
    gathered = sorted((r for part in dist.all_gather_objects(records) for r in part), key=lambda r: r[0])
    truths = [t for _, t, _ in gathered]
    predictions = [p for _, _, p in gathered]
    return evaluate(truths, predictions, max_dets=model.cfg.rcnn_test_max_detections)
