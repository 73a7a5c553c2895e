"""Bad and unusual image files for tests/test_bad_inputs.py: each case writes one file under a test's
folder (nothing binary is stored in the repository) and says what the command must do with it."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
from PIL import Image

from maskrcnn.data.synthetic import synth_nuclei



# --- building blocks ------------------------------------------------------------------------------
def nuclei(shape: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small uint8 image and its label image (ids 1..N)."""
    return synth_nuclei(shape, np.random.default_rng(seed), n_range=(3, 8), diameter_range=(6.0, 20.0))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


class RunsCommand:
    """Pickles as ``os.system(command)``: unpickling it would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def marker_command(folder: Path) -> tuple[str, Path]:
    """A shell command that leaves a file behind if anything ever runs it."""
    marker = folder / "CODE_WAS_RUN"
    return f"touch {marker}", marker


# --- image files: bad ones, and unusual ones that are handled ---------------------------------------
# Each writes one image file at ``stem`` + its own extension and returns (path, its label image or None).
def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def img_png_zero_bytes(stem: Path):
    return write_bytes(stem.with_suffix(".png"), b""), None


def img_png_truncated(stem: Path):
    return write_bytes(stem.with_suffix(".png"), png_bytes(nuclei()[0])[:300]), None


def img_tiff_zero_bytes(stem: Path):
    return write_bytes(stem.with_suffix(".tif"), b""), None


def img_tiff_truncated(stem: Path):
    data = tiff_bytes(nuclei()[0].astype(np.uint16) * 16)
    return write_bytes(stem.with_suffix(".tif"), data[: len(data) // 2]), None


def img_tiff_header_only(stem: Path):
    return write_bytes(stem.with_suffix(".tif"), tiff_bytes(nuclei()[0])[:8]), None


def img_not_an_image(stem: Path):
    return write_bytes(stem.with_suffix(".png"), b"name,area\nnucleus,40\n"), None


def img_npy_with_code(stem: Path):
    """An object array whose pickle runs a command: refused unread (allow_pickle=False)."""
    command, _ = marker_command(stem.parent)
    path = stem.with_suffix(".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([RunsCommand(command)], dtype=object), allow_pickle=True)
    return path, None


def img_smaller_than_stride(stem: Path):
    image = np.zeros((12, 10), np.uint8)
    image[3:9, 2:8] = 200
    labels = np.zeros((12, 10), np.int32)
    labels[3:9, 2:8] = 1
    return write_bytes(stem.with_suffix(".png"), png_bytes(image)), labels


def img_extreme_aspect(stem: Path):
    image, labels = nuclei((16, 4000), seed=3)
    return write_bytes(stem.with_suffix(".png"), png_bytes(image)), labels


def img_float_tiff_nan_inf(stem: Path):
    image, labels = nuclei(seed=4)
    values = image.astype(np.float32) / 255
    values[:5] = np.nan  # a masked stripe, as stitched float mosaics have
    values[10, 10], values[20, 30] = np.inf, -np.inf
    return write_bytes(stem.with_suffix(".tif"), tiff_bytes(values)), labels


def img_sixteen_bit_tiny_range(stem: Path):
    image, labels = nuclei(seed=5)
    return write_bytes(stem.with_suffix(".tif"), tiff_bytes((image // 64).astype(np.uint16) + 1000)), labels


@dataclass(frozen=True)
class ImageCase:
    write: Callable[[Path], tuple[Path, np.ndarray | None]]
    problem: str | None  # None: handled


IMAGE_CASES = {
    "png_zero_bytes": ImageCase(img_png_zero_bytes, "empty file (0 bytes)"),
    "png_truncated": ImageCase(img_png_truncated, "cannot read image"),
    "tiff_zero_bytes": ImageCase(img_tiff_zero_bytes, "empty file (0 bytes)"),
    "tiff_truncated": ImageCase(img_tiff_truncated, "cannot read image"),
    "tiff_header_only": ImageCase(img_tiff_header_only, "cannot read image"),
    "not_an_image": ImageCase(img_not_an_image, "cannot read image"),
    "npy_with_code": ImageCase(img_npy_with_code, "cannot read image"),
    "smaller_than_stride": ImageCase(img_smaller_than_stride, None),
    "extreme_aspect_16x4000": ImageCase(img_extreme_aspect, None),
    "float_tiff_nan_inf": ImageCase(img_float_tiff_nan_inf, None),
    "sixteen_bit_narrow_range": ImageCase(img_sixteen_bit_tiny_range, None),
}
BAD_IMAGES = [name for name, case in IMAGE_CASES.items() if case.problem]
