"""Image and label-image reading/writing, including every kind of bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import maskrcnn.data.writers
from maskrcnn.data.io import read_binary_mask, read_image, read_label_image
from maskrcnn.data.writers import write_label_image
from maskrcnn.errors import DataError

RNG = np.random.default_rng(0)


def save_png(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array, **kwargs).save(path)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    RNG.integers(0, 256, (7, 9), dtype=np.uint8),
    RNG.integers(0, 65536, (7, 9), dtype=np.uint16),
    RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8),
    RNG.integers(0, 256, (7, 9, 4), dtype=np.uint8),
], ids=["gray8", "gray16", "rgb", "rgba"])
def test_png_round_trip_keeps_shape_dtype_and_values(tmp_path, array):
    out = read_image(save_png(tmp_path / "a.png", array))
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_palette_png_is_expanded_to_rgb(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    image.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[1, 1], [70, 80, 90])


def test_jpeg_reads_as_rgb_uint8(tmp_path):
    Image.fromarray(np.full((8, 10, 3), 128, np.uint8)).save(tmp_path / "a.jpg")
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 128) <= 2


def test_tiff_variants(tmp_path):
    float_image = RNG.random((6, 5)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", float_image)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), float_image)

    stack = RNG.integers(0, 4000, (6, 20, 30), dtype=np.uint16)  # z-stack: first page
    tifffile.imwrite(tmp_path / "z.tiff", stack)
    np.testing.assert_array_equal(read_image(tmp_path / "z.tiff"), stack[0])

    channels_first = RNG.integers(0, 255, (2, 20, 30), dtype=np.uint8)  # (C, H, W) -> (H, W, C)
    tifffile.imwrite(tmp_path / "c.tif", channels_first)
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), channels_first.transpose(1, 2, 0))

    rgb_stack = RNG.integers(0, 255, (3, 20, 30, 3), dtype=np.uint8)  # pages of RGB
    tifffile.imwrite(tmp_path / "rgb.tif", rgb_stack, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), rgb_stack[0])


def test_npy_and_singleton_axes(tmp_path):
    array = RNG.integers(0, 9, (1, 5, 6, 1)).astype(np.int32)
    np.save(tmp_path / "a.npy", array)
    out = read_image(tmp_path / "a.npy")
    assert out.shape == (5, 6) and out.dtype == np.int32


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "missing.png", "empty": tmp_path / "empty.png",
             "truncated": tmp_path / "truncated.png", "text": tmp_path / "text.png",
             "pickle": tmp_path / "obj.npy", "one_d": tmp_path / "line.npy",
             "extension": tmp_path / "image.xyz", "folder": tmp_path / "dir.png",
             "bad_tiff": tmp_path / "bad.tif", "five_d": tmp_path / "five.npy"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(png_bytes(RNG.integers(0, 255, (64, 64), dtype=np.uint8))[:200])
    files["text"].write_text("this is not an image\n")
    np.save(files["pickle"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(files["one_d"], np.arange(5))
    files["extension"].write_bytes(b"data")
    files["folder"].mkdir()
    files["bad_tiff"].write_bytes(b"II*\x00garbage")
    np.save(files["five_d"], np.zeros((2, 3, 2, 8, 8), np.uint8))
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "pickle", "one_d",
                                  "extension", "folder", "bad_tiff", "five_d"])
def test_bad_image_files_raise_data_error_naming_the_file(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(DataError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_label_image_keeps_noncontiguous_16bit_ids(tmp_path):
    labels = np.zeros((10, 12), np.uint16)
    labels[1:3, 1:3], labels[5:8, 5:9], labels[9, 0] = 3, 700, 65535
    out = read_label_image(save_png(tmp_path / "m.png", labels))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, labels)


def test_label_image_from_palette_png_uses_indices(tmp_path):
    labels = np.array([[0, 1], [2, 5]], dtype=np.uint8)
    image = Image.fromarray(labels, mode="P")
    image.putpalette(list(RNG.integers(0, 255, 768)))
    image.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "m.png"), labels)


def test_label_image_accepts_whole_float_and_bool(tmp_path):
    np.save(tmp_path / "f.npy", np.array([[0.0, 2.0], [7.0, 0.0]], np.float32))
    np.testing.assert_array_equal(read_label_image(tmp_path / "f.npy"), [[0, 2], [7, 0]])
    np.save(tmp_path / "b.npy", np.array([[True, False]]))
    np.testing.assert_array_equal(read_label_image(tmp_path / "b.npy"), [[1, 0]])


@pytest.mark.parametrize("name, array, words", [
    ("rgb.png", RNG.integers(0, 255, (4, 4, 3), dtype=np.uint8), "colour"),
    ("neg.npy", np.array([[0, -1]]), "negative"),
    ("frac.npy", np.array([[0.0, 1.5]]), "non-integer"),
    ("nan.npy", np.array([[0.0, np.nan]]), "non-integer"),
    ("stack.npy", np.zeros((3, 4, 5), np.uint16), "not 2-D"),
])
def test_bad_label_images_are_rejected(tmp_path, name, array, words):
    path = tmp_path / name
    save_png(path, array) if name.endswith(".png") else np.save(path, array)
    with pytest.raises(DataError, match=words) as info:
        read_label_image(path)
    assert str(path) in str(info.value)


# --- masks and label images saved in colour by image editors ------------------------------------
def grey_labels() -> np.ndarray:
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:4], labels[4:6, 5:8] = 7, 200
    return labels


def as_colour(grey: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    channels = [grey] * 3 + ([] if alpha is None else [alpha])
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("kind", ["rgb_png", "rgba_opaque_png", "grey_alpha_png", "rgb_tiff16", "rgb_npy"])
def test_grey_masks_saved_in_colour_read_as_one_channel(tmp_path, kind):
    labels = grey_labels()
    opaque = np.full(labels.shape, 255, np.uint8)
    if kind == "rgb_png":
        path = save_png(tmp_path / "m.png", as_colour(labels))
    elif kind == "rgba_opaque_png":
        path = save_png(tmp_path / "m.png", as_colour(labels, opaque))
    elif kind == "grey_alpha_png":
        path = tmp_path / "m.png"
        Image.fromarray(np.stack([labels, opaque], axis=-1), mode="LA").save(path)
        assert Image.open(path).mode == "LA"
    elif kind == "rgb_tiff16":
        labels = labels.astype(np.uint16) * 300  # ids beyond 8 bits
        path = tmp_path / "m.tif"
        tifffile.imwrite(path, as_colour(labels), photometric="rgb")
    else:
        path = tmp_path / "m.npy"
        np.save(path, as_colour(labels))
    out = read_label_image(path)
    assert out.shape == labels.shape and out.dtype == np.int64
    np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(read_binary_mask(path), labels != 0)


def test_fully_transparent_pixels_are_background_whatever_colour_they_store(tmp_path):
    labels = grey_labels()
    alpha = np.where(labels != 0, 255, 0).astype(np.uint8)
    alpha[4, 5] = 40  # a partly transparent (anti-aliased) edge pixel still counts
    colour = as_colour(np.full(labels.shape, 255, np.uint8))  # white canvas under the transparency
    colour[labels != 0] = labels[labels != 0, None]
    colour[0, 0] = (255, 0, 0)  # hidden colour under a transparent pixel: not checked
    path = save_png(tmp_path / "m.png", np.dstack([colour, alpha]))
    assert Image.open(path).mode == "RGBA"
    np.testing.assert_array_equal(read_label_image(path), labels)
    np.testing.assert_array_equal(read_binary_mask(path), labels != 0)


def test_white_shape_on_transparent_canvas_is_the_shape(tmp_path):
    shape = grey_labels() != 0
    rgba = np.zeros((*shape.shape, 4), np.uint8)
    rgba[shape] = 255
    np.testing.assert_array_equal(read_binary_mask(save_png(tmp_path / "m.png", rgba)), shape)


@pytest.mark.parametrize("reader", [read_binary_mask, read_label_image])
def test_colour_masks_whose_channels_differ_are_refused_naming_the_file_and_a_pixel(tmp_path, reader):
    colour = as_colour(grey_labels())
    colour[4, 6] = (200, 10, 200)  # one differing pixel is enough
    for path in (save_png(tmp_path / "rgb.png", colour),
                 save_png(tmp_path / "rgba.png", np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)]))):
        with pytest.raises(DataError, match="colour image whose channels differ") as info:
            reader(path)
        assert info.value.path == str(path)
        assert "row 4, column 6" in info.value.problem and "\n" not in str(info.value)


@pytest.mark.parametrize("reader", [read_binary_mask, read_label_image])
def test_mask_drawn_only_in_alpha_is_refused(tmp_path, reader):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[1:4, 2:5, 3] = 255  # a black shape on a transparent canvas
    path = save_png(tmp_path / "m.png", rgba)
    with pytest.raises(DataError, match="only in its alpha channel") as info:
        reader(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("alpha", [0, 255], ids=["transparent", "opaque"])
def test_empty_colour_masks_are_empty(tmp_path, alpha):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 3] = alpha
    path = save_png(tmp_path / "m.png", rgba)
    assert not read_binary_mask(path).any()
    assert not read_label_image(path).any()


def test_write_label_image_round_trips_png_and_tiff(tmp_path):
    labels = np.zeros((9, 11), np.int64)
    labels[2:5, 3:7] = 9
    labels[6:8, 1:3] = 65535
    write_label_image(tmp_path / "a.png", labels)
    np.testing.assert_array_equal(read_label_image(tmp_path / "a.png"), labels)
    assert Image.open(tmp_path / "a.png").mode == "I;16"

    labels[0, 0] = 70000  # too large for 16 bits: only TIFF can hold it, as 32-bit
    with pytest.raises(ValueError, match="16-bit"):
        write_label_image(tmp_path / "b.png", labels)
    write_label_image(tmp_path / "b.tif", labels)
    assert tifffile.imread(tmp_path / "b.tif").dtype == np.uint32
    np.testing.assert_array_equal(read_label_image(tmp_path / "b.tif"), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.tif"]  # no temp files left


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.tif"
    write_label_image(path, np.ones((3, 3), np.int32))

    def crash(file, *args, **kwargs):
        file.write(b"partial")  # the encoder got halfway
        raise OSError("disk full")

    monkeypatch.setattr(maskrcnn.data.writers.tifffile, "imwrite", crash)
    with pytest.raises(OSError, match="disk full"):
        write_label_image(path, np.full((3, 3), 2))
    np.testing.assert_array_equal(read_label_image(path), np.ones((3, 3)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]
