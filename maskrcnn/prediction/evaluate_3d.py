"""``maskrcnn evaluate --3d``: a model's 3-D nuclei scored against 3-D truth.

The data are the labels layout with stacks: ``ROOT/images/NAME.ext`` Z-stacks (multi-page TIFF,
OME-TIFF, OME-Zarr; read as ``predict --3d`` reads them) and ``ROOT/masks/NAME.ext2`` 3-D label
images of the same (Z, H, W) shape (0 background, one id per nucleus). Each stack is segmented as
``predict --3d`` does (maskrcnn.prediction.volume) and matched to its truth one-to-one by 3-D IoU
on voxels (``volume_overlaps``, counted plane by plane, then ``maskrcnn.metrics.match_instances``);
large stacks and labels are read and kept a plane at a time, as ``predict --3d`` keeps them. Per
stack and overall (the sum of TP, FP and FN over the stacks): acc@0.5 = TP / (TP + FP + FN), F1@0.5, and the
DSB2018-style mean accuracy over IoU 0.5..0.95 (overall: the mean of the stacks' scores, as the
2-D report's DSB2018 score).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.planes import Planes
from ..data.lazy_stack import open_stack
from ..data.stack_reader import anisotropy_of, check_label_stack, stack_pairs
from ..metrics import MatchStats, match_instances
from ..runtime.atomic import atomic_write_text
from .stacks import LAZY_SHARE
from .volume import STITCH_THRESHOLD, segment_stack, volume_overlaps


@dataclass
class StackScore:
    """One stack's (or the pooled) scores at IoU 0.5 and its DSB2018-style score."""

    name: str
    truth: int  # nuclei in the truth
    predicted: int
    tp: int
    fp: int
    fn: int
    accuracy_50: float
    f1_50: float
    dsb_score: float


@dataclass
class VolumeReport:
    stacks: list[StackScore]
    overall: StackScore

    def format_table(self) -> str:
        lines = [f"{'stack':32s} {'truth':>6s} {'pred':>6s} {'acc@0.5':>8s} {'F1@0.5':>7s} {'DSB2018':>8s}"]
        for s in [*self.stacks, self.overall]:
            lines.append(f"{s.name[:32]:32s} {s.truth:6d} {s.predicted:6d} {s.accuracy_50:8.3f} {s.f1_50:7.3f} "
                         f"{s.dsb_score:8.3f}")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=1))


def score(name: str, stats: MatchStats, truth: int, predicted: int, dsb: float) -> StackScore:
    at50 = int(np.flatnonzero(np.isclose(stats.thresholds, 0.5))[0])
    return StackScore(name, truth, predicted, int(stats.tp[at50]), int(stats.fp[at50]), int(stats.fn[at50]),
                      float(stats.accuracy[at50]), float(stats.f1[at50]), dsb)


def evaluate_stacks(predictor, root: str | Path, planes: Planes | None = None,
                    threshold: float = STITCH_THRESHOLD, method: str = "stitch",
                    anisotropy: float | None = None, pairs: list[tuple[str, Path, Path]] | None = None,
                    lazy_from: int | None = None) -> VolumeReport:
    """Segment every stack of ``root`` in 3-D (as segment_stack with ``method`` and ``anisotropy``)
    and score it against its 3-D labels. ``pairs``: root's stack_pairs when the caller has them.

    Memory as ``predict --3d``: stacks past ``lazy_from`` bytes (default: LAZY_SHARE of the
    predictor's budget) are read a plane at a time where they can be, the predicted labels go to a
    plane store in the system's temporary folder (TMPDIR) when the budget cannot hold them; the
    truth is read a plane at a time (where it can be), and the overlaps are counted plane by plane."""
    rows, pooled = [], None
    lazy_from = int(predictor.max_memory * LAZY_SHARE) if lazy_from is None else lazy_from
    for name, image_path, mask_path in pairs if pairs is not None else stack_pairs(root):
        with ExitStack() as opened, tempfile.TemporaryDirectory(prefix="maskrcnn-evaluate-3d-") as spill:
            stack = _closing(opened, open_stack(image_path, planes, lazy_from))
            # the truth is read a plane at a time whatever its size (where it can be): it is needed
            # only after the stack is segmented, plane by plane, and must not crowd the model
            truth = check_label_stack(mask_path, _closing(opened, open_stack(mask_path, None, lazy_from=0)),
                                      stack.shape[:3])
            labels = _closing(opened, segment_stack(predictor, stack, threshold, method=method, spill=Path(spill),
                                                    anisotropy=anisotropy_of(image_path, anisotropy)).labels)
            overlaps = volume_overlaps(truth, labels)
        stats = match_instances(overlaps)
        rows.append(score(name, stats, len(overlaps.true_ids), len(overlaps.pred_ids), stats.dsb_score))
        pooled = stats if pooled is None else pooled + stats
    overall = score("all stacks", pooled, sum(r.truth for r in rows), sum(r.predicted for r in rows),
                    float(np.mean([r.dsb_score for r in rows])))
    return VolumeReport(rows, overall)


def _closing(opened: ExitStack, volume):
    """``volume``, closed when ``opened`` ends if it is a LazyStack or a PlaneStore (arrays need not)."""
    if hasattr(volume, "close"):
        opened.callback(volume.close)
    return volume
