"""Inference engines for CPUs: the exported graph run by OpenVINO or ONNX Runtime (``--engine``).

``predict --engine auto|torch|openvino|onnxruntime`` (and ``evaluate``, the ``Predictor``, the
napari widget) choose what computes the model on the CPU. The engines run the one graph that
``maskrcnn export`` writes (:class:`maskrcnn.export.graph.InferenceGraph`: image -> detections and
mask probabilities, exported to ONNX in memory), and :class:`maskrcnn.export.deploy.ExportedModel`
finishes its outputs with eager inference's own post-processing, so tiling, scaling, TTA and every
output file are the same code for all engines.

The graph keeps height and width dynamic and is compiled once per model: a static compile per
image size gained 3-10% at 512-1024 on the project's CPU (docs/benchmarks.md#inference-engines),
less than the compile (0.3-0.4 s) costs whenever per-image scaling gives each image its own size.

``auto`` follows the benchmark table (docs/benchmarks.md#inference-engines): torch where
``--precision`` resolves to bfloat16 (``auto`` on CPUs with native bfloat16: torch's autocast
keeps the RPN in float32 and was as fast as OpenVINO in float32), OpenVINO elsewhere on the CPU
where it is installed (faster than torch at 512 and 1024), otherwise torch; on a GPU always torch;
and torch for models with GroupNorm (``norm: group``; ONNX Runtime for their exported files),
whose OpenVINO graph crashed (a segmentation fault in OpenVINO 2026.4 with
``ONEDNN_MAX_CPU_ISA=AVX2``; BatchNorm is folded into the convolutions).
Both graph engines compute in float32: OpenVINO's own bfloat16 mode (every layer, the RPN too) cost
0.028 of the DSB2018 score on held-out real images, so it is not offered.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError
from ..runtime.precision import autocast_dtype
from .graph import METADATA_KEY, model_onnx_bytes

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
GRAPH_ENGINES = ("openvino", "onnxruntime")  # those that run the exported graph
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
EXPORT_SIZE = 256  # the example the graph is traced with; height and width stay dynamic

Outputs = tuple[Tensor, Tensor, Tensor, Tensor]
Runner = Callable[[Tensor], Outputs]


class GraphError(Exception):
    """An engine could not read or compile an ONNX graph (the caller names the file)."""


def installed(engine: str, exporting: bool = True) -> bool:
    """Whether ``engine`` can run here (torch always can); ``exporting``: the onnx package that
    torch's exporter needs to write a checkpoint's graph is there too."""
    if engine == "torch":
        return True
    needed = [_PACKAGES[engine]] + (["onnx"] if exporting else [])
    return all(_importable(name) for name in needed)


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: an import made to fail (tests do that)
    return importlib.util.find_spec(name) is not None


def resolve_engine(engine: str, device: torch.device | str, exporting: bool = True, precision: str = "fp32") -> str:
    """``--engine`` on ``device`` at ``precision`` -> the engine that runs: torch, openvino or onnxruntime.

    UserError for an unknown name, a graph engine on a GPU, or one that is not installed.
    """
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    on_cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        low_precision = on_cpu and autocast_dtype(precision, "cpu") is not None
        return "openvino" if on_cpu and not low_precision and installed("openvino", exporting) else "torch"
    if engine != "torch" and not on_cpu:
        raise UserError(f"--engine {engine} runs on the CPU; use --device cpu, or --engine torch on a GPU")
    if not installed(engine, exporting):
        needs = f"the {_PACKAGES[engine]} and onnx packages" if exporting else f"the {_PACKAGES[engine]} package"
        raise UserError(f"--engine {engine} needs {needs}: pip install 'maskrcnn[engines]'")
    return engine


def _threads() -> int:
    return max(1, torch.get_num_threads())  # the engines follow torch's thread count (OMP_NUM_THREADS, ranks)


@lru_cache(maxsize=1)
def _openvino_core():
    import openvino

    return openvino.Core()


def openvino_runner(onnx: bytes) -> tuple[Runner, str | None]:
    """An ONNX graph compiled by OpenVINO for this CPU, in float32 (see the module doc)
    -> (run, the graph's maskrcnn metadata or None)."""
    core = _openvino_core()
    try:
        graph = core.read_model(onnx)
        if len(graph.outputs) != 4:
            raise GraphError(f"{len(graph.outputs)} outputs, expected 4")
        compiled = core.compile_model(graph, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32",  # else bfloat16 on CPUs that have it
            "INFERENCE_NUM_THREADS": _threads(),
            "PERFORMANCE_HINT": "LATENCY",
            # pinned threads of several processes (torchrun ranks) would share the same cores
            "ENABLE_CPU_PINNING": False})
    except RuntimeError as err:  # OpenVINO's own errors for unreadable graphs and unsupported operators
        raise GraphError(f"OpenVINO: {_first_line(err)}") from None
    key = ["framework", METADATA_KEY]
    metadata = graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else None
    request = compiled.create_infer_request()

    def run(image: Tensor) -> Outputs:
        request.infer({0: image.numpy()})
        # the request reuses its output buffers: copy them out
        return tuple(torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(4))

    return run, metadata


def openvino_metadata(onnx: bytes) -> str | None:
    """The maskrcnn metadata of an ONNX graph as OpenVINO reads it (no compile); None if absent or
    unreadable."""
    try:
        graph = _openvino_core().read_model(onnx)
    except RuntimeError:
        return None
    key = ["framework", METADATA_KEY]
    return graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else None


def onnxruntime_runner(onnx: bytes) -> tuple[Runner, str | None]:
    """An ONNX graph run by ONNX Runtime's CPU provider (float32) -> (run, its maskrcnn metadata)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3  # errors only: the shape-inference notes of dynamic sizes are noise
    try:
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise GraphError(f"ONNX Runtime: {_first_line(err)}") from None
    names = [o.name for o in session.get_outputs()]
    if len(names) != 4:
        raise GraphError(f"outputs {names}, expected 4")

    def run(image: Tensor) -> Outputs:
        return tuple(torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))

    return run, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def graph_runner(onnx: bytes, engine: str) -> tuple[Runner, str | None]:
    """The ONNX graph ``onnx`` run by ``engine`` (openvino or onnxruntime) -> (run, its metadata)."""
    if engine == "openvino":
        return openvino_runner(onnx)
    if engine == "onnxruntime":
        return onnxruntime_runner(onnx)
    raise ValueError(f"not a graph engine: {engine!r}")


ENGINE_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def engine_model(model, engine: str):
    """A ``MaskRCNN`` (eval, CPU) -> the same model run by ``engine``: an ExportedModel over its
    graph, exported in memory exactly as ``maskrcnn export --format onnx`` writes it."""
    from .deploy import ExportedModel  # deploy reads files through this module's runners

    run, _ = graph_runner(model_onnx_bytes(model, EXPORT_SIZE), engine)
    return ExportedModel(run, model.cfg, f"the model under --engine {engine}", ENGINE_NAMES[engine])
