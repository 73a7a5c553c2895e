"""What a hook sees of the run it is registered with: the ``Trainer``'s state, as a protocol.

Hooks (hooks.py) read and set these; the engine (engine.py) implements them and imports the
hooks. Typing the hooks against this protocol instead of ``Trainer`` keeps the two modules from
importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..config import Config
from ..data.datasets import InstanceReader
from ..data.normalize import Normalizer
from ..data.torch_dataset import InstanceDataset
from ..runtime.distributed import DistContext
from .setup import TrainOptions


class TrainerState(Protocol):
    """One run's state as the hooks use it (see ``engine.Trainer`` for what each field holds)."""

    opts: TrainOptions
    dist: DistContext
    device: torch.device
    run_dir: Path
    cfg: Config
    normalizer: Normalizer
    train_set: InstanceDataset
    val_reader: InstanceReader
    val_listing: Path
    val_checked: bool
    global_batch: int
    total_steps: int | None
    schedule_steps: int | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int
    epoch: int
    batch_in_epoch: int
    best_score: float | None
    metrics: dict[str, float]
    losses: dict[str, float] | None
    skip_reason: str | None
    interrupted: bool

    def request_stop(self, reason: str, interrupted: bool = False) -> None: ...

    def budget(self, total: int | None, deadline: float | None,
               started: tuple[float, int]) -> tuple[bool, int | None]: ...
