"""End-to-end tests of ``maskrcnn predict`` and ``maskrcnn evaluate`` in-process (train:
test_cli.py; errors: test_cli_errors.py).

One tiny model is trained per module (cli_helpers.py's fixtures) and reused by the tests. The real
DSB2018 sample (``../shared/data``) is used when present and skipped cleanly when not.
"""

from __future__ import annotations

import json
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn.cli.main import main
from maskrcnn.presets import nuclei_config
from maskrcnn.data.datasets import open_dataset
from maskrcnn.data.io import read_label_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.prediction.evaluate import evaluate_model
from maskrcnn.metrics import EvaluationReport
from maskrcnn.structures import InstanceResult, ModelOutput

from cli_helpers import (N_SYNTH, REAL_DSB, REAL_ID, REAL_INSTANCES, REAL_LABELS, cli, needs_real_data,  # noqa: F401
                         read_csv, synth, tiny_yaml, trained, weights, workspace)  # fixtures

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.usefixtures("one_torch_thread")]


def instance_masks(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): labels == i for i in np.unique(labels) if i}


def kaggle_decode(encoded: str, shape: tuple[int, int]) -> np.ndarray:
    """DSB2018 run-length string (1-based starts, column-major) -> (H, W) bool mask."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    values = [int(v) for v in encoded.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(shape, order="F")


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
def test_min_contrast_drops_the_faintest_instances_and_a_bad_value_is_one_line(synth, weights, tmp_path, capsys):
    args = ["predict", synth / "images", "--weights", weights, "--device", "cpu", "--no-progress"]
    counts = []
    for name, extra in (("all", []), ("bright", ["--min-contrast", "1"])):
        code, _, err = cli(capsys, *args, "--out", tmp_path / name, *extra)
        assert code == 0, err
        counts.append(len(json.loads((tmp_path / name / "results_coco.json").read_text())))
    # F = 1 keeps only instances at least as bright as the median object pixel: fewer, not none
    assert 0 < counts[1] < counts[0], counts
    with pytest.raises(SystemExit) as exit_:  # argparse exits on a bad flag value
        cli(capsys, *args, "--out", tmp_path / "bad", "--min-contrast", "2")
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--min-contrast" in err and "from 0 to 1" in err
