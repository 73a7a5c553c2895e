"""Export a trained model to TorchScript or ONNX: ``maskrcnn export``.

:class:`InferenceGraph` traces ``MaskRCNN.prepare`` + ``MaskRCNN.detect``, the model's one
inference path, for one image. That path is written to trace for any image size (every size is
read from a tensor's shape, which tracing keeps as a graph value, and nothing branches on data; see
``maskrcnn.modeling.boxes``), so the exported graph computes what eager inference computes.

    image (1, C, H, W) float32 in [0, 1] (the Normalizer's output)
      -> boxes (D, 4), scores (D,), labels (D,) int64, mask_probs (D, M, M)

D is the detections after the RCNN's NMS and ``rcnn_test_max_detections``, sorted by score.
What follows is outside the graph (:func:`maskrcnn.export.deploy.postprocess`, the same
``make_instance_result`` that eager inference ends with): the mask-score threshold, each mask's
largest connected component (an iterate-until-stable loop), mask-IoU NMS and pasting the
(D, M, M) masks into a label image. The image's intensity normalisation (percentiles, in numpy) is
also outside; its settings travel in the file and ``maskrcnn.export.deploy`` repeats it exactly.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .._version import __version__
from ..config import Config
from ..errors import UserError
from ..modeling.model import MaskRCNN
from ..runtime.atomic import atomic_write_bytes

FORMATS = ("torchscript", "onnx")
EXPORT_FORMAT = "maskrcnn-export/1"
METADATA_KEY = "maskrcnn"            # ONNX metadata_props key and TorchScript extra file name
OUTPUT_NAMES = ["boxes", "scores", "labels", "mask_probs"]
ONNX_OPSET = 17                      # >= 16: RoiAlign with torchvision's pixel convention


class InferenceGraph(nn.Module):
    """``MaskRCNN`` inference on one image, up to the per-image post-processing (see module doc)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raw = self.model.detect(*self.model.prepare(image))
        d = raw.detections  # one image: its image index is all zeros and is left out
        return d.boxes, d.scores, d.labels, raw.mask_probs


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


def onnx_graph_bytes(graph: InferenceGraph, example: Tensor) -> bytes:
    """The graph as ONNX (torch's TorchScript-based exporter), height and width dynamic; no metadata."""
    dynamic = {"image": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
               "labels": {0: "detections"}, "mask_probs": {0: "detections"}}
    buffer = io.BytesIO()
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=OUTPUT_NAMES, dynamic_axes=dynamic)
    return buffer.getvalue()


def model_onnx_bytes(model: MaskRCNN, size: int = 256) -> bytes:
    """A model's inference graph as ONNX bytes, as ``export_model`` writes it but without metadata
    (what the inference engines compile in memory; see maskrcnn.export.engines)."""
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    return onnx_graph_bytes(InferenceGraph(model).eval(), example_image(model.cfg, size, size))


def onnx_bytes(graph: InferenceGraph, example: Tensor, metadata: str) -> bytes:
    """The graph as ONNX (torch's TorchScript-based exporter), with ``metadata`` in metadata_props."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'maskrcnn[export]'") from None
    proto = onnx.load_from_string(onnx_graph_bytes(graph, example))
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
    from ..modeling.checkpoint import load_checkpoint

    ckpt = load_checkpoint(weights)
    model = MaskRCNN(ckpt.config.replace(backbone_weights=None))
    model.load_state_dict(ckpt.model_state)
    return export_model(model, ckpt.normalizer, fmt, out, size)
