"""Checkpoints: written atomically, loaded with ``weights_only=True`` so a file can never run code.

A checkpoint holds plain data only: the model's state dict, the config as a dict, the
normalisation settings, class names, the package version, and for resuming the optimizer state,
the step/epoch counters, the torch, numpy, Python and CUDA RNG states and the AMP loss scale.
"""

from __future__ import annotations

import io
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..config import Config, ConfigError
from ..errors import UserError
from ..runtime.atomic import atomic_write_bytes

FORMAT = "maskrcnn-checkpoint/1"


@dataclass
class Checkpoint:
    config: Config
    model_state: dict[str, torch.Tensor]
    normalizer: dict[str, Any]
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    global_batch: int | None = None  # images per step (batch size x processes) that batch_in_epoch counts
    optimizer_state: dict[str, Any] | None = None
    rng_state: torch.Tensor | None = None
    rng_states: dict[str, Any] | None = None  # numpy, Python and CUDA generators (get_rng_states)
    scaler_state: dict[str, Any] | None = None  # AMP loss scale (CUDA float16 only)
    metrics: dict[str, float] = field(default_factory=dict)
    best_score: float | None = None
    version: str = __version__

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    payload = {
        "format": FORMAT,
        "version": ckpt.version,
        "config": ckpt.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in ckpt.model_state.items()},
        "normalizer": ckpt.normalizer,
        "step": ckpt.step,
        "epoch": ckpt.epoch,
        "batch_in_epoch": ckpt.batch_in_epoch,
        "global_batch": ckpt.global_batch,
        "optimizer": ckpt.optimizer_state,
        "rng_state": ckpt.rng_state,
        "rng_states": ckpt.rng_states,
        "scaler": ckpt.scaler_state,
        "metrics": ckpt.metrics,
        "best_score": ckpt.best_score,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def get_rng_states(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The numpy, Python and (on a CUDA device) CUDA generator states, as plain lists and tensors
    that a ``weights_only`` load accepts. torch's CPU generator is ``Checkpoint.rng_state``."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"numpy": [name, keys.tolist(), position, has_gauss, cached],
                              "python": [version, list(internal), gauss]}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any] | None, device: torch.device | str = "cpu") -> None:
    """Restore what :func:`get_rng_states` returned (None, from an older checkpoint: nothing)."""
    if not states:
        return
    if "numpy" in states:
        name, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def _refused_object(message: str) -> bool:
    """Whether torch's weights_only unpickler stopped at a class or function (code), not at bad bytes."""
    return "GLOBAL" in message or "add_safe_globals" in message


_STAGES = ("rpn.", "rcnn.", "mask.")


def stage_weight_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of checkpoints written before the heads moved into their stage modules
    (``rpn.convs.0.weight`` -> ``rpn.head.convs.0.weight``), renamed; newer ones pass unchanged."""
    def renamed(name: str) -> str:
        stage = next((s for s in _STAGES if name.startswith(s)), None)
        if stage is None or name.startswith(stage + "head."):
            return name
        return stage + "head." + name[len(stage):]
    return {renamed(name): value for name, value in state.items()}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint safely; every problem is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _refused_object(str(err)):  # e.g. "Unsupported operand": bytes that are no pickle
            raise UserError(f"{path}: corrupt or truncated checkpoint (not a torch checkpoint)") from None
        raise UserError(f"{path}: refused to load: it holds code or objects (checkpoints may only hold "
                        "tensors and plain data)") from None
    # Damaged files raise many unrelated types (RuntimeError from the zip reader, EOFError,
    # IndexError, KeyError, struct.error, UnicodeDecodeError, ...): all mean "cannot be read".
    except Exception as err:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a maskrcnn checkpoint")
    try:
        config = Config.from_dict(payload["config"], source=str(path))
    except ConfigError as err:
        raise UserError(str(err)) from None
    return Checkpoint(
        config=config, model_state=stage_weight_names(payload["model"]), normalizer=payload["normalizer"],
        step=payload["step"], epoch=payload["epoch"], batch_in_epoch=payload["batch_in_epoch"],
        global_batch=payload.get("global_batch"),
        optimizer_state=payload["optimizer"], rng_state=payload["rng_state"],
        rng_states=payload.get("rng_states"), scaler_state=payload.get("scaler"), metrics=payload["metrics"],
        best_score=payload["best_score"], version=payload["version"])
