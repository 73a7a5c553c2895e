"""``maskrcnn pretrain``: the recipe of the built-in model mixes synthetic scenes with the left part
of real images, continues across sessions, and publishes a small model with its card."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest

from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.data.writers import write_image
from maskrcnn.data.synthetic_scenes import SceneReader
from maskrcnn.train.pretrain import (BUILTIN_DIAMETER, BUILTIN_SETTINGS, REAL_FRACTION, PretrainOptions, pretrain,
                                     real_reader, republish, score_builtin_run, training_reader, write_builtin)


@pytest.fixture
def real(tmp_path):
    """A labels-layout 'real' dataset: one 96 x 160 image of bright squares."""
    root = tmp_path / "real"
    image = np.full((96, 160), 20, np.uint8)
    labels = np.zeros((96, 160), np.uint16)
    for k, (y, x) in enumerate([(y, x) for y in (10, 50) for x in (10, 40, 100, 130)], start=1):
        image[y:y + 20, x:x + 20] = 200
        labels[y:y + 20, x:x + 20] = k
    write_image(root / "images" / "a.png", image)
    write_image(root / "masks" / "a.png", labels)
    return root


def test_mix_has_the_real_share_and_only_the_left_part_of_real_images(real, tmp_path):
    opts = PretrainOptions(out=str(tmp_path / "p"), real=str(real), real_share=0.25, scenes=300)
    reader = training_reader(opts)
    assert len(reader) == 400  # 300 scenes + 100 copies of the one real image's band
    band = reader[350]
    assert band.image.shape == (96, round(160 * REAL_FRACTION))
    assert len(band.masks) == 4  # the squares at x >= 96 are the scoring part's
    assert isinstance(training_reader(PretrainOptions(out="x", scenes=5)), SceneReader)


def test_real_images_train_whole_but_their_held_out_ones_at_the_models_size(real, tmp_path):
    """--real-images: every image but the val_* ones, resized so that its nuclei are BUILTIN_DIAMETER
    across; each real dataset an equal share of the real samples."""
    other = tmp_path / "other"
    for name, side in (("a", 40), ("b", 40), ("val_c", 40)):  # squares of 40 px: resized by about a half
        image = np.zeros((120, 120), np.uint16)
        labels = np.zeros((120, 120), np.uint16)
        image[20:20 + side, 30:30 + side] = labels[20:20 + side, 30:30 + side] = 1
        image *= 3000
        write_image(other / "images" / f"{name}.tif", image)
        write_image(other / "masks" / f"{name}.tif", labels)
    opts = PretrainOptions(out="x", real=str(real), real_images=[str(other)], scenes=10)
    mixed = real_reader(opts)
    assert set(mixed.names) == {f"a[0.00:{REAL_FRACTION:.2f}]", "a", "b"}  # no val_c
    assert sum(n in ("a", "b") for n in mixed.names) == sum("[" in n for n in mixed.names) == 2  # equal shares
    resized = mixed[mixed.names.index("a")]
    side = np.sqrt(resized.masks[0].sum())
    assert 2 * side / np.sqrt(np.pi) == pytest.approx(BUILTIN_DIAMETER, rel=0.05)  # equivalent diameter
    assert resized.image.dtype == np.uint16 and resized.image.max() == 3000


@pytest.mark.slow
def test_pretraining_continues_across_sessions_and_publishes(real, tmp_path):
    out = tmp_path / "p"
    opts = PretrainOptions(out=str(out), steps=2, real=str(real), scenes=50, batch_size=1, device="cpu",
                           progress=False)
    pretrain(opts)
    assert load_checkpoint(out / "run" / "last.pt").step == 2
    longer = PretrainOptions(**{**opts.__dict__, "steps": 3})
    pretrain(longer)  # the same command, a longer schedule: continues from step 2
    assert load_checkpoint(out / "run" / "last.pt").step == 3
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert [s["steps"] for s in sessions] == [2, 3]

    scores = score_builtin_run(out / "run" / "last.pt", longer)
    (key, values), = scores.items()
    assert "never trained on" in key and 0.0 <= values["mask_ap50"] <= 1.0
    target = write_builtin(out, scores, longer, folder=tmp_path)
    card = json.loads((tmp_path / "nuclei.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["sessions"] == 2
    assert card["scores"] == scores
    assert target.stat().st_size < 10 * 2**20
    assert load_checkpoint(target).config.mask_test_min_contrast == BUILTIN_SETTINGS["mask_test_min_contrast"]
    assert "mask_test_min_contrast" in card["prediction"]


def test_republish_keeps_the_weights_and_rescores_with_the_recipes_settings(real, tmp_path):
    """A model published before the recipe chose its prediction settings gets them, its weights
    untouched, its card's scores measured again with them and its recipe saying so."""
    from maskrcnn.builtin import publish
    from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
    from maskrcnn.modeling.model import MaskRCNN
    from maskrcnn.data.normalize import Normalizer
    from maskrcnn.presets import nuclei_config
    from conftest import TINY_RUN

    cfg = nuclei_config(**TINY_RUN, trunk_width=16)
    save_checkpoint(tmp_path / "last.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    folder = tmp_path / "builtin"
    folder.mkdir()
    old = {"training": {"recipe": "maskrcnn pretrain --out OUT --steps 5 --publish"}, "scores": {"x": 1}}
    publish(tmp_path / "last.pt", "nuclei", old, folder=folder)
    before = load_checkpoint(folder / "nuclei.pt")
    assert before.config.mask_test_min_contrast == 0

    target = republish(PretrainOptions(out=str(tmp_path / "o"), real=str(real), device="cpu"), folder=folder)
    after = load_checkpoint(target)
    assert after.config.mask_test_min_contrast == BUILTIN_SETTINGS["mask_test_min_contrast"]
    for name, value in before.model_state.items():
        assert torch.equal(after.model_state[name], value), name
    card = json.loads((folder / "nuclei.json").read_text())
    assert card["training"]["recipe"].startswith(old["training"]["recipe"] + "; then published again with "
                                                 "mask_test_min_contrast 0.1")
    (key, values), = card["scores"].items()
    assert "never trained on" in key and 0.0 <= values["mask_ap50"] <= 1.0


def test_card_recipe_lists_each_schedule_length_its_sessions_ran():
    from maskrcnn.train.pretrain import PretrainOptions, _recipe

    longer = PretrainOptions(out="x", steps=8500, real="R")
    assert _recipe([{"steps": 5000}, {"steps": 8500, "schedule": 8500}], longer) == (
        "maskrcnn pretrain --out OUT --steps 5000 --real R; then maskrcnn pretrain --out OUT --steps 8500 --real R "
        "--publish")
    # a session cut short by --minutes ran the same schedule: one command
    short = [{"steps": 3000, "schedule": 5000}, {"steps": 5000, "schedule": 5000}]
    assert _recipe(short, PretrainOptions(out="x", steps=5000)) == "maskrcnn pretrain --out OUT --steps 5000 --publish"
    mixed = PretrainOptions(out="x", steps=900, real="R", real_share=0.5, init="nuclei", lr=2e-4)
    assert _recipe([{"steps": 900}], mixed) == (
        "maskrcnn pretrain --out OUT --steps 900 --real R --real-share 0.5 --init nuclei --lr 0.0002 --publish")


def test_a_run_continued_from_a_builtin_model_publishes_its_whole_lineage(tmp_path):
    """--init nuclei: the card adds this run's sessions to those of the model it started from, as
    that model's card read when the run began (publishing replaces it), so the recipe starts from
    nothing."""
    from maskrcnn.train.pretrain import INIT_CARD, _init_card, _training

    out = tmp_path / "p"
    out.mkdir()
    earlier = {"steps": 17000, "minutes": 122.0, "hardware": ["GPU"], "sessions": 4,
               "recipe": "maskrcnn pretrain --out OUT --steps 17000 --publish"}
    (out / INIT_CARD).write_text(json.dumps({"training": earlier}))
    opts = PretrainOptions(out=str(out), steps=6000, real_images=["M"], init="nuclei", lr=2e-4)
    history = [{"steps": 6000, "schedule": 6000, "minutes": 40.0, "device": "CPU", "date": "2026-12-06"}]
    record = _training(history, opts, _init_card(out)["training"])
    assert (record["steps"], record["minutes"], record["sessions"]) == (23000, 162.0, 5)
    assert record["hardware"] == ["CPU", "GPU"]
    assert record["recipe"] == ("maskrcnn pretrain --out OUT --steps 17000 --publish (that model is what --init "
                                "names); then maskrcnn pretrain --out OUT --steps 6000 --real-images M --init nuclei "
                                "--lr 0.0002 --publish")
    assert _init_card(tmp_path) is None


@pytest.mark.slow
def test_pretraining_with_dataloader_workers_trains_the_same_weights(real, tmp_path):
    """``--workers`` (scenes drawn in other processes, as on a GPU) changes the speed, not the model."""
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        pretrain(PretrainOptions(out=str(out), steps=3, real=str(real), scenes=50, batch_size=2, device="cpu",
                                 workers=workers, progress=False))
        weights.append(load_checkpoint(out / "run" / "last.pt").model_state)
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


@pytest.mark.slow
def test_the_he_model_starts_from_nuclei_widened_and_publishes_a_brightfield_card(tmp_path):
    """--model he: synthetic slides, the stain-density input, --init nuclei widened to it (once: a
    second session resumes from run/last.pt), held-out synthetic slides as its scores."""
    from maskrcnn.data.normalize import Normalizer
    from maskrcnn.data.synthetic_brightfield import SlideReader
    from maskrcnn.builtin import resolve_weights
    from maskrcnn.train.pretrain import HE_INIT

    out = tmp_path / "he"
    opts = PretrainOptions(out=str(out), model="he", steps=1, init="nuclei", scenes=20, batch_size=1,
                           device="cpu", progress=False)
    assert isinstance(training_reader(opts), SlideReader)
    pretrain(opts)
    widened, last = load_checkpoint(out / HE_INIT), load_checkpoint(out / "run" / "last.pt")
    assert widened.config.in_channels == 3 and last.config.in_channels == 3
    assert Normalizer.from_dict(last.normalizer).stain == "hed"
    nuclei = load_checkpoint(resolve_weights("nuclei"))
    stem = "backbone.stem.0.weight"
    torch.testing.assert_close(widened.model_state[stem][:, :1].float(), nuclei.model_state[stem].float())
    assert not widened.model_state[stem][:, 1:].any()

    scores = {"held-out slides": {"mask_ap50": 0.5}}
    write_builtin(out, scores, opts, folder=tmp_path)
    card = json.loads((tmp_path / "he.json").read_text())
    assert card["summary"].startswith("brightfield nuclei") and "synthetic brightfield slides" in card["trained_on"]
    assert "--model he" in card["training"]["recipe"] and card["layout"]["in_channels"] == 3
    assert card["scores"] == scores and (tmp_path / "he.pt").is_file()
    assert "prediction" not in card  # the floor is the nuclei recipe's, measured on fluorescence only
