"""Pictures for people: training curves and prediction overlays (matplotlib, headless)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_write_bytes  # noqa: E402

LOSS_KEYS = ["rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask"]


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Loss parts (smoothed) and validation metrics from a metrics.jsonl, as one PNG."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "rpn_cls" in r]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
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


def _smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _save(fig: plt.Figure, png_path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png_path, buffer.getvalue())
