"""The learning-rate schedule, and the length it decays over under a wall-clock budget."""

from __future__ import annotations

import math
import time

from ..runtime.distributed import DistContext

# The cosine decays to this fraction of the base rate, not to zero: the last steps still learn.
LR_FLOOR = 0.05


def learning_rate(step: int, base: float, warmup: int, total: int | None, floor: float = LR_FLOOR) -> float:
    """Linear warm-up, then cosine decay to ``floor * base`` over ``total`` steps (flat if unknown)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not total or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def time_budget(step: int, dist: DistContext, total: int | None, deadline: float | None,
                started: tuple[float, int]) -> tuple[bool, int | None]:
    """(out of time?, steps the schedule decays over) at ``step``.

    ``total`` is the run's fixed length (--iters / --epochs) or None; ``deadline`` a
    ``time.monotonic()`` value or None; ``started`` the (time, step) the run began at. With only a
    wall-clock budget the cosine decay is fitted to the steps the budget allows at the rate
    measured so far, so a --max-minutes run ends at a low learning rate too. Rank 0 decides for
    every rank: the ranks' clocks differ, and all of them must stop at the same step.
    """
    if deadline is None:
        return False, total
    now = time.monotonic()
    if total is None and step > started[1]:
        per_step = (now - started[0]) / (step - started[1])
        total = step + int(max(0.0, deadline - now) / per_step)
    out_of_time, total_f = dist.from_main([float(now >= deadline), float(total or 0)])
    return bool(out_of_time), int(total_f) or None
