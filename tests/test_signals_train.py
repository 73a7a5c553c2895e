"""Signals to a real ``maskrcnn train`` (a child process, one thread): it stops after the step in
progress with whole files and one line saying how to continue, and ``--resume`` then ends with
exactly the weights of a run never stopped; a second Ctrl-C stops at once with the previous last.pt
whole; under torchrun every rank stops at the same step. The moments signals are sent are drawn
from ``replay_rng`` (conftest), whose seed is printed. Helpers: test_signals.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import maskrcnn.runtime.signals as signals_module
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.cli.main import EXIT_INTERRUPTED, EXIT_STOPPED

from cli_helpers import cli
from conftest import finish, wait_for
from test_signals import REPO, data, handlers, log_steps, process, same_state, send  # noqa: F401 (data: a fixture)


STEPS = 10


def train_args(data: tuple[Path, Path], run: Path) -> list[str]:
    # 4 training images, batch 1: the run crosses epochs; validation (and last.pt) every 4 steps
    return [str(a) for a in ["train", "--data", data[0], "--out", run, "--config", data[1], "--iters", STEPS,
                             "--batch-size", 1, "--crop", 48, "--val-every", 4, "--checkpoint-every", 3,
                             "--lr", "3e-3", "--seed", 3, "--device", "cpu", "--no-progress"]]


STOPPED_LINE = re.compile(r"maskrcnn: stopped by (\w+) at step (\d+); last\.pt written to (.+); continue with: (.+)")


def test_a_signal_before_training_begins_stops_at_once_and_releases_the_lock(data, tmp_path, capsys, monkeypatch):
    import maskrcnn.train.engine as engine

    build_data = engine.build_data

    def signalled_build_data(*args, **kwargs):
        send(signal.SIGTERM)  # while the data is checked: nothing to save yet
        return build_data(*args, **kwargs)

    monkeypatch.setattr(engine, "build_data", signalled_build_data)
    before, run = handlers(), tmp_path / "run"
    code, out, err = cli(capsys, *train_args(data, run))
    assert (code, out, err) == (EXIT_INTERRUPTED, "", "maskrcnn: interrupted by SIGTERM\n")
    assert run.is_dir() and not (run / "run.lock").exists() and not (run / "last.pt").exists()
    assert handlers() == before


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, err = finish(process(train_args(data, run), cwd=run.parent))
    assert code == 0, err
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_train_after_a_step_and_resume_ends_like_an_uninterrupted_run(sig, data, uninterrupted,
                                                                                      tmp_path, replay_rng):
    run, args = tmp_path / "run", train_args(data, tmp_path / "run")
    after, delay = int(replay_rng.integers(1, 5)), float(replay_rng.uniform(0.0, 0.3))
    proc = process(args, cwd=tmp_path)
    wait_for(lambda: len(log_steps(run)[0]) >= after, proc)
    time.sleep(delay)
    proc.send_signal(sig)
    code, out, err = finish(proc)

    assert code == EXIT_STOPPED and out == "" and "Traceback" not in err, err
    assert f"maskrcnn: {sig.name} received: stopping after the current step" in err
    match = STOPPED_LINE.fullmatch(err.splitlines()[-1])
    assert match, err
    assert match[1] == sig.name and match[3] == str(run / "last.pt")
    assert match[4] == "maskrcnn " + shlex.join(args + ["--resume"])
    step = int(match[2])
    assert after <= step < STEPS
    at_stop = load_checkpoint(run / "last.pt")
    assert at_stop.step == step
    assert log_steps(run) == (list(range(1, step + 1)), list(range(4, step + 1, 4)))  # no final validation
    assert not (run / "run.lock").exists() and not list(run.glob(".*.tmp"))

    code, out, err = finish(process(args + ["--resume"], cwd=tmp_path))
    assert code == 0, err
    assert f"trained {STEPS} steps" in out
    a, b = load_checkpoint(uninterrupted / "last.pt"), load_checkpoint(run / "last.pt")
    assert (a.step, a.epoch, a.batch_in_epoch) == (b.step, b.epoch, b.batch_in_epoch)
    assert same_state(a.model_state, b.model_state) and same_state(a.optimizer_state, b.optimizer_state)
    assert not same_state(at_stop.model_state, b.model_state), "the resumed run did not train: nothing was compared"
    assert log_steps(run) == log_steps(uninterrupted) == (list(range(1, STEPS + 1)), [4, 8, 10])


def process_group(args: list, cwd: Path) -> subprocess.Popen:
    """``python -m maskrcnn ARGS`` as :func:`process` starts it, leading a process group of its own, as
    a command run from a terminal does: a terminal's Ctrl-C (and Slurm's signals) reach the group."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "maskrcnn", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_with_workers_a_signal_to_the_process_group_stops_train_after_a_step_and_resume_is_exact(
        sig, data, uninterrupted, tmp_path, replay_rng):
    """The same with --workers 2 and the signal sent to every process of the group, the DataLoader
    workers included: they ignore it, the training process stops as without them and ends them."""
    run, args = tmp_path / "run", train_args(data, tmp_path / "run") + ["--workers", "2"]
    after, delay = int(replay_rng.integers(1, 5)), float(replay_rng.uniform(0.0, 0.3))
    proc = process_group(args, cwd=tmp_path)
    wait_for(lambda: len(log_steps(run)[0]) >= after, proc)
    time.sleep(delay)
    os.killpg(proc.pid, sig)
    code, out, err = finish(proc)

    assert code == EXIT_STOPPED and out == "" and "Traceback" not in err, err
    assert err.count(f"maskrcnn: {sig.name} received: stopping after the current step") == 1, err  # not the workers
    match = STOPPED_LINE.fullmatch(err.splitlines()[-1])
    assert match and match[1] == sig.name and match[4] == "maskrcnn " + shlex.join(args + ["--resume"]), err
    step = int(match[2])
    assert after <= step < STEPS and load_checkpoint(run / "last.pt").step == step
    assert log_steps(run) == (list(range(1, step + 1)), list(range(4, step + 1, 4)))
    assert not (run / "run.lock").exists() and not list(run.glob(".*.tmp"))
    deadline = time.monotonic() + 10
    while not group_gone(proc.pid) and time.monotonic() < deadline:  # no worker outlives the run
        time.sleep(0.05)
    assert group_gone(proc.pid)

    code, out, err = finish(process_group(args + ["--resume"], cwd=tmp_path))
    assert code == 0, err
    a, b = load_checkpoint(uninterrupted / "last.pt"), load_checkpoint(run / "last.pt")  # trained without workers
    assert (a.step, a.epoch, a.batch_in_epoch) == (b.step, b.epoch, b.batch_in_epoch)
    assert same_state(a.model_state, b.model_state) and same_state(a.optimizer_state, b.optimizer_state)
    assert log_steps(run) == log_steps(uninterrupted) == (list(range(1, STEPS + 1)), [4, 8, 10])


SLOW_LAST_SAVE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from maskrcnn.train import hooks
    after_train = hooks.Checkpointer.after_train
    def slow_after_train(self):
        if self.trainer.interrupted:  # the save at a stop takes a minute: a second Ctrl-C lands in it
            Path(os.environ["SAVING"]).touch()
            time.sleep(60)
        after_train(self)
    hooks.Checkpointer.after_train = slow_after_train
    from maskrcnn.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_train_at_once_with_the_previous_last_pt_whole(data, tmp_path):
    run, saving = tmp_path / "run", tmp_path / "saving"
    proc = process(train_args(data, run), cwd=tmp_path, script=SLOW_LAST_SAVE, SAVING=str(saving))
    wait_for(lambda: len(log_steps(run)[0]) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    wait_for(saving.exists, proc)
    time.sleep(max(0.0, sent + signals_module.REPEAT_WINDOW_S + 0.2 - time.monotonic()))
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, timeout=50)  # well before the minute the save would take

    assert code == EXIT_INTERRUPTED and "Traceback" not in err, err
    assert err.splitlines()[-1] == "maskrcnn: interrupted by SIGINT"
    step = len(log_steps(run)[0])
    saved = max(s for s in range(1, step + 1) if s % 3 == 0 or s % 4 == 0)  # --checkpoint-every, --val-every
    assert load_checkpoint(run / "last.pt").step == saved  # the one before the stop, whole
    assert not (run / "run.lock").exists() and not list(run.glob(".*.tmp"))


WORKER = "import sys; from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    run, args = tmp_path / "run", train_args(data, tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [process(args, cwd=tmp_path, script=WORKER, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                     LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(2)]
    try:
        wait_for(lambda: len(log_steps(run)[0]) >= 2, ranks[0])
        assert json.loads((run / "run.lock").read_text())["pid"] == ranks[0].pid  # only rank 0 locks
        ranks[1].send_signal(signal.SIGTERM)  # not rank 0, which decides nothing alone
        (code0, _, err0), (code1, _, err1) = finish(ranks[0], 120), finish(ranks[1], 120)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    assert (code0, code1) == (EXIT_STOPPED, EXIT_STOPPED), err0 + err1
    match = STOPPED_LINE.fullmatch(err0.splitlines()[-1])
    assert match and match[1] == "SIGTERM", err0
    assert match[4] == "torchrun [its options] -m maskrcnn " + shlex.join(args + ["--resume"])
    assert "SIGTERM received" in err1 and "stopped by" not in err1  # rank 1 got it; rank 0 reports
    step = int(match[2])
    assert load_checkpoint(run / "last.pt").step == step and log_steps(run)[0] == list(range(1, step + 1))
    assert not (run / "run.lock").exists()
