"""Pictures for people: training curves (matplotlib, headless) and prediction overlays (numpy)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

LOSS_KEYS = ["rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask"]
# Fixed so that a label image is drawn in the same colours on every run (reproducible overlays).
PALETTE_SEED = 12345
PALETTE_MIN = 80  # channel values from here to 255: no colour dark enough to vanish on a dark image


# --- training curves ------------------------------------------------------------------------------
def plot_training_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Loss parts (smoothed) and validation metrics from a metrics.jsonl, as one PNG."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "rpn_cls" in r]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    fig = _figure(figsize=(11, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    for key in LOSS_KEYS:
        steps = np.array([r["step"] for r in train])
        values = np.array([r[key] for r in train])
        if len(values):
            ax_loss.plot(steps, _smooth(values), label=key)
    ax_loss.set(title="training losses", xlabel="step", yscale="log")
    for key in ("val_mask_ap", "val_mask_ap50", "val_dsb_score"):
        points = [(r["step"], r[key]) for r in val if key in r]
        if points:
            ax_val.plot(*zip(*points), marker="o", label=key[4:])
    ax_val.set(title="validation", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, png_path)


def _figure(**options) -> "Figure":
    """A matplotlib Figure drawn without pyplot: no global backend is chosen or changed, so this
    works headless and inside a GUI (napari) alike.

    Imported on first use: prediction draws its overlays with numpy alone and need not load it.
    """
    from matplotlib.figure import Figure

    return Figure(**options)


def _smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    """Running mean over ``window`` steps, (N,) -> (N,); the first steps average what came before."""
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _save(fig: "Figure", png_path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(png_path, buffer.getvalue())


# --- prediction overlays ------------------------------------------------------------------------
def overlay_image(display: np.ndarray, label_image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture and (H, W) int label image -> the picture with each instance's contour
    drawn in its own colour, (H, W, 3) uint8."""
    lab = label_image
    edge = instance_edges(lab)
    out = display.copy()
    out[edge] = _palette(int(lab.max()) + 1)[lab[edge]]
    return out


def instance_edges(label_image: np.ndarray) -> np.ndarray:
    """(H, W) label image -> (H, W) bool: the pixels of each instance that touch another id (its inner edge)."""
    lab = label_image
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    return edge & (lab > 0)


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, row i for id i; the same n gives the same colours."""
    rng = np.random.default_rng(PALETTE_SEED)
    palette = rng.integers(PALETTE_MIN, 256, size=(n, 3), dtype=np.uint8)
    palette[:, rng.integers(0, 3, size=n)[0]] = 255  # one channel saturated: visible on grey images
    return palette


def display_image(normalized: torch.Tensor) -> np.ndarray:
    """(C, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 for viewing (grey repeated, extra channels dropped)."""
    array = (normalized.clamp(0, 1) * 255).round().byte().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    return np.ascontiguousarray(array.transpose(1, 2, 0))


def save_comparison(png_path: str | Path, left: list[Path], right: list[Path], titles: tuple[str, str],
                    rows: int = 3) -> None:
    """The first ``rows`` overlays of two runs side by side (same images, same order), one figure."""
    from PIL import Image

    rows = min(rows, len(left), len(right))
    fig = _figure(figsize=(8, 4 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    for row in range(rows):
        for col, (files, title) in enumerate(zip((left, right), titles)):
            axes[row, col].imshow(np.asarray(Image.open(files[row])))
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    fig.tight_layout()
    _save(fig, png_path)
