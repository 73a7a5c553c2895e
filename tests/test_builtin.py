"""Built-in pretrained models: the shipped ``nuclei`` model, its card, publishing, and the wheel.

The shipped model is part of the product, so these tests use the real file in maskrcnn/builtin/
(no stand-in): it loads with ``weights_only``, fits the size limit, finds synthetic nuclei with no
training, and works by name in predict, evaluate and export, also from a wheel in a fresh venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.builtin import (FOLDER, MAX_FILE_BYTES, builtin_names, card, format_card, is_builtin, publish,
                              resolve_weights)
from maskrcnn.modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.io import read_label_image
from maskrcnn.data.writers import write_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.synthetic_scenes import Scene, synth_scene
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.prediction.predict import Predictor

from cli_helpers import cli
from conftest import TINY_RUN
from test_tiling import matched_iou

ROOT = Path(__file__).resolve().parents[1]


# in-focus nuclei about 20 px across (the size the card states), moderately crowded, every setting fixed
NUCLEI_SCENE = Scene(diameter=20.0, size_spread=0.15, coverage=0.3, touch_fraction=0.3, min_aspect=0.6,
                     irregularity=0.05, kidney_fraction=0.1, condensed_fraction=0.0, dynamic_range=3.0,
                     defocus_fraction=0.0, texture=0.1, nucleoli=0.5, nucleoli_sign=-1.0, background=0.05,
                     vignetting=0.2, blur=1.0, photons=500.0, read_noise=0.01, debris=0, bits=8)


def nuclei_image(seed: int = 3, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 8-bit image of NUCLEI_SCENE and its labels."""
    return synth_scene(size, np.random.default_rng(seed), NUCLEI_SCENE)


# --- the shipped model --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nuclei", "he"])
def test_builtin_model_is_shipped_with_a_complete_card(name):
    assert name in builtin_names()
    info = card(name)
    for key in ("summary", "trained_on", "training", "input", "diameter_px", "scale", "scores", "licence"):
        assert info.get(key), key
    assert info["training"]["hardware"] and info["training"]["minutes"] > 0
    assert 0 < info["file_megabytes"] <= MAX_FILE_BYTES / 2**20
    text = format_card(name)
    assert text.startswith(f"{name}: ") and "data licence" in text and "MB" in text


def test_nuclei_loads_weights_only_in_half_precision():
    ckpt = load_checkpoint(FOLDER / "nuclei.pt")  # load_checkpoint uses torch.load(weights_only=True)
    assert ckpt.optimizer_state is None
    assert {v.dtype for v in ckpt.model_state.values() if v.is_floating_point()} == {torch.float16}
    assert ckpt.config.num_classes == 2 and ckpt.config.in_channels == 1


def test_names_resolve_to_the_package_file_unless_a_file_of_that_name_exists(tmp_path, monkeypatch):
    assert is_builtin("nuclei") and resolve_weights("nuclei") == FOLDER / "nuclei.pt"
    assert not is_builtin("other") and resolve_weights("other") == Path("other")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nuclei").write_bytes(b"")
    assert not is_builtin("nuclei")


@pytest.mark.slow
def test_nuclei_finds_synthetic_nuclei_with_no_training():
    """Recall at IoU 0.5 over four images of NUCLEI_SCENE (measured: 0.72 to 0.93, mean 0.86)."""
    predictor = Predictor.from_weights("nuclei", "cpu")
    recalls = []
    for seed in (3, 4, 5, 6):
        image, labels = nuclei_image(seed)
        result = predictor(image)
        recalls.append(float((matched_iou(torch.from_numpy(labels), result.label_image) > 0.5).float().mean()))
        assert len(result) <= 1.3 * labels.max()
    assert np.mean(recalls) > 0.8, recalls


@pytest.mark.slow
def test_cli_predict_evaluate_export_and_models_take_the_name(tmp_path, capsys):
    image, labels = nuclei_image()
    data = tmp_path / "data"
    write_image(data / "images" / "a.png", image)
    write_image(data / "masks" / "a.png", labels.astype(np.uint16))
    code, out, err = cli(capsys, "predict", data / "images", "--weights", "nuclei", "--out", tmp_path / "pred",
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    predicted = read_label_image(tmp_path / "pred" / "a_labels.png")
    assert predicted.max() > 0.8 * labels.max()

    code, out, err = cli(capsys, "evaluate", "--weights", "nuclei", "--data", data, "--device", "cpu",
                         "--no-progress", "--diameter", "20")
    assert code == 0, err
    assert "mask" in out

    code, out, err = cli(capsys, "export", "--weights", "nuclei", "--format", "torchscript",
                         "--out", tmp_path / "nuclei_ts.pt")
    assert code == 0, err
    assert (tmp_path / "nuclei_ts.pt").stat().st_size > 0

    code, out, _ = cli(capsys, "models")
    assert code == 0 and out.startswith("he: ") and "\nnuclei: " in out  # every built-in model, by name


@pytest.mark.slow
def test_predict_estimates_each_images_diameter_unless_given(tmp_path, capsys):
    """--diameter auto (the default) sizes each image on its own: the same scene drawn twice as
    large is estimated twice as large and resized to the model's size (the scene's own nuclei are
    near it: left as they are); images.json and the summary line say so. --diameter D and --scale F
    override it."""
    image, labels = nuclei_image()
    write_image(tmp_path / "in" / "plain.png", image)
    write_image(tmp_path / "in" / "large.png", np.kron(image, np.ones((2, 2), image.dtype)))
    code, out, err = cli(capsys, "predict", tmp_path / "in", "--weights", "nuclei", "--out", tmp_path / "auto",
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    meta = {Path(m["file_name"]).stem: m for m in json.loads((tmp_path / "auto" / "images.json").read_text())}
    plain, large = meta["plain"], meta["large"]
    assert plain["diameter_from"] == large["diameter_from"] == "objects"
    assert large["diameter"] / plain["diameter"] == pytest.approx(2.0, rel=0.1)
    assert plain["scale"] == 1.0
    assert large["scale"] == pytest.approx(card("nuclei")["diameter_px"] / large["diameter"], rel=1e-3)
    assert large["scale"] == pytest.approx(0.5, rel=0.15)
    assert "nucleus diameter estimated per image (--diameter auto)" in out
    for name in ("plain", "large"):  # the model finds the nuclei at either size
        assert read_label_image(tmp_path / "auto" / f"{name}_labels.png").max() > 0.8 * labels.max()

    for flags, scale in ((["--diameter", "40"], card("nuclei")["diameter_px"] / 40), (["--scale", "0.7"], 0.7)):
        code, _, err = cli(capsys, "predict", tmp_path / "in" / "plain.png", "--weights", "nuclei", "--out",
                           tmp_path / "given", "--device", "cpu", "--no-progress", *flags)
        assert code == 0, err
        (entry,) = json.loads((tmp_path / "given" / "images.json").read_text())
        assert (entry["scale"], entry["diameter_from"]) == (pytest.approx(scale, abs=1e-4), "given")


def test_diameter_needs_a_model_that_states_its_size(tmp_path, capsys):
    cfg = nuclei_config(**TINY_RUN)
    save_checkpoint(tmp_path / "m.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    write_image(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    code, _, err = cli(capsys, "predict", tmp_path / "a.png", "--weights", tmp_path / "m.pt", "--out", tmp_path / "o",
                       "--diameter", "30", "--device", "cpu")
    assert code == 2
    assert "does not state the nucleus diameter it was trained on; use --scale" in err
    assert len(err.strip().splitlines()) == 1


# --- publishing -----------------------------------------------------------------------------------------
def test_publish_writes_half_precision_weights_and_the_card(tmp_path):
    cfg = nuclei_config(**TINY_RUN, trunk_width=16)
    torch.manual_seed(0)
    state = MaskRCNN(cfg).state_dict()
    save_checkpoint(tmp_path / "last.pt", Checkpoint(cfg, state, Normalizer().to_dict(), step=7,
                                                     optimizer_state={"x": torch.zeros(3)}))
    target = publish(tmp_path / "last.pt", "tiny", {"summary": "test"}, folder=tmp_path)
    saved = load_checkpoint(target)
    assert saved.optimizer_state is None and saved.step == 7
    for name, value in state.items():
        if value.is_floating_point():
            assert saved.model_state[name].dtype == torch.float16
            torch.testing.assert_close(saved.model_state[name].float(), value, atol=1e-3, rtol=1e-3)
    assert json.loads((tmp_path / "tiny.json").read_text()) == {"summary": "test"}


def test_publish_sets_prediction_settings_and_refuses_learnt_ones(tmp_path):
    cfg = nuclei_config(**TINY_RUN, trunk_width=16)
    save_checkpoint(tmp_path / "last.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    target = publish(tmp_path / "last.pt", "tuned", {}, folder=tmp_path, settings={"mask_test_min_contrast": 0.2})
    assert load_checkpoint(target).config.mask_test_min_contrast == 0.2
    with pytest.raises(ValueError, match="rpn_scales not a prediction-time setting"):
        publish(tmp_path / "last.pt", "other", {}, folder=tmp_path, settings={"rpn_scales": [4, 8, 16, 32]})
    assert not (tmp_path / "other.pt").exists()


def test_shipped_nuclei_model_predicts_with_the_recipes_settings():
    from maskrcnn.train.pretrain import BUILTIN_SETTINGS

    cfg = load_checkpoint(FOLDER / "nuclei.pt").config
    for key, value in BUILTIN_SETTINGS.items():
        assert getattr(cfg, key) == value, key
    assert f"{BUILTIN_SETTINGS['mask_test_min_contrast']:.0%}" in card("nuclei")["prediction"]


def test_publish_refuses_a_model_over_the_limit_and_leaves_nothing(tmp_path, monkeypatch):
    cfg = nuclei_config(**TINY_RUN)
    save_checkpoint(tmp_path / "last.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    monkeypatch.setattr("maskrcnn.builtin.MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 0 MB a built-in model may take"):
        publish(tmp_path / "last.pt", "big", {}, folder=tmp_path)
    assert not (tmp_path / "big.pt").exists() and not (tmp_path / "big.json").exists()


# --- the wheel --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_ships_the_model_and_predicts_by_name_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("maskrcnn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("nuclei", "he"):  # fluorescence and brightfield
        assert f"maskrcnn/builtin/{name}.pt" in names and f"maskrcnn/builtin/{name}.json" in names

    # a fresh venv with the wheel; torch and the other dependencies from this venv's site-packages
    # (as a plain path: its .pth files, among them this checkout's editable install, are not run)
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True)
    image, labels = nuclei_image()
    write_image(tmp_path / "img.png", image)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(fresh / "bin" / "python"), "-c",
                          "import maskrcnn, sys; print(maskrcnn.__file__); "
                          "from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))",
                          "predict", str(tmp_path / "img.png"), "--weights", "nuclei", "--out", str(tmp_path / "o"),
                          "--device", "cpu", "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert str(fresh) in run.stdout.splitlines()[0]  # the wheel's copy, not this checkout
    assert read_label_image(tmp_path / "o" / "img_labels.png").max() > 0.8 * labels.max()
