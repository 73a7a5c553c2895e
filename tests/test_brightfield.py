"""Brightfield nuclei: the stain model, the synthetic slides, the stain-density input, the ``he``
model's start from ``nuclei``, and the choice between the two built-in models per image.

The stain maths is checked against scikit-image's ``rgb2hed`` (the reference implementation of
Ruifrok & Johnston's colour deconvolution); the model choice on real images of both kinds:
scikit-image's bundled IHC image and, when ../shared/data is present, the real fluorescence images.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.config import ConfigError
from maskrcnn.data.io import read_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.stains import rgb_to_stains, stains_to_rgb
from maskrcnn.data.synthetic_brightfield import Slide, SlideReader, photograph, slide_densities, synth_slide
from maskrcnn.data.synthetic_scenes import synth_scene
from maskrcnn.data.writers import write_image
from maskrcnn.modeling.checkpoint import Checkpoint
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.prediction.choice import BRIGHTFIELD_LEVEL, background_level, builtin_for
from maskrcnn.presets import builtin_config
from maskrcnn.train.brightfield import he_normalizer, widen_to_stains

skimage_color = pytest.importorskip("skimage.color")
skimage_data = pytest.importorskip("skimage.data")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def slide(seed: int = 0, **changes) -> tuple[Slide, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return replace(Slide.draw(rng), **changes), rng


# --- the stain model --------------------------------------------------------------------------------------
def test_stain_densities_are_scikit_images_rgb2hed():
    ihc = skimage_data.immunohistochemistry()
    np.testing.assert_allclose(rgb_to_stains(ihc / 255.0) / 6, skimage_color.rgb2hed(ihc), atol=1e-5)
    rgb = np.random.default_rng(0).uniform(0.05, 1.0, (16, 16, 3))
    np.testing.assert_allclose(rgb_to_stains(rgb) / 6, skimage_color.rgb2hed(rgb), atol=1e-5)


def test_rgb2hed_recovers_the_haematoxylin_of_a_synthetic_slide():
    """The densities a slide is drawn from come back from its picture by rgb2hed: exactly without
    the camera, and closely through it (no stain jitter, white balance, blur and noise kept)."""
    drawn, rng = slide(3, kind="he", stain_jitter=0.0, jpeg=0, noise=0.003, blur=0.4)
    density, labels = slide_densities(128, drawn, rng)
    assert labels.max() > 0
    exact = skimage_color.rgb2hed(stains_to_rgb(density))[..., 0] * 6
    np.testing.assert_allclose(exact, density[..., 0], atol=1e-3)

    image = photograph(density, drawn, np.random.default_rng(1))
    recovered = skimage_color.rgb2hed(image)[..., 0] * 6
    truth = density[..., 0]
    assert np.corrcoef(recovered.ravel(), truth.ravel())[0, 1] > 0.9
    nuclei = labels > 0
    assert abs(np.median(recovered[nuclei]) - np.median(truth[nuclei])) < 0.25 * np.median(truth[nuclei])


def test_synthetic_slides_are_deterministic_and_labelled():
    reader = SlideReader(3, 96, seed=5)
    first, again = reader[1], SlideReader(3, 96, seed=5)[1]
    np.testing.assert_array_equal(first.image, again.image)
    assert first.image.dtype == np.uint8 and first.image.shape[:2] == (96, 96)
    assert first.masks.shape[1:] == (96, 96) and len(first.masks) == len(first.labels)
    image, labels = synth_slide(96, *reversed(slide(2, kind="plain", lumen=0.0)))
    assert image.ndim == 2 and labels.max() > 0  # plain brightfield is gray
    empty, none = synth_slide(64, *reversed(slide(4, lumen=1.0)))  # all lumen: no nucleus, no failure
    assert none.max() == 0 and empty.shape[:2] == (64, 64)


# --- the stain-density input --------------------------------------------------------------------------------
def test_stain_normalizer_shows_nuclei_bright_in_the_haematoxylin_channel():
    image, labels = synth_slide(128, *reversed(slide(7, kind="he", lumen=0.1)))
    channels = he_normalizer()(image)
    assert channels.shape == (3, 128, 128) and 0.0 <= float(channels.min()) and float(channels.max()) <= 1.0
    nuclei = torch.from_numpy(labels > 0)
    assert float(channels[0][nuclei].mean()) > 2 * float(channels[0][~nuclei].mean())
    assert Normalizer.from_dict(he_normalizer().to_dict()) == he_normalizer()
    gray = he_normalizer()(image.mean(axis=-1).astype(np.uint8))  # gray brightfield: replicated first
    assert gray.shape == (3, 128, 128)


def test_stain_normalizer_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError, match="stain"):
        Normalizer(channels=1, stain="hed")
    with pytest.raises(ConfigError, match="stain"):
        Normalizer(channels=3, stain="hdx")
    with pytest.raises(ConfigError, match="fixed_range"):
        Normalizer(channels=3, stain="hed", method="fixed")


def test_stain_strength_does_not_change_the_input():
    """A slide stained 1.6x stronger (or with a dimmer lamp's white) gives the model the same input:
    each stain is scaled by its own percentiles, the white by the image's own."""
    drawn, rng = slide(8, kind="he", lumen=0.1)
    density, labels = slide_densities(128, drawn, rng)
    base = he_normalizer()(np.round(stains_to_rgb(density) * 65535).astype(np.uint16))
    strong = he_normalizer()(np.round(stains_to_rgb(1.6 * density, white=0.8) * 65535).astype(np.uint16))
    nuclei = torch.from_numpy(labels > 0)
    torch.testing.assert_close(strong[0][nuclei], base[0][nuclei], atol=0.02, rtol=0)


# --- the he model's start ------------------------------------------------------------------------------------
def test_widened_model_starts_as_the_fluorescence_model_on_the_haematoxylin_channel():
    torch.manual_seed(0)
    cfg = builtin_config()
    model = MaskRCNN(cfg).eval()
    ckpt = Checkpoint(config=cfg, model_state=model.state_dict(), normalizer=Normalizer(channels=1).to_dict())
    wide = widen_to_stains(ckpt)
    assert wide.config.in_channels == 3 and Normalizer.from_dict(wide.normalizer).stain == "hed"
    widened = MaskRCNN(wide.config).eval()
    widened.load_state_dict(wide.model_state)
    stains = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        one = model.backbone(((stains[:, :1] - 0.25) / 0.25))
        three = widened.backbone(((stains - 0.25) / 0.25))
    for a, b in zip(one, three, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match="one-channel"):
        widen_to_stains(wide)


# --- choosing the built-in model --------------------------------------------------------------------------------
def test_real_ihc_and_synthetic_slides_choose_he_and_fluorescence_chooses_nuclei():
    assert builtin_for(skimage_data.immunohistochemistry()) == "he"
    for seed in range(12):
        image, _ = synth_slide(128, np.random.default_rng([11, seed]))
        assert builtin_for(image) == "he", seed
        scene, _ = synth_scene(128, np.random.default_rng([11, seed]))
        assert builtin_for(scene) == "nuclei", seed
        assert builtin_for(np.repeat(scene[..., None], 3, axis=-1)) == "nuclei"  # RGB fluorescence too


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (real fluorescence images) not present")
def test_real_fluorescence_images_choose_nuclei():
    files = sorted((SHARED / "mnfinder-nuclei" / "images").glob("*"))[:8] + sorted((SHARED / "dsb2018-labels" /
                                                                                     "images").glob("*"))
    assert files
    for path in files:
        assert background_level(read_image(path)) < BRIGHTFIELD_LEVEL, path


# --- predict with no --weights ------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_without_weights_picks_he_for_brightfield_and_nuclei_for_fluorescence(tmp_path, capsys):
    from cli_helpers import cli

    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "ihc.png", skimage_data.immunohistochemistry()[:192, :192])  # real IHC
    write_image(folder / "slide.png", synth_slide(128, np.random.default_rng(21))[0])
    write_image(folder / "cells.png", synth_scene(128, np.random.default_rng(21))[0])
    code, out, err = cli(capsys, "predict", folder, "--out", tmp_path / "o", "--device", "cpu", "--no-progress")
    assert code == 0, err
    chosen = {Path(e["file_name"]).name: e["model"] for e in json.loads((tmp_path / "o" / "images.json").read_text())}
    assert chosen == {"ihc.png": "he", "slide.png": "he", "cells.png": "nuclei"}
    assert "he for 2" in out and "nuclei for 1" in out

    code, out, err = cli(capsys, "predict", folder / "cells.png", "--weights", "nuclei", "--out", tmp_path / "w",
                         "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "model" not in json.loads((tmp_path / "w" / "images.json").read_text())[0]  # --weights decides


@pytest.mark.slow
def test_napari_auto_model_segments_each_image_with_the_model_it_needs():
    core = pytest.importorskip("maskrcnn.napari._core")
    choice = core.load_predictor(core.AUTO_MODEL, device="cpu")
    said = []
    image = skimage_data.immunohistochemistry()[:128, :128]
    result, rows, scaling = core.segment_array(choice, image, report=lambda percent, text: said.append(text))
    assert "segmenting with he" in said and result.label_image.shape == (128, 128)
    he = choice.loaded["he"]
    assert scaling == he.scaling(he.normalizer(image))  # the he model's own estimate, as predict records it
    said.clear()
    core.segment_array(choice, synth_scene(96, np.random.default_rng(2))[0], report=lambda p, t: said.append(t))
    assert "segmenting with nuclei" in said and set(choice.loaded) == {"he", "nuclei"}
