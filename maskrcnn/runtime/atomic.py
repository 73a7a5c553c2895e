"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it.

A reader, or a kill at any moment, sees the old file or the new one, never half of one. A kill
can leave the hidden temporary file (or folder, :func:`atomic_folder`) behind (``.NAME.PID.XXXX.tmp``);
the next run in the folder removes those whose process is gone (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_permissions() -> int:
    """0666 less the umask: what open() gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_PERMISSIONS = _default_permissions()
_TEMPORARY = re.compile(r"\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _PERMISSIONS)  # mkstemp makes 0600; outputs are for others too
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # e.g. a full disk: name the file it was for (os.write errors name none)
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """For writers that take a file name (tifffile, zarr): yields a temporary path beside ``path``;
    on a clean exit it is flushed and renamed over ``path``, on any exception (KeyboardInterrupt
    included) removed, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), _PERMISSIONS)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """For writers of folders (zarr): yields an empty temporary folder beside ``path``; on a clean
    exit it takes the place of ``path`` (a folder there before is moved aside first and then
    deleted), on any exception it is removed, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():  # a folder cannot be renamed over a full one: the old one steps aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _sync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders in ``folder`` that killed processes left; returns them.

    Those of processes still running (another run writing to the same folder) are kept.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and not process_alive(int(match["pid"])):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (this process included)."""
    if pid <= 0:  # 0 and negative numbers address process groups, not a process
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _sync_folder(folder: Path) -> None:
    """Flush the rename itself to disk (POSIX), so a power cut cannot undo it."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support syncing a folder; the rename still happened
        pass
    finally:
        os.close(fd)
