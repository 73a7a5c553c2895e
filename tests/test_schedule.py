"""The learning-rate schedule: warm-up, cosine decay, and a decay fitted to a wall-clock budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from maskrcnn.train import schedule as train  # the module whose clock the test stops
from maskrcnn.runtime.distributed import DistContext
from maskrcnn.train import LR_FLOOR, Trainer, learning_rate


def test_warmup_then_cosine_to_five_percent():
    assert learning_rate(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, 110) == pytest.approx(0.525)
    assert learning_rate(110, 1.0, 10, 110) == pytest.approx(0.05)
    assert learning_rate(500, 1.0, 10, None) == 1.0  # no known length: flat after warm-up


def test_time_budget_fits_the_decay_to_the_measured_step_rate(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(train.time, "monotonic", lambda: clock.now)
    state = SimpleNamespace(step=0, dist=DistContext.single())
    deadline, started = 100.0 + 60.0, (100.0, 0)

    assert Trainer.budget(state, None, deadline, started) == (False, None)  # no rate measured yet
    state.step, clock.now = 10, 120.0  # 2 s a step, 40 s left: 20 more steps
    assert Trainer.budget(state, None, deadline, started) == (False, 30)
    state.step, clock.now = 30, 160.0
    assert Trainer.budget(state, None, deadline, started) == (True, 30)
    # a fixed length (--iters / --epochs) is kept; the budget only stops the run
    assert Trainer.budget(state, 500, deadline, started) == (True, 500)
    assert Trainer.budget(state, 500, None, started) == (False, 500)


def test_the_decay_ends_at_the_floor_it_is_given():
    assert learning_rate(110, 2.0, 10, 110) == pytest.approx(2.0 * LR_FLOOR)
    assert learning_rate(110, 2.0, 10, 110, floor=0.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(60, 2.0, 10, 110, floor=0.5) == pytest.approx(1.5)  # halfway: the mean of 2 and 1
