"""One run per run directory: RUN_DIR/run.lock, taken with an atomic exclusive create.

A second ``train`` into a folder in use is refused with one line naming the owner; a lock whose
owner is gone (same host, dead pid) is taken over with a warning; one from another host is
refused with the file to delete. Of processes racing for a lock, fresh or stale, exactly one
wins; the lock goes away on every exit path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import maskrcnn.runtime.runlock as runlock
from maskrcnn.cli.main import EXIT_STOPPED, EXIT_USER_ERROR
from maskrcnn.errors import UserError
from maskrcnn.runtime.runlock import LOCK_NAME, RunLock

from cli_helpers import cli
from conftest import finish, wait_for
from test_signals import data, log_steps, process  # noqa: F401 (data: a fixture)
from test_signals_train import train_args


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped): no process has it now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run: Path, pid: int, host: str | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00",
                                "command": "maskrcnn train --out old"}) + "\n")
    return path


def test_the_lock_names_its_owner_refuses_a_second_run_and_goes_away(tmp_path):
    with RunLock(tmp_path / "run", command="maskrcnn train --out run") as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["command"] == "maskrcnn train --out run" and owner["started"]
        with pytest.raises(UserError) as info:
            RunLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()}, started " in message
        assert "maskrcnn train --out run" in message and "\n" not in message
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    other = write_lock(tmp_path, 1)  # e.g. deleted by hand and taken by another run since
    lock.release()
    assert json.loads(other.read_text())["pid"] == 1


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with pytest.warns(UserWarning, match=rf"taking over the lock of a run that is gone \(pid {pid} on "):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    path = write_lock(tmp_path, dead_pid(), host="node-that-is-not-this-one")
    with pytest.raises(UserError, match=rf"cannot be checked from .*: if that run is gone, delete {path}$"):
        RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["host"] == "node-that-is-not-this-one"  # left alone


def test_an_unreadable_lock_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "UNREADABLE_WAIT_S", 0.1)
    (tmp_path / LOCK_NAME).write_text("")  # its owner died between creating and writing it
    with pytest.raises(UserError, match="unreadable lock file .*delete it"):
        RunLock(tmp_path).acquire()


# --- processes racing --------------------------------------------------------------------------------------
RACER = textwrap.dedent("""
    import json, os, sys, time, warnings
    from pathlib import Path
    from maskrcnn.errors import UserError
    from maskrcnn.runtime.runlock import RunLock
    run, go, dead_pid = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    holder = run / "holder"  # made exclusively by whoever holds the lock: exists twice only if two hold it
    counts = {"wins": 0, "overlaps": 0, "takeovers": 0}
    while not go.exists():  # all start together
        time.sleep(0.001)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        lock = RunLock(run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                lock.acquire()
            except UserError:
                continue
        counts["wins"] += 1
        counts["takeovers"] += len(caught)
        try:
            os.close(os.open(holder, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            counts["overlaps"] += 1
            continue
        time.sleep(0.001)
        holder.unlink()
        if counts["wins"] % 2:
            lock.release()
        else:  # die holding it, as SIGKILL would: the next winner takes a stale lock over
            lock.path.write_text(json.dumps({"pid": dead_pid, "host": lock.owner.host, "started": "",
                                             "command": "killed"}))
    print(json.dumps(counts))
""")


@pytest.mark.slow
def test_of_processes_racing_for_a_lock_fresh_or_stale_only_one_holds_it_at_a_time(tmp_path):
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    racers = [process([run, go, dead_pid()], cwd=tmp_path, script=RACER) for _ in range(4)]
    time.sleep(3)  # imports done: they wait for the go
    go.touch()
    results = [finish(proc, 120) for proc in racers]
    assert [code for code, _, _ in results] == [0] * 4, [err for _, _, err in results]
    counts = [json.loads(out) for _, out, _ in results]
    assert sum(c["overlaps"] for c in counts) == 0, counts
    assert sum(c["wins"] for c in counts) >= 20 and sum(c["takeovers"] for c in counts) >= 5, counts


def test_a_stale_lock_taken_over_meanwhile_is_left_to_its_new_owner(tmp_path):
    """Two runs find the same stale lock; the first takes it over before the second deletes it:
    the second must leave the first one's new lock alone."""
    write_lock(tmp_path, dead_pid())
    second = RunLock(tmp_path)
    stale_text = second._read()
    with pytest.warns(UserWarning, match="taking over"):
        first = RunLock(tmp_path, command="first")
        first.acquire()
    assert second._remove_stale(stale_text) is False
    assert (tmp_path / LOCK_NAME).read_text() == first.content
    with pytest.raises(UserError, match=r"in use by another run \(pid \d+ .*: first\)"):
        second.acquire()
    first.release()


# --- two real `maskrcnn train` runs ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_train_into_a_folder_in_use_is_refused_naming_the_first(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run)
    args[args.index("--iters") + 1] = "200"  # long enough to be running throughout
    first = process(args, cwd=tmp_path)
    try:
        wait_for(lambda: len(log_steps(run)[0]) >= 1, first)
        code, out, err = finish(process(args, cwd=tmp_path))
        assert code == EXIT_USER_ERROR and out == "", err
        assert err.count("\n") == 1 and err.startswith(f"maskrcnn: error: {run}: in use by another run "
                                                       f"(pid {first.pid} on {socket.gethostname()}, started ")
        assert "maskrcnn train --data" in err and err.endswith("; wait for it to end or choose another --out\n")
        first.send_signal(signal.SIGTERM)
        code, _, err = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == EXIT_STOPPED, err
    steps = log_steps(run)[0]
    assert steps == list(range(1, len(steps) + 1))  # one run's records only
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_the_lock_of_a_killed_train_is_taken_over_by_the_next(data, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    args = train_args(data, run)
    killed = process(args, cwd=tmp_path)
    wait_for(lambda: len(log_steps(run)[0]) >= 1, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == killed.pid  # what SIGKILL leaves

    args[args.index("--iters") + 1] = "1"
    with pytest.warns(UserWarning, match=rf"taking over the lock of a run that is gone \(pid {killed.pid} "):
        code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert not (run / LOCK_NAME).exists()


def test_a_train_that_fails_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    # --init none: the CLI does not open the data to pick a starting model, so the run fails inside the lock
    code, _, err = cli(capsys, "train", "--data", tmp_path / "missing", "--out", run, "--iters", 1, "--device", "cpu",
                       "--no-progress", "--init", "none")
    assert code == EXIT_USER_ERROR and "missing" in err
    assert run.is_dir() and not (run / LOCK_NAME).exists()
