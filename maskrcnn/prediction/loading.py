"""Loading a model for prediction: a built-in name, a checkpoint or an exported file, run by the
engine ``--engine`` names (maskrcnn.export.engines) on the device ``--device`` names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..builtin import is_builtin, resolve_weights, trained_diameter
from ..data.normalize import Normalizer
from ..errors import UserError
from ..export.deploy import exported_kind, load_exported
from ..export.engines import engine_model, resolve_engine
from ..modeling.checkpoint import load_checkpoint
from ..modeling.model import MaskRCNN, for_inference
from ..runtime.distributed import resolve_device
from ..runtime.precision import autocast_dtype
from ..structures import Detector
from .diameter import AutoScale


@dataclass
class LoadedModel:
    """What a Predictor is built from."""

    model: Detector
    normalizer: Normalizer
    device: torch.device
    precision: str  # what torch's autocast applies around the model: fp32 for the graph engines
    scale: float | AutoScale
    engine: str  # the engine that runs it: torch, openvino or onnxruntime


def load_checkpoint_model(path: str | Path, device: str = "auto", precision: str = "auto",
                          engine: str = "auto") -> LoadedModel:
    """A built-in name or training checkpoint, rewritten for inference (``model.for_inference``);
    on the CPU a graph engine runs it instead of torch when ``engine`` says so."""
    target = resolve_device(device)
    autocast_dtype(precision, target)  # an unknown name fails before the load
    chosen = resolve_engine(engine, target, precision=precision)
    ckpt = load_checkpoint(resolve_weights(path), map_location=target)
    if engine == "auto" and ckpt.config.norm != "batch":
        # GroupNorm graphs crashed OpenVINO 2026.4 limited to AVX2 (docs/experiments.md): auto keeps
        # torch for them; --engine openvino still runs them
        chosen = "torch"
    engine = chosen
    # every weight is in the checkpoint: the ImageNet file training started from is not needed here
    model = MaskRCNN(ckpt.config.replace(backbone_weights=None))
    model.load_state_dict(ckpt.model_state)
    model = for_inference(model)
    trained = trained_diameter(path)
    normalizer = Normalizer.from_dict(ckpt.normalizer)
    scale = AutoScale.for_model(trained, normalizer) if trained else 1.0
    if engine != "torch":
        return LoadedModel(engine_model(model, engine), normalizer, target, "fp32", scale, engine)
    return LoadedModel(model.to(target), normalizer, target, precision, scale, engine)


def load_model(path: str | Path, device: str = "auto", precision: str = "auto", engine: str = "auto") -> LoadedModel:
    """A built-in model's name, a checkpoint, or a file from ``maskrcnn export``: .onnx run by
    OpenVINO or ONNX Runtime, a TorchScript .pt by torch.jit (both on the CPU)."""
    if is_builtin(path) or not exported_kind(path):
        return load_checkpoint_model(path, device, precision, engine)
    if precision not in ("auto", "fp32"):
        raise UserError(f"{path}: exported models run in float32; use --precision fp32 (or auto)")
    model, normalizer = load_exported(path, device, engine)
    ran_by = {"OpenVINO": "openvino", "ONNX Runtime": "onnxruntime"}.get(model.kind, "torch")
    return LoadedModel(model, normalizer, torch.device("cpu"), "fp32", 1.0, ran_by)
