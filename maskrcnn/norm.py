"""The normalisation layer chosen by ``Config.norm``, for the backbone trunk and the mask head.

BatchNorm normalises over the batch, so under torch.distributed each process uses its own
batch's statistics (unless --sync-bn on CUDA) and a run depends on how the global batch is split.
GroupNorm normalises each image on its own: the same model trains the same on any number of
processes.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

MAX_GROUPS = 32  # Wu & He's default


def group_count(channels: int) -> int:
    """Groups for ``channels``: 32 when they divide evenly, else the largest divisor of 32 that does."""
    return math.gcd(MAX_GROUPS, channels)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """``channels -> module`` for ``kind`` "batch" or "group" (torchvision's ``norm_layer`` form)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")
