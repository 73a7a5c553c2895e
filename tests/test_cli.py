"""End-to-end tests of the ``maskrcnn`` command: train, predict and evaluate (errors: test_cli_errors.py).

One tiny model is trained per module (a few steps on 64x64 synthetic images) and reused by the
predict and evaluate tests. Its config lowers the test-time score thresholds so that even an
untrained model returns instances, which makes the output checks non-trivial. The real DSB2018
sample (``../shared/data``) is used when present and skipped cleanly when not.
"""

from __future__ import annotations

import csv
import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import maskrcnn
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.presets import nuclei_config
from maskrcnn.data.datasets import open_dataset
from maskrcnn.data.io import read_label_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.prediction.evaluate import evaluate_model
from maskrcnn.metrics import EvaluationReport
from maskrcnn.prediction.predict import Predictor
from maskrcnn.runtime.precision import training_amp
from maskrcnn.structures import InstanceResult, ModelOutput

from cli_helpers import check_user_error, cli
from conftest import OPEN, tiny_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_DSB = SHARED_DATA / "dsb2018-kaggle-layout"
REAL_LABELS = SHARED_DATA / "dsb2018-labels"
REAL_ID = "0ea221716cf13710214dcd331a61cea48308c3940df1d28cfc7fd817c83714e1"
REAL_INSTANCES = 369

# an untrained model scores ~0.5: keep its detections, but few of them
TINY_CONFIG = tiny_config(**OPEN, rpn_test_post_nms_top_k=200, mask_test_nms_overlap_threshold=0.3,
                          rcnn_test_max_detections=50)
FAST = ["--crop", "64", "--batch-size", "2", "--device", "cpu", "--no-progress"]
LOSS_PARTS = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask")
N_SYNTH = 5

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.usefixtures("one_torch_thread")]

needs_real_data = pytest.mark.skipif(not (REAL_DSB.is_dir() and REAL_LABELS.is_dir()),
                                     reason=f"real DSB2018 sample not present in {SHARED_DATA}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def instance_masks(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): labels == i for i in np.unique(labels) if i}


def kaggle_decode(encoded: str, shape: tuple[int, int]) -> np.ndarray:
    """DSB2018 run-length string (1-based starts, column-major) -> (H, W) bool mask."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    values = [int(v) for v in encoded.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(shape, order="F")


# --- one tiny trained model for the module ----------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_yaml(workspace) -> Path:
    path = workspace / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def synth(workspace) -> Path:
    root = workspace / "synth"
    write_synthetic_dataset(root, N_SYNTH, 64, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(workspace, synth, tiny_yaml) -> tuple[Path, str]:
    """(run dir, stdout) of ``maskrcnn train`` for 4 steps, validating every 2."""
    run = workspace / "run"
    stdout = StringIO()
    with redirect_stdout(stdout):
        code = main(["train", "--data", str(synth), "--out", str(run), "--config", str(tiny_yaml),
                     "--iters", "4", "--val-every", "2", *FAST])
    assert code == 0
    return run, stdout.getvalue()


@pytest.fixture(scope="module")
def weights(trained) -> Path:
    return trained[0] / "last.pt"


# --- train --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_writes_checkpoints_log_and_curves(trained):
    run, stdout = trained
    # the closing line names the precision: train's default, bfloat16 autocast where the CPU has it natively
    precision = "bfloat16 autocast" if training_amp(None, "cpu") else "float32"
    assert f"trained 4 steps in {precision} (stopped by iterations)" in stdout
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    with Image.open(run / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 100

    records = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in records if "rpn_cls" in r]
    val_rows = [r for r in records if any(k.startswith("val_") for k in r)]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert all(np.isfinite(row[k]) for k in LOSS_PARTS) and row["lr"] > 0
    # validated at steps 2 and 4, once each (the final step is not validated twice)
    assert [r["step"] for r in val_rows] == [2, 4]
    for key in ("val_mask_ap", "val_mask_ap50", "val_box_ap50", "val_dsb_score", "val_f1_50"):
        assert all(key in r for r in val_rows), key
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {line}"))

    last = load_checkpoint(run / "last.pt")
    best = load_checkpoint(run / "best.pt")
    assert last.step == 4 and best.step in (2, 4)
    assert last.metrics.keys() == {k[4:] for k in val_rows[-1] if k.startswith("val_")}


@pytest.mark.slow
def test_checkpoint_holds_config_classes_normalizer_and_version(weights):
    payload = torch.load(weights, map_location="cpu", weights_only=True)  # plain data only
    assert payload["format"] == "maskrcnn-checkpoint/1"
    assert payload["version"] == maskrcnn.__version__
    assert payload["config"]["class_names"] == ["background", "nucleus"]
    assert all(payload["config"][k] == v for k, v in TINY_CONFIG.items())
    assert Normalizer.from_dict(payload["normalizer"]) == Normalizer(channels=3)
    assert isinstance(payload["optimizer"], dict) and isinstance(payload["rng_state"], torch.Tensor)

    ckpt = load_checkpoint(weights)
    assert ckpt.class_names == ["background", "nucleus"] and ckpt.config.num_classes == 2
    assert ckpt.version == maskrcnn.__version__
    predictor = Predictor.from_checkpoint(weights, "cpu")
    assert predictor.class_names == ["background", "nucleus"] and not predictor.model.training
    result = predictor(np.zeros((64, 64), np.uint8))
    assert result.label_image.shape == (64, 64)


@pytest.mark.slow
def test_predict_does_not_need_the_imagenet_file_training_started_from(weights, synth, tmp_path, capsys):
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    payload["config"]["backbone_weights"] = str(tmp_path / "elsewhere" / "resnet18-imagenet.pth")
    moved = tmp_path / "moved.pt"
    torch.save(payload, moved)
    code, out, err = cli(capsys, "predict", synth / "images" / "synth_0000.png", "--weights", moved,
                         "--out", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "out" / "synth_0000_labels.png").is_file()


@pytest.mark.slow
def test_train_resume_continues_from_last(trained, synth, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        shutil.copy(trained[0] / name, run / name)
    # no --config: the checkpoint's (tiny) configuration is used, with a warning
    with pytest.warns(UserWarning, match="resuming with the checkpoint's configuration"):
        code, out, err = cli(capsys, "train", "--data", synth, "--out", run, "--resume", "--iters", "5",
                             "--val-every", "100", *FAST)
    assert code == 0, err
    assert "trained 5 steps" in out
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.step == 5 and ckpt.config.fpn_channels == TINY_CONFIG["fpn_channels"]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "rpn_cls" in r]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_train_max_minutes_stops_by_time_and_flags_override_yaml(synth, tmp_path, capsys):
    config = tmp_path / "resnet34.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "backbone": "resnet34"}))
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", synth, "--out", run, "--config", config,
                         "--backbone", "resnet18", "--max-minutes", "0.02", "--val-every", "1000", *FAST)
    assert code == 0, err
    assert "(stopped by time)" in out
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.config.backbone == "resnet18"  # the flag wins over the YAML
    assert ckpt.config.fpn_channels == TINY_CONFIG["fpn_channels"]  # the rest of the YAML holds
    assert ckpt.step == max(r["step"] for r in read_jsonl(run / "metrics.jsonl"))
    assert (run / "best.pt").is_file() and (run / "curves.png").is_file()


@pytest.mark.slow
def test_train_epochs(synth, tiny_yaml, tmp_path, capsys):
    # 5 images: 4 train, 1 validation; batch 2 -> 2 steps per epoch
    code, out, err = cli(capsys, "train", "--data", synth, "--out", tmp_path / "run", "--config", tiny_yaml,
                         "--epochs", "1", "--val-every", "1000", "--amp", "off", *FAST)
    assert code == 0, err
    assert "trained 2 steps in float32 (stopped by epochs)" in out
    assert load_checkpoint(tmp_path / "run" / "last.pt").step == 2


@pytest.fixture
def data_with_a_broken_image(synth, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    for folder in ("images", "masks"):
        for extra in sorted((root / folder).glob("*.png"))[3:]:
            extra.unlink()  # keep 3 samples: 2 train, 1 validation
    (root / "images" / "synth_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_train_unreadable_sample_is_an_error_naming_it(data_with_a_broken_image, tiny_yaml, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data", data_with_a_broken_image, "--out", tmp_path / "run",
                       "--config", tiny_yaml, "--iters", "1", *FAST)
    check_user_error(code, err, data_with_a_broken_image / "images" / "synth_0001.png", "cannot read image")


@pytest.mark.slow
def test_train_skip_bad_lists_and_skips_unreadable_samples(data_with_a_broken_image, tiny_yaml, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 1 unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", data_with_a_broken_image, "--out", run, "--config",
                             tiny_yaml, "--iters", "1", "--skip-bad", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out
    assert (run / "skipped.txt").read_text().startswith("synth_0001\t")
    assert load_checkpoint(run / "last.pt").step == 1


# --- predict ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predicted(workspace, synth, weights) -> tuple[Path, list[Path], str]:
    """(out dir, inputs, stdout) of ``maskrcnn predict`` on three image files with --kaggle."""
    images = sorted((synth / "images").glob("*.png"))[:3]
    out = workspace / "predicted"
    stdout = StringIO()
    with redirect_stdout(stdout):
        code = main(["predict", *map(str, images), "--weights", str(weights), "--out", str(out),
                     "--kaggle", "--device", "cpu", "--no-progress"])
    assert code == 0
    return out, images, stdout.getvalue()


def check_image_outputs(out: Path, image: Path) -> np.ndarray:
    """Check NAME_labels.png, NAME_overlay.png and NAME_instances.csv; return the label image."""
    stem = image.stem
    with Image.open(out / f"{stem}_labels.png") as png:
        assert png.mode in ("I;16", "I")  # 16-bit
        labels = np.array(png).astype(np.int64)
    with Image.open(image) as source:
        assert labels.shape == (source.height, source.width)
    with Image.open(out / f"{stem}_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (labels.shape[1], labels.shape[0])
    rows = read_csv(out / f"{stem}_instances.csv")
    ids = sorted(int(i) for i in np.unique(labels) if i)
    assert [int(r["id"]) for r in rows] == ids == list(range(1, len(ids) + 1))
    for row in rows:
        area = int((labels == int(row["id"])).sum())
        assert int(row["area"]) == area and row["class"] == "nucleus" and 0 <= float(row["score"]) <= 1
    return labels


@pytest.mark.slow
def test_predict_files_write_labels_overlay_and_table(predicted):
    out, images, stdout = predicted
    assert f"{len(images)} image(s) segmented" in stdout
    counts = [len(np.unique(check_image_outputs(out, image))) - 1 for image in images]
    assert sum(counts) > 0  # the low thresholds make the checks above non-trivial
    assert (out / "results_coco.json").is_file() and (out / "submission.csv").is_file()


@pytest.mark.slow
def test_predict_coco_results_load_and_decode_to_the_label_images(predicted):
    out, images, _ = predicted
    meta = json.loads((out / "images.json").read_text())
    assert [m["file_name"] for m in meta] == [str(p) for p in images]
    gt = COCO()
    gt.dataset = {"images": [{k: m[k] for k in ("id", "file_name", "height", "width")} for m in meta],
                  "categories": [{"id": 1, "name": "nucleus"}], "annotations": []}
    gt.createIndex()
    results = json.loads((out / "results_coco.json").read_text())
    dt = gt.loadRes(str(out / "results_coco.json")) if results else None
    for m, image in zip(meta, images):
        labels = read_label_image(out / f"{image.stem}_labels.png")
        truth = instance_masks(labels)
        records = [r for r in results if r["image_id"] == m["id"]]
        assert len(records) == len(truth)
        for k, record in enumerate(records, start=1):  # record k is the label image's id k
            assert record["category_id"] == 1 and record["segmentation"]["size"] == list(labels.shape)
            assert np.array_equal(mask_utils.decode(record["segmentation"]).astype(bool), truth[k])
        if dt is not None:
            loaded = dt.loadAnns(dt.getAnnIds(imgIds=[m["id"]]))
            assert len(loaded) == len(truth)
            assert all(np.array_equal(dt.annToMask(a), truth[k]) for k, a in enumerate(loaded, start=1))
    assert results, "no instance in any image: nothing checked"


@pytest.mark.slow
def test_predict_kaggle_submission_decodes_to_the_label_images(predicted):
    out, images, _ = predicted
    rows = read_csv(out / "submission.csv")
    assert rows and set(rows[0]) == {"ImageId", "EncodedPixels"}
    assert list(dict.fromkeys(r["ImageId"] for r in rows)) == [p.stem for p in images]
    for image in images:
        labels = read_label_image(out / f"{image.stem}_labels.png")
        truth = instance_masks(labels)
        encoded = [r["EncodedPixels"] for r in rows if r["ImageId"] == image.stem]
        if not truth:
            assert encoded == [""]
            continue
        decoded = [kaggle_decode(e, labels.shape) for e in encoded]
        assert len(decoded) == len(truth)
        for k, mask in enumerate(decoded, start=1):
            assert np.array_equal(mask, truth[k])


@pytest.mark.slow
def test_predict_folder_and_glob(synth, weights, tmp_path, capsys):
    code, out, err = cli(capsys, "predict", synth / "images", "--weights", weights, "--out", tmp_path / "folder",
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert f"{N_SYNTH} image(s) segmented" in out
    assert len(list((tmp_path / "folder").glob("*_labels.png"))) == N_SYNTH

    pattern = str(synth / "images" / "synth_000[34].png")
    code, out, err = cli(capsys, "predict", pattern, "--weights", weights, "--out", tmp_path / "glob",
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "glob").glob("*_labels.png")) == [
        "synth_0003_labels.png", "synth_0004_labels.png"]
    for image in (synth / "images" / "synth_0003.png", synth / "images" / "synth_0004.png"):
        check_image_outputs(tmp_path / "glob", image)
    assert (tmp_path / "glob" / "results_coco.json").is_file()
    assert not (tmp_path / "glob" / "submission.csv").exists()  # only with --kaggle


@pytest.mark.slow
def test_predict_tiled(synth, weights, tmp_path, capsys):
    image = synth / "images" / "synth_0001.png"
    out_dir = tmp_path / "tiled"
    code, out, err = cli(capsys, "predict", image, "--weights", weights, "--out", out_dir, "--tile", "32",
                         "--overlap", "8", "--kaggle", "--device", "cpu", "--no-progress")
    assert code == 0, err
    labels = check_image_outputs(out_dir, image)
    assert len(json.loads((out_dir / "results_coco.json").read_text())) == len(np.unique(labels)) - 1
    assert read_csv(out_dir / "submission.csv")[0]["ImageId"] == image.stem


@pytest.mark.slow
def test_predict_skips_an_unreadable_image_and_exits_2(synth, weights, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(synth / "images" / "synth_0000.png", folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    code, out, err = cli(capsys, "predict", folder, "--weights", weights, "--out", tmp_path / "out",
                         "--device", "cpu", "--no-progress")
    assert code == 2
    assert "1 image(s) segmented" in out
    assert err.startswith(f"maskrcnn: skipped {folder / 'broken.png'}: cannot read image")
    assert (tmp_path / "out" / "good_labels.png").is_file()
    assert "broken.png" in (tmp_path / "out" / "failed.txt").read_text()


# --- evaluate -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_prints_tables_and_writes_json(synth, weights, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "evaluate", "--weights", weights, "--data", synth, "--out", report_path,
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    for heading in ("COCO AP", "Instance matching", "DSB2018 score", "Per image", "synth_0004"):
        assert heading in out
    assert f"report written to {report_path}" in out
    report = json.loads(report_path.read_text())
    assert len(report["images"]) == N_SYNTH and len(report["microscopy"]) == 10
    truth_counts = [len(open_dataset(synth)[i].masks) for i in range(N_SYNTH)]
    assert [r["n_true"] for r in report["images"]] == truth_counts
    for key in ("mask_ap", "mask_ap50", "box_ap", "dsb_score", "f1_50", "pq_50"):
        value = report["summary"][key]
        assert value is None or 0.0 <= value <= 1.0


class OracleModel(torch.nn.Module):
    """Stands in for MaskRCNN in evaluate_model: returns given results, one per call, in order."""

    def __init__(self, results: list[InstanceResult]):
        super().__init__()
        self.cfg = nuclei_config()
        self.results = list(results)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        result = self.results.pop(0)
        assert tuple(image.shape[-2:]) == result.image_size
        return ModelOutput(results=[result])


def result_from_masks(masks: np.ndarray) -> InstanceResult:
    """An InstanceResult whose instances are the given disjoint (K, H, W) masks, score 1."""
    k = len(masks)
    boxes = np.zeros((k, 4), np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    ids = np.arange(1, k + 1, dtype=np.int32)[:, None, None]
    label_image = (masks * ids).max(axis=0) if k else np.zeros(masks.shape[1:], np.int32)
    return InstanceResult(torch.from_numpy(boxes), torch.ones(k), torch.ones(k, dtype=torch.int64),
                          torch.zeros(k, 28, 28), torch.from_numpy(label_image.astype(np.int32)))


def test_evaluate_model_scores_the_truth_1_and_a_worse_prediction_less(synth):
    reader = open_dataset(synth, "labels")
    truth = [reader[i].masks for i in range(len(reader))]
    normalizer = Normalizer()

    perfect = evaluate_model(OracleModel([result_from_masks(m) for m in truth]), normalizer, reader,
                             progress=False)
    assert isinstance(perfect, EvaluationReport)
    summary = perfect.summary()
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "dsb_score", "accuracy_50", "f1_50"):
        assert summary[key] == pytest.approx(1.0), key
    assert all(row.fp == row.fn == 0 for row in perfect.microscopy)

    # each image loses its first instance
    worse = [result_from_masks(masks[1:]) for masks in truth]
    imperfect = evaluate_model(OracleModel(worse), normalizer, reader, progress=False).summary()
    for key in ("mask_ap", "mask_ap50", "box_ap", "dsb_score", "recall_50", "f1_50"):
        assert imperfect[key] < summary[key] - 0.01, key
    assert imperfect["recall_50"] == pytest.approx(1 - len(truth) / sum(map(len, truth)))
    assert imperfect["precision_50"] == pytest.approx(1.0)


# --- the real DSB2018 sample -------------------------------------------------------------------------------
@pytest.mark.slow
@needs_real_data
def test_real_sample_predict_and_evaluate(weights, tmp_path, capsys):
    image = REAL_LABELS / "images" / f"{REAL_ID}.png"
    code, out, err = cli(capsys, "predict", REAL_LABELS / "images", "--weights", weights, "--out", tmp_path / "pred",
                         "--kaggle", "--device", "cpu", "--no-progress")
    assert code == 0, err
    labels = check_image_outputs(tmp_path / "pred", image)
    assert labels.shape == (520, 696)

    for data, fmt in ((REAL_LABELS, "labels"), (REAL_DSB, "dsb")):
        report_path = tmp_path / f"{fmt}.json"
        code, out, err = cli(capsys, "evaluate", "--weights", weights, "--data", data, "--format", fmt,
                             "--out", report_path, "--device", "cpu", "--no-progress")
        assert code == 0, err
        report = json.loads(report_path.read_text())
        assert len(report["images"]) == 1, fmt
        row = report["images"][0]
        assert row["name"] == REAL_ID and row["n_true"] == REAL_INSTANCES, fmt
        assert row["n_pred"] == len(np.unique(labels)) - 1  # the same model and image as predict


@pytest.mark.slow
@needs_real_data
def test_real_sample_short_train_holds_out_a_band(tiny_yaml, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", REAL_DSB, "--out", run, "--config", tiny_yaml,
                         "--iters", "2", "--val-every", "2", *FAST, "--batch-size", "1")
    assert code == 0, err
    assert "trained 2 steps" in out
    val = [r for r in read_jsonl(run / "metrics.jsonl") if "val_dsb_score" in r]
    assert len(val) == 1 and val[0]["step"] == 2
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.step == 2 and ckpt.class_names == ["background", "nucleus"]
