"""Writing images and label images as PNG or TIFF, atomically: encoded in memory, then written
through maskrcnn.runtime.atomic, so a file is whole or absent."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..runtime.atomic import atomic_write_bytes
from .io import TIFF_EXTENSIONS


def write_label_image(path: str | Path, labels: np.ndarray) -> None:
    """Write (H, W) non-negative integer ids atomically; the extension picks the format.

    ``.png``: 16-bit PNG (ids must be < 65536). ``.tif``/``.tiff``: 16-bit TIFF when the ids fit,
    else 32-bit.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "biu":
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    suffix = path.suffix.lower()
    if suffix == ".png":
        if top >= 2**16:
            raise ValueError(f"{path}: ids up to {top} do not fit a 16-bit PNG; write a .tif")
        _write_atomically(path, lambda f: Image.fromarray(labels.astype(np.uint16)).save(f, format="PNG"))
    elif suffix in TIFF_EXTENSIONS:
        if top >= 2**32:
            raise ValueError(f"{path}: ids up to {top} do not fit a 32-bit TIFF")
        dtype = np.uint16 if top < 2**16 else np.uint32
        _write_atomically(path, lambda f: tifffile.imwrite(f, labels.astype(dtype), compression="zlib"))
    else:
        raise ValueError(f"{path}: label images are written as .png, .tif or .tiff")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8/uint16 (H, W) or uint8 (H, W, 3|4) image atomically as PNG or TIFF."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        _write_atomically(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
    elif suffix in TIFF_EXTENSIONS:
        _write_atomically(path, lambda f: tifffile.imwrite(f, image, compression="zlib"))
    else:
        raise ValueError(f"{path}: images are written as .png, .tif or .tiff")


def _write_atomically(path: Path, write: Callable[[io.BytesIO], None]) -> None:
    """Encode in memory, then write through maskrcnn.runtime.atomic: never a half-written file."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getvalue())
