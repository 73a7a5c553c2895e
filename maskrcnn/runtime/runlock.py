"""One run per run directory: ``maskrcnn train`` holds RUN_DIR/run.lock while it runs.

Two runs writing into one folder would interleave metrics.jsonl and overwrite each other's
checkpoints. The lock file is created with O_CREAT | O_EXCL, which exactly one of any number of
racing processes wins, and holds its owner as one JSON line: pid, host, start time, command. A
second run into the folder is refused with one line naming the owner. A lock whose owner is gone
(same host, pid no longer running: a run killed with SIGKILL, or by a power cut) is taken over
with a one-line warning; a lock from another host is refused, since its pid cannot be checked
from here, with a line saying which file to delete if that run is gone. The owner deletes the
file when it ends, on every path (normal end, error, signal); only SIGKILL and the like leave it.

What it does not cover:
- file systems whose exclusive create is not atomic across machines (NFSv2, some FUSE and
  object-store mounts): two runs started at the same instant on different nodes may both start;
- a pid reused by an unrelated process after a crash looks alive: the run is refused (delete
  the file); two containers that share the folder and a host name but not a pid namespace may
  take each other's lock over as stale;
- the start time is only shown, never compared, so clocks do not matter;
- taking a stale lock over is serialised by flock on the stale file; where flock is missing
  (some network file systems), two runs taking over one stale lock at the same instant may both
  start.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import UserError
from .atomic import process_alive

try:
    import fcntl
except ImportError:  # not POSIX: takeovers go unguarded
    fcntl = None

if TYPE_CHECKING:
    from .distributed import DistContext

LOCK_NAME = "run.lock"
ATTEMPTS = 5  # create, or take over a stale lock, this many times before giving up
UNREADABLE_WAIT_S = 1.0  # a lock just created is empty until its owner has written it


@dataclass
class LockOwner:
    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


class RunLock:
    """RUN_DIR/run.lock for this process: ``acquire`` or raise UserError naming the owner;
    ``release`` deletes it if it is still this process's. Also a context manager."""

    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        self.owner = LockOwner(os.getpid(), socket.gethostname(), started, command or shlex.join(sys.argv))
        self.content = json.dumps(asdict(self.owner)) + "\n"
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(ATTEMPTS):
            if self._create():
                self.held = True
                return
            text = self._read()
            if text is None:  # deleted since: its owner ended, or another run took it over
                continue
            owner = self._check_stale(text)
            if self._remove_stale(text):
                warnings.warn(f"{self.path}: taking over the lock of a run that is gone ({owner.describe()})")
        raise UserError(f"{self.path}: could not take the lock: other runs keep taking it; try again")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self.content:  # not a lock someone else made after deleting ours
                self.path.unlink()
        except FileNotFoundError:
            pass

    # --- steps of acquire ------------------------------------------------------------------------
    def _create(self) -> bool:
        """Create the lock with this process as owner; False when it exists already."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.content)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a lock without its owner in it would block the folder: leave none
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self) -> str | None:
        """The lock's text once it holds an owner (None: the file is gone). One just created may
        still be empty: wait a moment for its owner to write it."""
        deadline = time.monotonic() + UNREADABLE_WAIT_S
        while True:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            if _parse(text) is not None or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def _check_stale(self, text: str) -> LockOwner:
        """The owner of a lock that may be taken over; UserError when it may not."""
        owner = _parse(text)
        if owner is None:
            raise UserError(f"{self.path}: unreadable lock file (left by a run killed as it started?); "
                            f"if no run is using {self.run_dir}, delete it")
        if owner.host != self.owner.host:
            raise UserError(f"{self.run_dir}: in use by another run ({owner.describe()}); its process cannot be "
                            f"checked from {self.owner.host}: if that run is gone, delete {self.path}")
        if process_alive(owner.pid):
            raise UserError(f"{self.run_dir}: in use by another run ({owner.describe()}); wait for it to end "
                            "or choose another --out")
        return owner

    def _remove_stale(self, text: str) -> bool:
        """Delete the stale lock whose text is ``text``; False when another run got there first.

        Runs taking it over flock the stale file, one at a time (the kernel drops a dead process's
        flock), and delete it only if the name still refers to that file with that text: a run
        that took it over before us has deleted it and may have made its own lock since."""
        try:
            fd = _open_for_lock(self.path)
        except FileNotFoundError:
            return False
        try:
            _flock(fd)
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino or os.read(fd, 1 << 16).decode() != text:
                return False
            self.path.unlink()
            return True
        except (FileNotFoundError, UnicodeDecodeError):
            return False
        finally:
            os.close(fd)  # releases the flock


def _open_for_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR)  # NFS turns flock into a POSIX lock, which needs write access
    except PermissionError:  # another user's lock: a local flock works read-only
        return os.open(path, os.O_RDONLY)


def _flock(fd: int) -> None:
    """Wait for an exclusive flock on ``fd``; none where the platform or file system has none."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK, EOPNOTSUPP, EBADF: no flock here; the takeover goes unguarded
        pass


def _parse(text: str) -> LockOwner | None:
    try:
        fields = json.loads(text)
        return LockOwner(int(fields["pid"]), str(fields["host"]), str(fields["started"]), str(fields["command"]))
    except (ValueError, TypeError, KeyError):
        return None


@contextmanager
def run_lock(run_dir: str | Path, dist: DistContext, command: str | None = None) -> Iterator[RunLock | None]:
    """Hold RUN_DIR's lock for a run's ranks: rank 0 takes it and tells the others whether it did,
    so that a refused run ends on every rank rather than leaving them waiting at a collective."""
    lock = RunLock(run_dir, command) if dist.is_main else None
    error: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
        except (UserError, OSError) as err:
            error = err
    (taken,) = dist.from_main([0.0 if error else 1.0])
    if error is not None:
        raise error
    if not taken:
        raise UserError(f"{run_dir}: the run directory is in use (rank 0 says by whom)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
