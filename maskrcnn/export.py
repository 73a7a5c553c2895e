"""Export a trained model to TorchScript or ONNX: ``maskrcnn export``.

:class:`InferenceGraph` is the model's inference path for one image, written so that tracing
records it for any image size: every size is read from a tensor's shape (tracing keeps those as
graph values), nothing branches on data, and the batched helpers that do (``split_by_image``,
``batched_nms``' empty-input check, ``MultiLevelRoiAlign``'s skipped empty levels) are replaced
by their single-image equivalents. It reuses the model's own submodules and weights and the same
box functions, thresholds and top-k values, so it computes what ``MaskRCNN`` computes.

    image (1, C, H, W) float32 in [0, 1] (the Normalizer's output)
      -> boxes (D, 4), scores (D,), labels (D,) int64, mask_probs (D, M, M)

D is the detections after the RCNN's NMS and ``rcnn_test_max_detections``, sorted by score.
What follows is outside the graph (:func:`maskrcnn.deploy.postprocess`, the same
``make_instance_result`` that eager inference ends with): the mask-score threshold, each mask's
largest connected component (an iterate-until-stable loop), mask-IoU NMS and pasting the
(D, M, M) masks into a label image. The image's intensity normalisation (percentiles, in numpy) is
also outside; its settings travel in the file and ``maskrcnn.deploy`` repeats it exactly.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from . import __version__
from .atomic import atomic_write_bytes
from .boxes import clip_boxes, is_large_enough, rcnn_decode, rpn_decode
from .config import Config
from .errors import UserError
from .model import SIZE_DIVISOR, MaskRCNN
from .roi_align import assign_levels
from .rpn.anchors import make_level_anchors

FORMATS = ("torchscript", "onnx")
EXPORT_FORMAT = "maskrcnn-export/1"
METADATA_KEY = "maskrcnn"            # ONNX metadata_props key and TorchScript extra file name
OUTPUT_NAMES = ["boxes", "scores", "labels", "mask_probs"]
ONNX_OPSET = 17                      # >= 16: RoiAlign with torchvision's pixel convention


def _top_k(n: Tensor | int, k: int) -> Tensor | int:
    """min(n, k) for topk; while tracing ``n`` is a shape value and must stay one (not a constant)."""
    return torch.clamp(n, max=k) if isinstance(n, Tensor) else min(n, k)


class InferenceGraph(nn.Module):
    """``MaskRCNN`` inference on one image, traceable for any height and width (see module doc)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        cfg = model.cfg
        self.cfg = cfg
        self.backbone, self.rpn, self.rcnn, self.mask = model.backbone, model.rpn, model.rcnn, model.mask
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).reshape(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).reshape(1, -1, 1, 1))
        self.register_buffer("base_sizes", torch.tensor(cfg.rpn_base_sizes, dtype=torch.float32))
        # float64 anchor bases, as AnchorGenerator builds them: anchors are identical to eager's
        self.anchor_bases = list(model.anchors.bases)
        self.strides = list(cfg.rpn_scales)
        # (output size, sampling ratio) of the model's two MultiLevelRoiAlign crops
        self.rcnn_crop = (model.rcnn_crop.output_size, model.rcnn_crop.sampling_ratio)
        self.mask_crop = (model.mask_crop.output_size, model.mask_crop.sampling_ratio)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        height, width = image.shape[-2], image.shape[-1]
        features = self.backbone(self._prepare(image, height, width))
        logits, deltas = self.rpn(features)
        anchors = torch.cat([make_level_anchors(bases, f.shape[-2], f.shape[-1], stride)
                             for bases, f, stride in zip(self.anchor_bases, features, self.strides)]).float()
        proposals = self._proposals(anchors, logits[0], deltas[0], height, width)
        boxes, scores, labels = self._detections(features, proposals, height, width)
        return boxes, scores, labels, self._mask_probs(features, boxes, labels)

    def _prepare(self, image: Tensor, height, width) -> Tensor:
        """MaskRCNN.prepare for one image: normalise, then zero-pad to a multiple of 32."""
        x = (image.float() - self.pixel_mean) / self.pixel_std
        pad_h = (SIZE_DIVISOR - height % SIZE_DIVISOR) % SIZE_DIVISOR
        pad_w = (SIZE_DIVISOR - width % SIZE_DIVISOR) % SIZE_DIVISOR
        return F.pad(x, [0, pad_w, 0, pad_h])

    def _proposals(self, anchors: Tensor, logits: Tensor, deltas: Tensor, height, width) -> Tensor:
        """make_proposals (test settings) for one image: logits (N, 2), deltas (N, 2, 4) -> (R, 4)."""
        cfg = self.cfg
        scores = logits.softmax(dim=-1)[:, 1]
        top_scores, top = scores.topk(_top_k(scores.shape[0], cfg.rpn_test_pre_nms_top_k))
        boxes = rpn_decode(anchors[top], deltas[top, 1])
        boxes = clip_boxes(boxes, height, width)
        keep = (top_scores > cfg.rpn_test_nms_pre_score_threshold) & is_large_enough(boxes, cfg.rpn_test_nms_min_size)
        boxes, top_scores = boxes[keep], top_scores[keep]
        kept = nms(boxes, top_scores, cfg.rpn_test_nms_overlap_threshold)[:cfg.rpn_test_post_nms_top_k]
        return boxes[kept]

    def _detections(self, features: list[Tensor], proposals: Tensor, height, width):
        """make_detections for one image -> boxes (D, 4), scores (D,), labels (D,), by score."""
        cfg = self.cfg
        num_classes = cfg.num_classes
        logits, deltas = self.rcnn(self._crop(features, proposals, *self.rcnn_crop))
        boxes = rcnn_decode(proposals[:, None], deltas, cfg.rcnn_box_weights)[:, 1:]     # (R, K-1, 4)
        boxes = clip_boxes(boxes, height, width)
        scores = logits.softmax(dim=1)[:, 1:]
        labels = torch.arange(1, num_classes, device=scores.device).expand_as(scores)
        keep = (scores > cfg.rcnn_test_nms_pre_score_threshold) & is_large_enough(boxes, cfg.rcnn_test_nms_min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # batched_nms' coordinate trick (what eager runs for up to 4000 boxes), with the largest
        # coordinate taken so that no boxes is not a special case: boxes are clipped, so >= 0.
        largest = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
        offsets = labels.to(boxes) * (largest + 1)   # eager's NMS group: image * K + label, image 0
        kept = nms(boxes + offsets[:, None], scores, cfg.rcnn_test_nms_overlap_threshold)
        kept = kept[:cfg.rcnn_test_max_detections]
        return boxes[kept], scores[kept], labels[kept]

    def _crop(self, features: list[Tensor], boxes: Tensor, size: int, sampling_ratio: int) -> Tensor:
        """MultiLevelRoiAlign for one image: every box from the level of nearest base size.

        Each level runs even when it has no boxes (empty RoIAlign), so nothing depends on data.
        The crops come level by level and are put back in the boxes' order by one gather (no
        scatter into a zero-filled tensor, and no ``out[index] = crops``: setitem drops leading
        size-1 dims, which a trace with exactly one box on a level would record as a fixed reshape).
        """
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        levels = assign_levels(boxes, self.base_sizes)
        crops, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            crops.append(roi_align(feature, rois[index], size, spatial_scale=1.0 / stride,
                                   sampling_ratio=sampling_ratio, aligned=False))
            order.append(index)
        return torch.cat(crops)[torch.argsort(torch.cat(order))]

    def _mask_probs(self, features: list[Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """Each detection's mask probabilities for its own class: (D, M, M)."""
        m = self.cfg.mask_size
        logits = self.mask(self._crop(features, boxes, *self.mask_crop))                   # (D, K, M, M)
        own = logits.gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, m, m))[:, 0]
        return torch.sigmoid(own)


# --- writing the files ----------------------------------------------------------------------------
def export_metadata(cfg: Config, normalizer: dict) -> str:
    """What prediction needs besides the graph, as JSON: config (class names included), normaliser."""
    return json.dumps({"format": EXPORT_FORMAT, "version": __version__, "config": cfg.to_dict(),
                       "normalizer": normalizer, "inputs": ["image"], "outputs": OUTPUT_NAMES})


def example_image(cfg: Config, height: int, width: int, seed: int = 0) -> Tensor:
    """A (1, C, H, W) image in [0, 1] to trace with (its content does not shape the graph)."""
    return torch.rand(1, cfg.in_channels, height, width, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _quiet_tracing():
    """Silence the tracer's notes that do not apply here: torchvision's roi_align asserts on a
    static shape (a TracerWarning), and torch.jit and the TorchScript-based ONNX exporter announce
    their deprecation (FutureWarning, DeprecationWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def trace_torchscript(graph: InferenceGraph, example: Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), _quiet_tracing():
        # check_trace re-runs on the same input only; the tests check other sizes instead
        return torch.jit.trace(graph, (example,), check_trace=False)


def torchscript_bytes(graph: InferenceGraph, example: Tensor, metadata: str) -> bytes:
    traced = trace_torchscript(graph, example)
    buffer = io.BytesIO()
    with _quiet_tracing():
        torch.jit.save(traced, buffer, _extra_files={METADATA_KEY: metadata})
    return buffer.getvalue()


def onnx_bytes(graph: InferenceGraph, example: Tensor, metadata: str) -> bytes:
    """The graph as ONNX (torch's TorchScript-based exporter), with ``metadata`` in metadata_props."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'maskrcnn[export]'") from None
    dynamic = {"image": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
               "labels": {0: "detections"}, "mask_probs": {0: "detections"}}
    buffer = io.BytesIO()
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=OUTPUT_NAMES, dynamic_axes=dynamic)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    return proto.SerializeToString()


def export_model(model: MaskRCNN, normalizer: dict, fmt: str, out: str | Path, size: int = 256) -> Path:
    """Write ``model`` (eval mode, CPU) as a TorchScript or ONNX file at ``out`` (atomically).

    The trace uses a ``size`` x ``size`` example; height and width stay dynamic.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    # predict tells the formats apart by this suffix (checkpoints and TorchScript are both .pt)
    if (fmt == "onnx") != (out.suffix.lower() == ".onnx"):
        wanted = "a file name ending in .onnx" if fmt == "onnx" else "a file name not ending in .onnx (model.pt)"
        raise UserError(f"{out}: --format {fmt} needs {wanted}")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    graph = InferenceGraph(model).eval()
    example = example_image(model.cfg, size, size)
    metadata = export_metadata(model.cfg.replace(backbone_weights=None), normalizer)
    data = (torchscript_bytes if fmt == "torchscript" else onnx_bytes)(graph, example, metadata)
    atomic_write_bytes(out, data)
    return out


def export_checkpoint(weights: str | Path, fmt: str, out: str | Path, size: int = 256) -> Path:
    """``maskrcnn export``: a training checkpoint -> a TorchScript or ONNX file."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(weights)
    model = MaskRCNN(ckpt.config.replace(backbone_weights=None))
    model.load_state_dict(ckpt.model_state)
    return export_model(model, ckpt.normalizer, fmt, out, size)
