"""--channel, --z and --t: choosing the plane of OME-TIFFs and other multi-dimensional images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
from maskrcnn.config import ConfigError
from maskrcnn.presets import nuclei_config
from maskrcnn.data.datasets import open_dataset
from maskrcnn.data.io import read_image, read_image_size, read_label_image
from maskrcnn.data.writers import write_image
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.planes import Planes, guess_axes, select_planes
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.errors import DataError
from maskrcnn.modeling.model import MaskRCNN

from cli_helpers import cli
from conftest import TINY_RUN, tiny_config

RNG = np.random.default_rng(0)
NAMES = ["DAPI", "GFP", "RFP"]
STACK = RNG.integers(0, 4000, (2, 3, 4, 24, 40), dtype=np.uint16)  # T C Z Y X


def write_ome(path: Path, array: np.ndarray, axes: str, names: list[str] | None = None, **kwargs) -> Path:
    metadata = {"axes": axes} | ({"Channel": {"Name": names}} if names else {})
    tifffile.imwrite(path, array, metadata=metadata, ome=True, **kwargs)
    return path


@pytest.fixture
def ome(tmp_path) -> Path:
    return write_ome(tmp_path / "cells.ome.tif", STACK, "TCZYX", NAMES)


# --- Planes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, flag", [
    (dict(channel=-1), "--channel"), (dict(channel=""), "--channel"), (dict(channel=1.5), "--channel"),
    (dict(z=-2), "--z"), (dict(z="median"), "--z"), (dict(z=True), "--z"),
    (dict(t=-1), "--t"), (dict(t="first"), "--t"),
])
def test_bad_planes_are_config_errors_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=f"^{flag} must be"):
        Planes(**kwargs)


def test_planes_from_command_line_text():
    assert Planes.from_text("DAPI", "MAX", "1") == Planes("DAPI", "max", 1)
    assert Planes.from_text("2", "3", None) == Planes(2, 3, None)
    assert Planes.from_text().is_default and not Planes(z=0).is_default
    for channel, z, t in (("-1", None, None), (None, "-3", None), (None, None, "x"), (None, "top", None)):
        with pytest.raises(ConfigError):
            Planes.from_text(channel, z, t)


# --- reading OME-TIFF planes ----------------------------------------------------------------------------
def test_ome_tiff_5d_reads_the_first_plane_of_the_first_channel_by_default(ome):
    image = read_image(ome)
    assert image.shape == (24, 40) and image.dtype == np.uint16
    np.testing.assert_array_equal(image, STACK[0, 0, 0])


@pytest.mark.parametrize("planes, expected", [
    (Planes(channel="GFP"), STACK[0, 1, 0]),
    (Planes(channel="RFP", z=2, t=1), STACK[1, 2, 2]),
    (Planes(channel=1, z=3), STACK[0, 1, 3]),
    (Planes(channel="DAPI", z="max", t=1), STACK[1, 0].max(axis=0)),
    (Planes(t=1), STACK[1, 0, 0]),
], ids=["name", "name-z-t", "index-z", "max", "t"])
def test_ome_tiff_plane_by_channel_name_index_z_and_t(ome, planes, expected):
    image = read_image(ome, planes)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, expected)
    assert read_image_size(ome, planes) == image.shape[:2]


def test_mean_projection_is_float32_of_the_mean(ome):
    image = read_image(ome, Planes("GFP", "mean"))
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, STACK[0, 1].mean(axis=0), rtol=1e-6)


def test_only_the_pages_of_the_plane_are_decoded(ome, monkeypatch):
    """24 pages in the file; one plane decodes one page, a z projection the 4 of its channel."""
    asked = []
    original = tifffile.TiffFile.asarray

    def logged(self, key=None, **kwargs):
        asked.append(key)
        return original(self, key=key, **kwargs)

    monkeypatch.setattr(tifffile.TiffFile, "asarray", logged)
    read_image(ome, Planes("GFP", 2, 1))
    read_image(ome, Planes("RFP", "max", 0))
    assert asked == [[1 * 12 + 1 * 4 + 2], [8, 9, 10, 11]]  # page = ((t * C) + c) * Z + z


@pytest.mark.parametrize("planes, problem", [
    (Planes(channel="DAPX"), "no channel 'DAPX'; the file has: DAPI, GFP, RFP"),
    (Planes(channel=3), "--channel 3 is out of range: the image has 3 channel(s) (DAPI, GFP, RFP), 0..2"),
    (Planes(z=4), "--z 4 is out of range: the Z axis has 4 plane(s) (0..3)"),
    (Planes(t=2), "--t 2 is out of range: the T axis has 2 plane(s) (0..1)"),
])
def test_planes_the_file_lacks_are_data_errors_naming_the_file(ome, planes, problem):
    for read in (read_image, read_image_size):
        with pytest.raises(DataError) as caught:
            read(ome, planes)
        assert caught.value.path == str(ome) and caught.value.problem == problem
        assert "\n" not in str(caught.value)


def test_a_number_that_names_a_channel_is_that_channel(tmp_path):
    path = write_ome(tmp_path / "waves.ome.tif", STACK[0, :, 0], "CYX", ["561", "488", "405"])
    np.testing.assert_array_equal(read_image(path, Planes.from_text("488")), STACK[0, 1, 0])
    np.testing.assert_array_equal(read_image(path, Planes.from_text("2")), STACK[0, 2, 0])  # no such name: index


def test_axes_a_file_does_not_have(tmp_path):
    yx = write_ome(tmp_path / "flat.ome.tif", STACK[0, 0, 0], "YX")
    np.testing.assert_array_equal(read_image(yx, Planes(z="max", t=0)), STACK[0, 0, 0])  # one plane: itself
    with pytest.raises(DataError, match=r"flat\.ome\.tif: --z 2: the image has no Z axis"):
        read_image(yx, Planes(z=2))
    with pytest.raises(DataError, match=r"flat\.ome\.tif: --channel 1: the image has one channel"):
        read_image(yx, Planes(channel=1))


def test_rgb_ome_tiff_keeps_its_colours_unless_a_channel_is_chosen(tmp_path):
    rgb = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "rgb.ome.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", ome=True)
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(read_image(path, Planes(channel=2)), rgb[..., 2])


def test_files_without_ome_axes_read_as_before_unless_an_option_is_set(tmp_path):
    stack = RNG.integers(0, 256, (6, 24, 40), dtype=np.uint8)  # pages of a plain TIFF: a z stack
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif"), stack[0])
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif", Planes(z=4)), stack[4])
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif", Planes(z="max")), stack.max(axis=0))
    hyper = RNG.integers(0, 256, (5, 3, 24, 40), dtype=np.uint8)  # ImageJ Z C Y X: C read as colour before
    tifffile.imwrite(tmp_path / "ij.tif", hyper, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "ij.tif"), hyper[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "ij.tif", Planes(channel=2, z=3)), hyper[3, 2])
    rgb = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    write_image(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", Planes(channel=1)), rgb[..., 1])
    with pytest.raises(DataError, match=r"rgb\.png: --z 1: the image has no Z axis"):
        read_image(tmp_path / "rgb.png", Planes(z=1))


@pytest.mark.parametrize("shape, axes", [
    ((24, 40), "YX"), ((24, 40, 3), "YXS"), ((3, 24, 40), "SYX"), ((9, 24, 40), "ZYX"),
    ((5, 24, 40, 4), "ZYXS"), ((1, 24, 40, 1), "QYXQ"), ((1, 1, 7, 24, 40), "QQZYX"),
])
def test_guessed_axes_follow_the_old_rules(shape, axes):
    assert guess_axes("f", shape) == axes


def test_guessed_axes_refuse_what_read_image_refused():
    with pytest.raises(DataError, match="unsupported image shape"):
        guess_axes("f", (2, 9, 9, 24, 40))
    with pytest.raises(DataError, match="5 colour samples"):
        select_planes("f", "YXS", (24, 40, 5))


# --- datasets and the command line ----------------------------------------------------------------------
def ome_dataset(root: Path, n: int) -> Path:
    """The labels layout with 2-channel (DAPI, GFP), 3-slice OME-TIFF images: DAPI holds the synthetic
    nuclei in every slice (dimmer above and below), GFP a constant background."""
    write_synthetic_dataset(root, n, 64, seed=0)
    for png in sorted((root / "images").glob("*.png")):
        nuclei = read_image(png).astype(np.uint16)
        dapi = np.stack([nuclei // 2, nuclei, nuclei // 3])
        stack = np.stack([dapi, np.full_like(dapi, 100)])
        write_ome(png.with_suffix(".tif"), stack, "CZYX", ["DAPI", "GFP"])
        png.unlink()
    return root


def test_dataset_readers_read_the_chosen_plane(tmp_path):
    root = ome_dataset(tmp_path / "data", 2)
    reader = open_dataset(root, planes=Planes("DAPI", "max"))
    sample = reader[1]
    np.testing.assert_array_equal(sample.image, read_image(root / "images" / "synth_0001.tif", Planes(z=1)))
    assert len(sample.masks) == len(np.unique(read_label_image(root / "masks" / "synth_0001.png"))) - 1
    reader.check_header(0)
    with pytest.raises(DataError, match="no channel 'Hoechst'; the file has: DAPI, GFP"):
        open_dataset(root, planes=Planes("Hoechst")).check_header(0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained tiny model with open thresholds: it finds instances anywhere, deterministically."""
    folder = tmp_path_factory.mktemp("model")
    cfg = nuclei_config(**TINY_RUN)
    torch.manual_seed(0)
    save_checkpoint(folder / "m.pt", Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    return folder / "m.pt"


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_predict_channel_by_name_segments_that_channel(weights, tmp_path, capsys):
    stack = np.zeros((3, 64, 64), np.uint16)
    yy, xx = np.mgrid[:64, :64]
    stack[1][(yy - 20) ** 2 + (xx - 24) ** 2 < 64] = 3000  # GFP: two cells; DAPI and RFP: noise
    stack[1][(yy - 44) ** 2 + (xx - 40) ** 2 < 81] = 2500
    stack[[0, 2]] = RNG.integers(0, 50, (2, 64, 64))
    (tmp_path / "in").mkdir()
    write_ome(tmp_path / "in" / "cells.ome.tif", stack, "CYX", NAMES)
    tifffile.imwrite(tmp_path / "gfp.tif", stack[1])
    common = ["--weights", weights, "--device", "cpu", "--precision", "fp32", "--no-progress"]
    code, out, err = cli(capsys, "predict", tmp_path / "in", "--out", tmp_path / "ome", "--channel", "GFP", *common)
    assert code == 0, err
    assert "1 image(s) segmented" in out
    code, _, err = cli(capsys, "predict", tmp_path / "gfp.tif", "--out", tmp_path / "plain", *common)
    assert code == 0, err
    by_name = read_label_image(tmp_path / "ome" / "cells_labels.png")
    assert by_name.max() > 0
    np.testing.assert_array_equal(by_name, read_label_image(tmp_path / "plain" / "gfp_labels.png"))

    code, out, err = cli(capsys, "predict", tmp_path / "in", "--out", tmp_path / "bad", "--channel", "DAPX", *common)
    assert code == 2 and err.count("\n") == 1
    assert err == f"maskrcnn: skipped {tmp_path / 'in' / 'cells.ome.tif'}: no channel 'DAPX'; the file has: " \
                  "DAPI, GFP, RFP\n"
    code, _, err = cli(capsys, "predict", tmp_path / "in", "--out", tmp_path / "bad", "--z", "top", *common)
    assert code == 2 and err == "maskrcnn: error: --z must be an index >= 0, max or mean, got 'top'\n"


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_train_and_evaluate_read_the_chosen_channel(tmp_path, capsys):
    root = ome_dataset(tmp_path / "data", 3)
    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in tiny_config(16).items()))
    common = ["--data", root, "--config", config, "--iters", "2", "--batch-size", "1", "--crop", "64",
              "--device", "cpu", "--no-progress", "--val-every", "2"]
    code, _, err = cli(capsys, "train", *common, "--out", tmp_path / "bad", "--channel", "Hoechst")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"maskrcnn: error: {root / 'images' / 'synth_0000.tif'}: no channel 'Hoechst'; "
                          "the file has: DAPI, GFP")
    code, out, err = cli(capsys, "train", *common, "--out", tmp_path / "run", "--channel", "DAPI", "--z", "max")
    assert code == 0, err
    assert "trained 2 steps" in out
    evaluate = ["evaluate", "--weights", tmp_path / "run" / "last.pt", "--data", root, "--device", "cpu",
                "--no-progress"]
    code, out, err = cli(capsys, *evaluate, "--channel", "DAPI", "--z", "1")
    assert code == 0, err
    assert "COCO AP" in out and "counts summed over 3 images" in out
    code, _, err = cli(capsys, *evaluate, "--z", "3")
    assert code == 2 and err == (f"maskrcnn: error: {root / 'images' / 'synth_0000.tif'}: --z 3 is out of "
                                 "range: the Z axis has 3 plane(s) (0..2)\n")


@pytest.mark.slow
def test_predict_reads_an_ome_zarr_folder_as_one_image(weights, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    ome_writer = pytest.importorskip("ome_zarr.writer")
    stack = RNG.integers(0, 50, (2, 64, 64)).astype(np.uint16)
    yy, xx = np.mgrid[:64, :64]
    stack[1][(yy - 20) ** 2 + (xx - 24) ** 2 < 64] = 3000
    stack[1][(yy - 44) ** 2 + (xx - 40) ** 2 < 81] = 2500
    root = zarr.open_group(str(tmp_path / "cells.ome.zarr"), mode="w")
    ome_writer.write_multiscale([stack], root, axes="cyx", storage_options={"chunks": (1, 32, 32)})
    root.attrs["ome"] = {**root.attrs["ome"], "omero": {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}}
    tifffile.imwrite(tmp_path / "gfp.tif", stack[1])
    common = ["--weights", weights, "--device", "cpu", "--precision", "fp32", "--no-progress"]
    code, out, err = cli(capsys, "predict", tmp_path / "cells.ome.zarr", "--out", tmp_path / "zarr", "--channel", "GFP",
                         *common)
    assert code == 0, err
    assert "1 image(s) segmented" in out
    assert cli(capsys, "predict", tmp_path / "gfp.tif", "--out", tmp_path / "plain", *common)[0] == 0
    labels = read_label_image(tmp_path / "zarr" / "cells_labels.png")
    assert labels.max() > 0
    np.testing.assert_array_equal(labels, read_label_image(tmp_path / "plain" / "gfp_labels.png"))


def test_outputs_and_pairings_name_an_ome_file_without_its_double_extension():
    from maskrcnn.data.io import image_stem

    assert [image_stem(p) for p in ("a/cells.ome.tif", "b/Cells.OME.TIFF", "c/stack.ome.zarr", "d/plain.png",
                                    "e/plain.zarr", "f/home.tif")] == ["cells", "Cells", "stack", "plain", "plain", "home"]
