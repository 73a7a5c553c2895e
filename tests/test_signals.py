"""Signals: SIGINT, SIGTERM and SIGUSR1 stop train cleanly, and the work continues (a real `maskrcnn
train` signalled and resumed: test_signals_train.py; predict: test_signals_predict.py).

The first signal lets the step (or image) in progress finish, leaves whole files, prints one
line saying how to continue and exits with EXIT_STOPPED; ``train --resume`` then ends with
exactly the weights of a run never stopped (CPU, one thread), ``predict --skip-existing`` with
the outputs of a run never stopped. A second Ctrl-C stops at once (EXIT_INTERRUPTED). The
moments signals are sent to real processes are drawn from ``replay_rng`` (conftest), whose seed
is printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import maskrcnn.runtime.signals as signals_module
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.runtime.signals import STOP_SIGNALS, StopSignals
from maskrcnn.train import HookBase, TrainOptions, Trainer

from conftest import TINY_RUN as TINY

REPO = Path(__file__).resolve().parents[1]


# --- helpers (test_signals_train, test_signals_predict and test_run_lock use them too) -------------------------------------------------------------
def process(args: list, cwd: Path, script: str | None = None, **env: str) -> subprocess.Popen:
    """``python -m maskrcnn ARGS`` (or ``python -c SCRIPT ARGS``) in a child: one thread, reproducible."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    command = ["-c", script] if script else ["-m", "maskrcnn"]
    return subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_steps(run: Path) -> tuple[list[int], list[int]]:
    """(steps with a loss record, steps with a validation record) in RUN/metrics.jsonl so far."""
    path = run / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written as we read
            pass
    return ([r["step"] for r in records if "rpn_cls" in r],
            [r["step"] for r in records if any(k.startswith("val_") for k in r)])


def handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


def send(*signals: int) -> None:
    """Signal this process; Python runs the handler in the main thread at its next instruction."""
    for sig in signals:
        os.kill(os.getpid(), sig)
        time.sleep(0.01)


def same_state(a, b) -> bool:
    """Whether two (nested) states hold the same tensors and numbers, exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(5 synthetic 64x64 images in the labels layout, tiny config YAML)."""
    root = tmp_path_factory.mktemp("signals")
    write_synthetic_dataset(root / "data", 5, 64, seed=0)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return root / "data", config


# --- StopSignals ----------------------------------------------------------------------------------------
def test_the_first_signal_is_recorded_and_the_previous_handlers_come_back():
    before = handlers()
    with StopSignals(unit="image") as stop:
        assert handlers() != before
        send(signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1)  # repeats of these never stop at once
    assert stop.received == "SIGUSR1"
    assert handlers() == before


def test_a_second_ctrl_c_stops_at_once_but_its_echo_does_not(monkeypatch):
    before = handlers()
    with StopSignals() as stop:
        send(signal.SIGINT, signal.SIGINT)  # within REPEAT_WINDOW_S: the same Ctrl-C, forwarded by torchrun
    assert stop.received == "SIGINT"
    monkeypatch.setattr(signals_module, "REPEAT_WINDOW_S", 0.0)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        with StopSignals():
            send(signal.SIGTERM, signal.SIGINT)
    assert handlers() == before


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_outside_a_loop_each_signal_stops_at_once(sig):
    with pytest.raises(KeyboardInterrupt, match=sig.name):
        with StopSignals(graceful=False):
            send(sig)


def test_off_the_main_thread_no_handler_is_installed():
    before, seen = handlers(), []

    def body() -> None:
        with StopSignals():
            seen.append(handlers())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before] and handlers() == before


# --- the training loop, in this process ---------------------------------------------------------------
class SendDuring(HookBase):
    """Signals this process as step ``step`` begins, so that they arrive while it runs."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals = step, signals

    def before_step(self) -> None:
        if self.trainer.step + 1 == self.step:
            send(*self.signals)


def trainer(data: tuple[Path, Path], run: Path, **options) -> Trainer:
    opts = TrainOptions(data=str(data[0]), out=str(run), config=nuclei_config(**TINY), batch_size=2, crop=48,
                        device="cpu", progress=False, **options)
    return Trainer(opts)


def test_a_signal_during_a_step_ends_the_run_after_it_with_last_pt_there(data, tmp_path, one_thread):
    before = handlers()
    t = trainer(data, tmp_path / "run", iters=6, val_every=100)
    t.register(SendDuring(2, signal.SIGUSR1))
    result = t.run()
    assert (result.steps, result.stopped_by, result.interrupted) == (2, "SIGUSR1", True)
    assert load_checkpoint(result.last).step == 2
    assert log_steps(tmp_path / "run") == ([1, 2], [])  # no final validation at a stop
    assert handlers() == before


def test_a_second_ctrl_c_ends_the_run_at_once_with_the_last_checkpoint_whole(data, tmp_path, one_thread,
                                                                             monkeypatch):
    monkeypatch.setattr(signals_module, "REPEAT_WINDOW_S", 0.0)
    before = handlers()
    t = trainer(data, tmp_path / "run", iters=6, val_every=100, checkpoint_every=2)
    t.register(SendDuring(4, signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        t.run()
    assert load_checkpoint(tmp_path / "run" / "last.pt").step == 2  # the one before, untouched
    assert handlers() == before
