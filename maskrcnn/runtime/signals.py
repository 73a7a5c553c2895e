"""Stopping on SIGINT, SIGTERM and SIGUSR1: cleanly between units of work, or at once.

People press Ctrl-C (SIGINT), clusters stop jobs with SIGTERM (Slurm, Kubernetes), and Slurm can
send SIGUSR1 ahead of a time limit (``sbatch --signal=USR1@120``). ``StopSignals`` turns them
into one of two behaviours while it is entered:

- ``graceful=True`` (the loops of train and predict): the first signal is only recorded
  (``received``) and announced; the loop finishes the unit in progress (a training step, an
  image), leaves its files whole and ends. A later SIGINT stops at once, by KeyboardInterrupt
  (exit 130). Repeated SIGTERM and SIGUSR1 are ignored: Slurm and torchrun both deliver them,
  and the senders escalate to SIGKILL on their own.
- ``graceful=False`` (around the setup of a run): each of the three raises KeyboardInterrupt at
  once, so that ``finally`` blocks and context managers (the run lock) still run; SIGTERM's
  default would end the process without them.

A SIGINT within ``REPEAT_WINDOW_S`` of the first signal counts as the same one: under torchrun
the terminal's Ctrl-C reaches every worker and torchrun forwards it to them again.

Signal handlers are process-wide and Python runs them in the main thread only, so they are
installed only when entered from the main thread (elsewhere nothing changes), and the previous
handlers are put back on exit: train and predict may run inside a larger program.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))
SIGNAL_NAMES = tuple(sig.name for sig in STOP_SIGNALS)
REPEAT_WINDOW_S = 0.5


class StopSignals:
    """A context manager: while entered, SIGINT, SIGTERM and SIGUSR1 stop gracefully or at once
    (see the module doc). ``received`` is the name of the first signal, e.g. "SIGTERM", or None."""

    def __init__(self, graceful: bool = True, unit: str = "step") -> None:
        self.graceful, self.unit = graceful, unit
        self.received: str | None = None
        self.received_at = 0.0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.graceful:
            raise KeyboardInterrupt(name)
        if self.received is None:
            self.received, self.received_at = name, time.monotonic()
            again = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C (SIGINT)"
            _notice(f"maskrcnn: {name} received: stopping after the current {self.unit}; {again} stops at once")
        elif signum == signal.SIGINT and time.monotonic() - self.received_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt(name)


def _notice(line: str) -> None:
    """Write one line to stderr from a signal handler. Unbuffered: the handler may have interrupted
    a write to sys.stderr (the progress bar), and re-entering its buffer raises."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError, AttributeError):  # no usable stderr (closed, or replaced without a file)
        pass
