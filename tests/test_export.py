"""Export to TorchScript and ONNX: the exported files give the checkpoint's results on real inputs.

One small model is trained once per test run (70 steps on 96 x 96 synthetic blobs, about 45 s;
test_inference shares it) so that it returns real detections; ``maskrcnn export`` writes it in
both formats (traced on a 96 x 96 example), and every test compares the files, run through
``Predictor.from_weights`` exactly as ``maskrcnn predict --weights`` runs them, against eager
inference from the checkpoint in float32 (``--precision fp32``: exported models run float32, and
``auto`` may pick bfloat16).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from maskrcnn import Config, MaskRCNN, Target
from maskrcnn.modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.data.io import read_label_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.export.deploy import exported_kind, load_exported, postprocess
from maskrcnn.errors import UserError
from maskrcnn.export.graph import InferenceGraph, export_model
from maskrcnn.prediction.predict import Predictor

from conftest import consecutive_pairs, tiny_config, torch_threads, train_steps

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              # tracing and the TorchScript-based ONNX exporter (export_model calls them)
              pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]

EXPORT_SIZE = 96
# 50 steps left a weak (0.40) detection on a blank image on some CPUs; from 60 on it finds none
STEPS = 70
FORMATS = {"onnx": "model.onnx", "torchscript": "model_ts.pt"}
# each exported file by each engine that runs it: (file, --engine)
RUNNERS = {"onnx": ("onnx", "onnxruntime"), "onnx-openvino": ("onnx", "openvino"), "torchscript": ("torchscript", "torch")}


def blob_picture(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float picture in [0, 1] of non-touching bright discs (radius 6 to 14) on a noisy
    background, and their (G, H, W) bool masks; about one disc per 1800 pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    wanted = max(2, height * width // 1800)
    occupied = np.zeros((height, width), bool)
    masks = []
    for _ in range(400):
        if len(masks) == wanted:
            break
        r = rng.uniform(6, 14)
        cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        if not (d2 <= (r + 2) ** 2)[occupied].any():
            occupied |= d2 <= r * r
            masks.append(d2 <= r * r)
    picture = np.clip(0.1 + 0.8 * occupied + 0.05 * rng.standard_normal((height, width)), 0, 1)
    return picture, np.stack(masks)


def rgb8(picture: np.ndarray) -> np.ndarray:
    return np.repeat((picture * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def train_tiny_model() -> tuple[MaskRCNN, Normalizer]:
    """A small model trained for STEPS steps on six 96 x 96 blob images (normalised as predict does)."""
    torch.manual_seed(0)
    normalizer = Normalizer(channels=3)
    images, targets = [], []
    for seed in range(6):
        picture, masks = blob_picture(EXPORT_SIZE, EXPORT_SIZE, seed)
        images.append(normalizer(rgb8(picture)))
        targets.append(Target.from_masks(torch.from_numpy(masks)))
    cfg = Config(**tiny_config(rcnn_fc_channels=128, rcnn_train_batch_size=32, mask_train_batch_size=16,
                               rpn_test_nms_pre_score_threshold=0.5, rcnn_test_nms_pre_score_threshold=0.3,
                               # per-proposal sampling: with per-instance draws this small model scores a
                               # blank image at 0.4-0.5 (three weak boxes); the no-instance case needs none
                               train_sample_per_instance=False))
    model = MaskRCNN(cfg)
    # two threads, as every serial run of the suite on two cores trained it: under pytest-xdist a
    # worker has one, and a model trained on another thread count differs in its weak detections
    with torch_threads(2):
        train_steps(model, consecutive_pairs(images, targets), STEPS, lr=1e-3, weight_decay=1e-4)
    return model.eval(), normalizer


def tiny_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of :func:`train_tiny_model`, trained once per test run: pytest-xdist's workers
    share it through their common temporary folder (the first to need it trains, the others wait
    for it and load it), so that the modules using it do not each train it."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_model.pt"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            model, normalizer = train_tiny_model()
            save_checkpoint(path, Checkpoint(config=model.cfg, model_state=model.state_dict(),
                                             normalizer=normalizer.to_dict()))
    return path


def tiny_trained_model(tmp_path_factory) -> tuple[MaskRCNN, Normalizer]:
    """:func:`train_tiny_model`'s model (eval) and normaliser, from :func:`tiny_checkpoint`."""
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path_factory))
    model = MaskRCNN(ckpt.config)
    model.load_state_dict(ckpt.model_state)
    return model.eval(), Normalizer.from_dict(ckpt.normalizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The trained checkpoint and its two exports, written by the ``maskrcnn export`` command.
    Training takes the most time of the suite: every test that uses it is marked ``slow``."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = tiny_checkpoint(tmp_path_factory)
    paths = {"checkpoint": checkpoint}
    for fmt, name in FORMATS.items():
        code = main(["export", "--weights", str(checkpoint), "--format", fmt, "--out", str(root / name),
                     "--size", str(EXPORT_SIZE)])
        assert code == 0
        paths[fmt] = root / name
    return paths


@pytest.fixture(scope="module")
def predictors(files):
    found = {"checkpoint": Predictor.from_weights(files["checkpoint"], precision="fp32", engine="torch")}
    for name, (fmt, engine) in RUNNERS.items():
        found[name] = Predictor.from_weights(files[fmt], precision="fp32", engine=engine)
    return found


def input_images() -> dict[str, np.ndarray]:
    """Raw images of the export size, two other sizes, grayscale 8-bit and 16-bit."""
    return {
        "export size": rgb8(blob_picture(EXPORT_SIZE, EXPORT_SIZE, 100)[0]),
        "128x160": rgb8(blob_picture(128, 160, 101)[0]),
        "75x110, not a multiple of 32": rgb8(blob_picture(75, 110, 102)[0]),
        "grayscale 8-bit": (blob_picture(112, 90, 103)[0] * 255).round().astype(np.uint8),
        "grayscale 16-bit": (300 + blob_picture(100, 120, 104)[0] * 3000).round().astype(np.uint16),
    }


def instance_masks(result) -> torch.Tensor:
    """(K, H, W) bool: each instance's pixels in the label image."""
    ids = torch.arange(1, len(result) + 1, dtype=torch.int32)[:, None, None]
    return result.label_image[None] == ids


def assert_same_result(got, want, name: str) -> None:
    """Same instances: boxes within 0.05 px, scores within 1e-3, labels equal, mask IoU >= 0.95."""
    assert len(got) == len(want), f"{name}: {len(got)} instances, eager has {len(want)}"
    torch.testing.assert_close(got.boxes, want.boxes, atol=0.05, rtol=0, msg=f"{name}: boxes")
    torch.testing.assert_close(got.scores, want.scores, atol=1e-3, rtol=0, msg=f"{name}: scores")
    assert torch.equal(got.labels, want.labels), f"{name}: labels"
    assert got.image_size == want.image_size
    a, b = instance_masks(got), instance_masks(want)
    iou = (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)
    assert (iou >= 0.95).all(), f"{name}: mask IoU {iou.min():.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_exported_model_matches_eager_on_sizes_channels_and_bit_depths(predictors, fmt):
    eager, exported = predictors["checkpoint"], predictors[fmt]
    for name, image in input_images().items():
        want, got = eager(image), exported(image)
        assert len(want) > 0, f"{name}: the trained model finds nothing, so the comparison is empty"
        assert_same_result(got, want, f"{fmt}, {name}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_image_without_instances_gives_zero_detections(predictors, fmt):
    blank = np.full((80, 120, 3), 37, np.uint8)
    want, got = predictors["checkpoint"](blank), predictors[fmt](blank)
    assert len(want) == 0
    assert len(got) == 0 and got.label_image.shape == (80, 120) and not got.label_image.any()
    assert got.mask_probs.shape[0] == 0


def eager_graph_outputs(model: MaskRCNN, image: torch.Tensor):
    """MaskRCNN's own stages up to (not including) make_instance_result, for one (C, H, W) image."""
    with torch.no_grad():
        raw = model.detect(*model.prepare(image))
    (d,) = raw.detections.per_image(1)
    return d.boxes, d.scores, d.labels, raw.mask_probs


@pytest.mark.slow
def test_graph_outputs_are_the_models_detections_and_postprocess_finishes_them(predictors):
    """The graph's four outputs equal MaskRCNN's detections and mask probabilities before
    post-processing, and ``postprocess`` turns them into the result predict returns."""
    model = predictors["checkpoint"].model
    graph = InferenceGraph(model).eval()
    image = Normalizer(channels=3)(rgb8(blob_picture(75, 110, 102)[0]))
    with torch.no_grad():
        outputs = graph(image[None])
    want = eager_graph_outputs(model, image)
    assert len(want[0]) > 0
    for got, expected in zip(outputs, want):
        torch.testing.assert_close(got, expected)
    assert_same_result(postprocess(*outputs, (75, 110), model.cfg), model(image).results[0], "postprocess")


@pytest.mark.slow
def test_exported_files_carry_config_class_names_and_normaliser(files, predictors):
    for fmt in FORMATS:
        assert exported_kind(files[fmt]) == fmt
        predictor = predictors[fmt]
        assert predictor.model.cfg == predictors["checkpoint"].model.cfg
        assert predictor.class_names == ["background", "nucleus"]
        assert predictor.normalizer == predictors["checkpoint"].normalizer
    assert exported_kind(files["checkpoint"]) is None  # a checkpoint stays a checkpoint


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_export_then_predict_writes_the_checkpoints_outputs(files, tmp_path, capsys):
    """``maskrcnn predict --weights x.onnx / x.pt``: same files and contents as with the checkpoint."""
    inputs = tmp_path / "images"
    inputs.mkdir()
    Image.fromarray(rgb8(blob_picture(96, 130, 200)[0])).save(inputs / "rgb.png")
    Image.fromarray((300 + blob_picture(90, 100, 201)[0] * 3000).round().astype(np.uint16)).save(inputs / "deep.png")
    outputs = {}
    for name, weights in files.items():
        out = tmp_path / name
        assert main(["predict", str(inputs), "--weights", str(weights), "--out", str(out), "--no-progress",
                     "--kaggle", "--precision", "fp32"]) == 0
        assert "2 image(s) segmented" in capsys.readouterr().out
        outputs[name] = out
    want = outputs["checkpoint"]
    for fmt in FORMATS:
        got = outputs[fmt]
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
        for stem in ("rgb", "deep"):
            labels_got = read_label_image(got / f"{stem}_labels.png")
            labels_want = read_label_image(want / f"{stem}_labels.png")
            assert labels_want.max() > 0 and labels_got.max() == labels_want.max()
            for i in range(1, int(labels_want.max()) + 1):
                a, b = labels_got == i, labels_want == i
                assert (a & b).sum() / (a | b).sum() >= 0.95
            rows_got, rows_want = (read_rows(d / f"{stem}_instances.csv") for d in (got, want))
            assert [r["class"] for r in rows_got] == [r["class"] for r in rows_want]
            assert all(abs(float(g["score"]) - float(w["score"])) <= 1e-3 for g, w in zip(rows_got, rows_want))
        coco_got, coco_want = (json.loads((d / "results_coco.json").read_text()) for d in (got, want))
        assert len(coco_got) == len(coco_want) > 0


@pytest.mark.slow
def test_cli_export_errors_are_one_line(files, tmp_path, capsys):
    code = main(["export", "--weights", str(files["checkpoint"]), "--format", "onnx", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "m.pt: --format onnx needs a file name ending in .onnx" in err
    assert not (tmp_path / "m.pt").exists()
    code = main(["export", "--weights", str(tmp_path / "missing.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt: checkpoint not found" in err


@pytest.mark.slow
def test_predict_with_damaged_or_foreign_exports_is_a_one_line_error(files, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(rgb8(blob_picture(64, 64, 5)[0])).save(image)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(files["onnx"].read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(foreign))
    for weights, problem in [(broken, "not a readable ONNX model"), (foreign, "not a maskrcnn export")]:
        code = main(["predict", str(image), "--weights", str(weights), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"{weights}: {problem}" in err
    code = main(["predict", str(image), "--weights", str(files["onnx"]), "--out", str(tmp_path / "o"),
                 "--device", "cuda"])
    assert code == 2 and "exported models run on the CPU" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_onnxruntime_is_a_one_line_error_naming_the_extra(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UserError, match=r"model.onnx: running ONNX models needs onnxruntime; .*maskrcnn\[engines\]"):
        load_exported(files["onnx"], engine="onnxruntime")
    monkeypatch.setitem(sys.modules, "openvino", None)  # auto: ONNX Runtime where OpenVINO is missing
    with pytest.raises(UserError, match=r"model.onnx: running ONNX models needs onnxruntime"):
        load_exported(files["onnx"])


@pytest.mark.slow
def test_exported_model_is_inference_only(predictors):
    with pytest.raises(UserError, match="inference only"):
        predictors["onnx"].model.train()
    assert predictors["onnx"].model.train(False) is predictors["onnx"].model



def tiny_untrained_model(**changes) -> MaskRCNN:
    """A tiny random model whose zero test thresholds keep its (random) detections."""
    torch.manual_seed(0)
    cfg = Config(**tiny_config(rpn_test_nms_pre_score_threshold=0.0, rpn_test_post_nms_top_k=200,
                               rcnn_test_nms_pre_score_threshold=0.0, rcnn_test_max_detections=50, **changes))
    return MaskRCNN(cfg).eval()


@pytest.mark.slow
def test_grayscale_group_norm_model_exports_too(tmp_path):
    """in_channels 1 and GroupNorm (backbone and mask head) go through both exports unchanged."""
    model = tiny_untrained_model(in_channels=1, norm="group", pixel_mean=[0.5], pixel_std=[0.25])
    normalizer = Normalizer(channels=1)
    image = (blob_picture(70, 90, 7)[0] * 255).round().astype(np.uint8)
    want = model(normalizer(image)).results[0]
    assert len(want) > 0
    for fmt, name in FORMATS.items():
        export_model(model, normalizer.to_dict(), fmt, tmp_path / name, size=64)
        exported, loaded_normalizer = load_exported(tmp_path / name)
        assert exported.cfg.in_channels == 1 and exported.cfg.norm == "group"
        assert exported.kind == ("ONNX Runtime" if fmt == "onnx" else "TorchScript")  # auto: not OpenVINO
        assert_same_result(exported(loaded_normalizer(image)).results[0], want, fmt)
