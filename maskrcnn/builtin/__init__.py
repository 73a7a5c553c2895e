"""Built-in pretrained models: weights shipped inside the package, usable with no training and no
network (``--weights nuclei``, ``--init nuclei``).

A built-in model ``NAME`` is two files in this folder: ``NAME.pt``, a checkpoint with half-precision
weights and no optimizer state (loaded with ``weights_only`` like every checkpoint), and
``NAME.json``, its card: what it was trained on, for how long on what hardware, the nucleus sizes
it expects, its measured scores and the licence of its data. ``maskrcnn pretrain`` writes both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..runtime.atomic import atomic_write_text

FOLDER = Path(__file__).resolve().parent
MAX_FILE_BYTES = 10 * 1024 * 1024  # a built-in model lives in git and in the wheel


def builtin_names() -> list[str]:
    """Names of the built-in models shipped with this installation."""
    return sorted(p.stem for p in FOLDER.glob("*.json") if (FOLDER / f"{p.stem}.pt").is_file())


def is_builtin(spec: str | Path) -> bool:
    """Whether ``spec`` names a built-in model rather than a file (a file of that name wins)."""
    return isinstance(spec, str) and spec in builtin_names() and not Path(spec).exists()


def resolve_weights(spec: str | Path) -> Path:
    """The file behind ``--weights``/``--init``: a built-in model's checkpoint, or ``spec`` itself."""
    return FOLDER / f"{spec}.pt" if is_builtin(spec) else Path(spec)


def card(name: str) -> dict[str, Any]:
    """The card of built-in model ``name`` (its JSON file), with the weights' file size added."""
    info = json.loads((FOLDER / f"{name}.json").read_text())
    info["file_megabytes"] = round((FOLDER / f"{name}.pt").stat().st_size / 2**20, 2)
    return info


def trained_diameter(spec: str | Path) -> float | None:
    """The nucleus diameter in pixels that built-in model ``spec`` was trained for (its card's
    ``diameter_px``: what ``--diameter auto`` resizes images to); None for any other weights."""
    return card(spec).get("diameter_px") if is_builtin(spec) else None


def format_card(name: str) -> str:
    """A built-in model's card as the lines ``maskrcnn models`` prints."""
    info = card(name)
    lines = [f"{name}: {info['summary']}"]
    for key, label in (("trained_on", "trained on"), ("training", "training"), ("input", "input"),
                       ("scale", "other scales"), ("prediction", "prediction"),
                       ("scores", "measured"), ("licence", "data licence")):
        value = info.get(key)
        if isinstance(value, dict):
            value = "; ".join(f"{k} {_short(v)}" for k, v in value.items())
        if value:
            lines.append(f"  {label}: {value}")
    lines.append(f"  file: {info['file_megabytes']} MB ({FOLDER / (name + '.pt')})")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_short(v)}" for k, v in value.items()) + ")"
    return str(value)


def publish(source: str | Path, name: str, info: dict[str, Any], folder: Path = FOLDER,
            settings: dict[str, Any] | None = None) -> Path:
    """Write ``folder/name.pt`` (``source``'s weights in half precision, no optimizer) and its card;
    ``settings``: prediction-time config fields (``*_test_*``) the published model runs with instead
    of those it trained with (what the recipe chose after training; they change no weight).

    float16 keeps every weight of a trained model to about 3 significant digits, which moves
    predictions far less than run-to-run noise, and halves the file.
    """
    settings = settings or {}
    learnt = [key for key in settings if "_test_" not in key]
    if learnt:
        raise ValueError(f"publish: {', '.join(learnt)} not a prediction-time setting (*_test_*)")
    ckpt = load_checkpoint(source)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.model_state.items()}
    target = folder / f"{name}.pt"
    save_checkpoint(target, Checkpoint(config=ckpt.config.replace(backbone_weights=None, **settings), model_state=state,
                                       normalizer=ckpt.normalizer, step=ckpt.step, metrics=ckpt.metrics))
    size = target.stat().st_size
    if size > MAX_FILE_BYTES:
        target.unlink()
        raise ValueError(f"{target}: {size / 2**20:.1f} MB is over the {MAX_FILE_BYTES / 2**20:.0f} MB a built-in "
                         "model may take; use a smaller layout")
    atomic_write_text(folder / f"{name}.json", json.dumps(info, indent=2) + "\n")
    return target


def as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision weights of a built-in model back in float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
