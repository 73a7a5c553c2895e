"""End-to-end tests of ``maskrcnn train`` in-process (predict and evaluate: test_cli_predict.py;
errors: test_cli_errors.py).

One tiny model is trained per module (cli_helpers.py's fixtures). The real DSB2018 sample
(``../shared/data``) is used when present and skipped cleanly when not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import maskrcnn
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.data.normalize import Normalizer
from maskrcnn.prediction.predict import Predictor
from maskrcnn.runtime.precision import training_amp

from cli_helpers import (FAST, REAL_DSB, TINY_CONFIG, check_user_error, cli, needs_real_data, read_jsonl,  # noqa: F401
                         synth, tiny_yaml, trained, weights, workspace)  # fixtures

LOSS_PARTS = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask")

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.usefixtures("one_torch_thread")]


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


@pytest.mark.slow
@needs_real_data
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
