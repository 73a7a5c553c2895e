"""Run files written by ``maskrcnn export``: ONNX through onnxruntime, TorchScript through torch.jit.

An exported graph stops at the detections and their (D, M, M) mask probabilities (see
``maskrcnn.export.graph``). :func:`postprocess` finishes them exactly as eager inference does
(``make_instance_result``: mask threshold, largest component, minimum area, mask-IoU NMS, label
image), and :class:`ExportedModel` wraps graph + post-processing behind the model's own interface
(``model(images).results``), so prediction, tiling and evaluation use exported files unchanged.

Both kinds run on the CPU. Loading a TorchScript file runs its graph's code (TorchScript ops
only), so load only files you exported or trust; checkpoints stay the only format loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..config import Config, ConfigError
from ..data.normalize import Normalizer
from ..errors import UserError
from ..modeling.mask.postprocess import make_instance_result
from ..structures import Detections, InstanceResult, ModelOutput
from .engines import GRAPH_ENGINES, installed, resolve_engine
from .graph import EXPORT_FORMAT, METADATA_KEY

Outputs = tuple[Tensor, Tensor, Tensor, Tensor]


def postprocess(boxes: Tensor, scores: Tensor, labels: Tensor, mask_probs: Tensor,
                image_size: tuple[int, int], cfg: Config) -> InstanceResult:
    """An exported graph's outputs for one image of ``image_size`` (H, W) -> its InstanceResult.

    boxes (D, 4), scores (D,), labels (D,) and mask_probs (D, M, M), as numpy arrays or tensors.
    """
    boxes, scores, labels, mask_probs = (torch.as_tensor(t) for t in (boxes, scores, labels, mask_probs))
    return make_instance_result(Detections(boxes.float(), scores.float(), labels.long()), mask_probs.float(),
                                image_size, cfg)


class ExportedModel:
    """An exported graph behind ``MaskRCNN``'s inference interface: ``model(images).results``.

    images: a (C, H, W) or (B, C, H, W) tensor or a list of (C, H, W) tensors, values in [0, 1];
    the graph runs once per image. Inference only: ``train()`` refuses.
    """

    training = False

    def __init__(self, run: Callable[[Tensor], Outputs], cfg: Config, path: Path | str, kind: str) -> None:
        self._run = run
        self.cfg = cfg
        self.path = path
        self.kind = kind

    def __call__(self, images: Tensor | list[Tensor]) -> ModelOutput:
        if isinstance(images, Tensor) and images.dim() == 3:
            images = images[None]
        results = []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != self.cfg.in_channels:
                raise ValueError(f"image {i} has shape {tuple(image.shape)}; the model expects "
                                 f"({self.cfg.in_channels}, H, W)")
            outputs = self._run(image[None].to("cpu", torch.float32).contiguous())
            results.append(postprocess(*outputs, (int(image.shape[-2]), int(image.shape[-1])), self.cfg))
        return ModelOutput(results=results)

    def eval(self) -> "ExportedModel":
        return self

    def train(self, mode: bool = True) -> "ExportedModel":
        if mode:
            raise UserError(f"{self.path}: an exported {self.kind} model is for inference only; "
                            "train from the checkpoint")
        return self


# --- recognising and loading files --------------------------------------------------------------
def exported_kind(path: str | Path) -> str | None:
    """'onnx' for a .onnx file, 'torchscript' for a TorchScript archive, None otherwise (a checkpoint).

    Checkpoints and TorchScript files are both zip archives named .pt; only TorchScript holds
    compiled code (``constants.pkl`` beside ``code/``).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return "torchscript"
    return None


def _parse_metadata(path: Path, text: str | None) -> tuple[Config, Normalizer]:
    if not text:
        raise UserError(f"{path}: not a maskrcnn export (no '{METADATA_KEY}' metadata); "
                        "write it with maskrcnn export")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path}: unsupported export format {meta.get('format') if isinstance(meta, dict) else None!r}"
                        f" (this maskrcnn reads {EXPORT_FORMAT})")
    try:
        return Config.from_dict(meta["config"], source=str(path)), Normalizer.from_dict(meta["normalizer"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: incomplete export metadata ({type(err).__name__}: {err})") from None
    except ConfigError as err:
        raise UserError(f"{path}: {err}") from None


def load_onnx(path: Path, engine: str = "onnxruntime") -> tuple[ExportedModel, Normalizer]:
    """A .onnx file run by ``engine`` (onnxruntime or openvino; see maskrcnn.export.engines)."""
    from .engines import ENGINE_NAMES, GraphError, graph_runner

    if not installed(engine, exporting=False):
        raise UserError(f"{path}: running ONNX models needs {engine}; install it with "
                        "pip install 'maskrcnn[engines]'")
    try:
        run, metadata = graph_runner(path.read_bytes(), engine)
    except GraphError as err:
        raise UserError(f"{path}: not a readable ONNX model ({err})") from None
    cfg, normalizer = _parse_metadata(path, metadata)
    return ExportedModel(run, cfg, path, ENGINE_NAMES[engine]), normalizer


def load_torchscript(path: Path) -> tuple[ExportedModel, Normalizer]:
    import torchvision  # noqa: F401  registers torchvision::nms and roi_align, which the graph calls

    extra = {METADATA_KEY: ""}
    try:
        with warnings.catch_warnings():  # torch.jit announces its deprecation on every load
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # torch.jit raises RuntimeError and others for damaged archives
        raise UserError(f"{path}: not a readable TorchScript file ({type(err).__name__})") from None
    text = extra[METADATA_KEY]
    cfg, normalizer = _parse_metadata(path, text.decode() if isinstance(text, bytes) else text)
    module.eval()

    def run(image: Tensor) -> Outputs:
        with torch.inference_mode():
            return module(image)

    return ExportedModel(run, cfg, path, "TorchScript"), normalizer


def _batchnorm_graph(path: Path) -> bool:
    """Whether an ONNX export is of a BatchNorm model: auto runs GroupNorm ones by ONNX Runtime, as
    it runs their checkpoints by torch (see maskrcnn.export.engines)."""
    from .engines import openvino_metadata

    metadata = openvino_metadata(path.read_bytes())
    try:
        return metadata is not None and json.loads(metadata)["config"].get("norm", "batch") == "batch"
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False  # ONNX Runtime's load reports what is wrong with the file


def load_exported(path: str | Path, device: str = "auto", engine: str = "auto") -> tuple[ExportedModel, Normalizer]:
    """An exported file -> (model, the normaliser it was trained with). CPU only: a .onnx file runs
    by ``engine`` (auto: OpenVINO where installed, else ONNX Runtime), TorchScript by torch.jit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    if device not in ("auto", "cpu"):
        raise UserError(f"{path}: exported models run on the CPU; use --device cpu (or auto)")
    kind = exported_kind(path)
    if kind == "onnx":
        if engine == "torch":
            raise UserError(f"{path}: an ONNX file runs by --engine openvino or onnxruntime (or auto), not torch")
        if engine == "auto":
            engine = "openvino" if installed("openvino", exporting=False) and _batchnorm_graph(path) else "onnxruntime"
        elif engine not in GRAPH_ENGINES:
            resolve_engine(engine, "cpu")  # an unknown name: the one-line error
        return load_onnx(path, engine)
    if kind == "torchscript":
        if engine not in ("auto", "torch"):
            raise UserError(f"{path}: a TorchScript file runs by torch (--engine torch or auto); export "
                            f"the checkpoint as ONNX for --engine {engine}")
        return load_torchscript(path)
    raise UserError(f"{path}: not an exported model (.onnx, or a TorchScript .pt from maskrcnn export)")
