"""What the metrics score: one image's truth and prediction as records, and their builders.

A record holds an image's instances as a label image and/or instance masks (dense or RLE), with
per-instance class labels and, for predictions, boxes and scores. ``truth_record`` and
``prediction_record`` make them from a data sample and a model's ``InstanceResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import UserError
from .rle import RLE, Masks, as_rles, encode_label_image, encode_masks

if TYPE_CHECKING:  # only for annotations: the metrics need neither the readers nor torch
    from ..data.datasets import Sample
    from ..structures import InstanceResult


@dataclass(eq=False)
class _Instances:
    """What truth and predictions share: one image's instances as a label image and/or masks.

    The instances are ``masks`` in order or, when ``masks`` is None, the label image's non-zero
    ids in ascending order; per-instance arrays (``labels``, and boxes and scores of a
    prediction) follow that order. ``labels`` None means class 1 for every instance.
    """

    name: str
    label_image: np.ndarray | None = None
    masks: Masks | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.label_image is None and self.masks is None:
            raise UserError(f"{self.name}: give a label image or instance masks")
        if self.image_size is None:
            raise UserError(f"{self.name}: cannot tell the image size from an empty RLE list; "
                            "give a label image or a (0, H, W) mask array")

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.label_image is not None:
            return tuple(self.label_image.shape)
        if isinstance(self.masks, np.ndarray):
            return tuple(self.masks.shape[1:])
        return tuple(self.masks[0]["size"]) if len(self.masks) else None

    @cached_property
    def rles(self) -> list[RLE]:
        """Each instance's COCO RLE."""
        return as_rles(self.masks) if self.masks is not None else encode_label_image(self.label_image)[1]

    def class_ids(self) -> np.ndarray:
        """(N,) class id of each instance."""
        labels = self._per_instance("labels")
        return np.ones(len(self.rles), np.int64) if labels is None else labels

    def _per_instance(self, field_name: str) -> np.ndarray | None:
        """A per-instance field as an array, checked against the number of instances (None if absent)."""
        values = getattr(self, field_name)
        if values is None:
            return None
        values = np.asarray(values)
        if len(values) != len(self.rles):
            raise UserError(f"{self.name}: {len(values)} {field_name} for {len(self.rles)} instances")
        return values


@dataclass(eq=False)
class TruthRecord(_Instances):
    """The ground truth of one image.

    name: pairs it with the PredictionRecord of the same name.
    label_image: (H, W) int, 0 background, ids arbitrary (the microscopy metrics' input).
    masks: (G, H, W) bool or G RLEs, which may overlap (COCO-style); with no label image, disjoint
        dense masks are painted into one (id i + 1 for mask i) and overlapping ones are matched by
        mask IoU.
    labels: (G,) class ids; None: all 1.
    """


@dataclass(eq=False)
class PredictionRecord(_Instances):
    """The model's output for one image.

    label_image: (H, W) int with overlaps resolved (``InstanceResult.label_image``); the
        microscopy metrics use it when given, else the masks.
    masks: (D, H, W) bool or D RLEs (``encode_masks``), one per detection: COCO mask AP uses them
        when given, else the label image's instances. Give them whenever detections may be hidden
        under others in the label image, as the ids then no longer line up with the detections.
    boxes: (D, 4) xyxy in pixels; None: the masks' bounding boxes.
    scores: (D,) confidences ranking detections for COCO AP; None: all 1, in input order.
    labels: (D,) class ids; None: all 1.
    """

    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None

    def boxes_xywh(self) -> np.ndarray:
        """(D, 4) float64 boxes as COCO's (x, y, width, height)."""
        boxes = self._per_instance("boxes")
        if boxes is None:
            return mask_utils.toBbox(self.rles) if self.rles else np.zeros((0, 4))
        xyxy = boxes.astype(float).reshape(-1, 4)
        return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)

    def confidences(self) -> np.ndarray:
        """(D,) scores; all 1 when none were given."""
        scores = self._per_instance("scores")
        return np.ones(len(self.rles)) if scores is None else scores


def truth_record(sample: Sample) -> TruthRecord:
    """A data sample's truth as RLEs (bounded memory) plus a label image when the instances do not overlap.

    sample.masks (G, H, W) bool become G RLEs; the label image, (H, W) int32, gives mask i the id i + 1.
    """
    masks = sample.masks
    label_image = None
    if len(masks) == 0 or masks.sum(axis=0, dtype=np.int32).max() <= 1:
        ids = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
        label_image = (masks * ids).max(axis=0) if len(masks) else np.zeros(sample.image.shape[:2], np.int32)
    return TruthRecord(sample.name, label_image=label_image, masks=encode_masks(masks), labels=sample.labels)


def prediction_record(name: str, result: InstanceResult) -> PredictionRecord:
    """A model's InstanceResult (K instances) as a record of its label image, labels, boxes and scores.

    The result's label-image ids run 1..K in the order of its rows, so the label image's instances
    line up with the boxes and scores.
    """
    return PredictionRecord(name, label_image=result.label_image.numpy(), labels=result.labels.numpy(),
                            boxes=result.boxes.numpy(), scores=result.scores.numpy())
