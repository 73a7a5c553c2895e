"""Inference engines (maskrcnn.export.engines): the built-in model run by OpenVINO and ONNX Runtime
gives eager's instances, and --engine is resolved and refused as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn import Config, MaskRCNN
from maskrcnn.cli.main import main
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.io import read_image
from maskrcnn.data.synthetic_scenes import SceneReader
from maskrcnn.errors import UserError
from maskrcnn.export import engines
from maskrcnn.export.engines import ENGINES, resolve_engine
from maskrcnn.metrics.overlaps import label_overlaps
from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
from maskrcnn.prediction.predict import Predictor

from conftest import TINY

REAL_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnfinder-nuclei" / "images" / \
    "2022-03-18_RPE1_3.tif"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictors():
    """The built-in nuclei model in float32 by each engine, at the image's own scale."""
    found = {}
    for engine in ("torch", "openvino", "onnxruntime"):
        found[engine] = Predictor.from_weights("nuclei", "cpu", "fp32", engine)
        found[engine].scale = 1.0
    return found


def assert_same_instances(got, want, name: str) -> None:
    """Counts within 1%, and each of eager's instances matched one-to-one by mask IoU >= 0.99."""
    assert len(want) > 10, f"{name}: the comparison needs instances, eager found {len(want)}"
    assert abs(len(got) - len(want)) <= 0.01 * len(want), f"{name}: {len(got)} instances, eager {len(want)}"
    overlaps = label_overlaps(want.label_image.numpy(), got.label_image.numpy())
    best = np.zeros(len(overlaps.true_ids))
    np.maximum.at(best, overlaps.true_index, overlaps.iou)
    matched = (best >= 0.99).sum()
    assert matched >= len(want) - 0.01 * len(want), f"{name}: {matched} of {len(want)} matched at IoU >= 0.99"


def images() -> dict[str, np.ndarray]:
    found = {f"synthetic {size}": SceneReader.draw(size, np.random.default_rng(size))[0] for size in (256, 331)}
    if REAL_IMAGE.is_file():  # a real image (../shared, present on the project's machines)
        found["real"] = read_image(REAL_IMAGE)[:400, :480]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_engines_give_eagers_instances_on_synthetic_and_real_images(predictors, engine):
    assert predictors[engine].engine == engine and predictors["torch"].engine == "torch"
    for name, image in images().items():
        assert_same_instances(predictors[engine](image), predictors["torch"](image), f"{engine}, {name}")


@pytest.mark.slow
def test_engine_result_is_the_same_with_tiles(predictors):
    image = SceneReader.draw(300, np.random.default_rng(7))[0]
    want = predictors["torch"](image, tile=192, overlap=64)
    assert_same_instances(predictors["openvino"](image, tile=192, overlap=64), want, "tiled")


def test_auto_picks_openvino_on_the_cpu_and_torch_on_a_gpu():
    assert resolve_engine("auto", "cpu") == "openvino"
    assert resolve_engine("auto", "cuda") == "torch"
    assert resolve_engine("torch", "cpu") == "torch"
    assert set(ENGINES) == {"auto", "torch", "openvino", "onnxruntime"}


def test_auto_falls_back_to_torch_without_openvino(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    assert resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(UserError, match=r"--engine openvino needs the openvino and onnx packages: .*maskrcnn\[engines\]"):
        resolve_engine("openvino", "cpu")


def test_graph_engine_on_a_gpu_or_unknown_engine_is_refused():
    with pytest.raises(UserError, match="--engine openvino runs on the CPU"):
        resolve_engine("openvino", "cuda")
    with pytest.raises(UserError, match="--engine must be one of"):
        resolve_engine("tensorrt", "cpu")


def test_auto_leaves_bfloat16_to_torch_and_openvino_computes_float32(monkeypatch):
    """Where --precision resolves to bfloat16 torch runs it (OpenVINO's bfloat16 lost accuracy)."""
    hints = []

    class Core:
        def read_model(self, onnx):
            class Graph:
                outputs = [0, 1, 2, 3]

                def has_rt_info(self, key):
                    return False
            return Graph()

        def compile_model(self, graph, device, config):
            hints.append(config["INFERENCE_PRECISION_HINT"])

            class Compiled:
                def create_infer_request(self):
                    return None
            return Compiled()

    monkeypatch.setattr(engines, "_openvino_core", lambda: Core())
    engines.openvino_runner(b"")
    assert hints == ["f32"]
    assert resolve_engine("auto", "cpu", precision="bf16") == "torch"
    assert resolve_engine("auto", "cpu", precision="fp32") == "openvino"
    monkeypatch.setattr(engines, "autocast_dtype", lambda precision, device: torch.bfloat16)
    assert resolve_engine("auto", "cpu", precision="auto") == "torch"  # a CPU with native bfloat16
    monkeypatch.setattr(engines, "autocast_dtype", lambda precision, device: None)
    assert resolve_engine("auto", "cpu", precision="auto") == "openvino"  # one without


@pytest.mark.slow
def test_cli_predict_with_each_engine_writes_the_same_labels(tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(SceneReader.draw(200, np.random.default_rng(11))[0]).save(image)
    labels = {}
    for engine in ("torch", "openvino", "onnxruntime"):
        out = tmp_path / engine
        assert main(["predict", str(image), "--weights", "nuclei", "--out", str(out), "--engine", engine,
                     "--precision", "fp32", "--device", "cpu", "--no-progress"]) == 0
        labels[engine] = np.asarray(Image.open(out / "a_labels.png"))
    for engine in ("openvino", "onnxruntime"):
        overlaps = label_overlaps(labels["torch"], labels[engine])
        assert len(overlaps.true_ids) > 10 and (overlaps.iou >= 0.99).sum() >= 0.99 * len(overlaps.true_ids)


@pytest.mark.slow
@pytest.mark.parametrize("norm, engine", [("batch", "openvino"), ("group", "torch")])
def test_auto_runs_batchnorm_models_by_openvino_and_groupnorm_ones_by_torch(tmp_path, norm, engine):
    model = MaskRCNN(Config(**TINY, norm=norm))
    path = tmp_path / "model.pt"
    save_checkpoint(path, Checkpoint(config=model.cfg, model_state=model.state_dict(),
                                     normalizer=Normalizer().to_dict()))
    assert Predictor.from_checkpoint(path, "cpu", "fp32").engine == engine
    assert Predictor.from_checkpoint(path, "cpu", "fp32", "onnxruntime").engine == "onnxruntime"
