"""The hook that ends a run cleanly on SIGINT, SIGTERM or SIGUSR1 (see maskrcnn/runtime/signals.py).

While the loop runs, the first such signal lets the step in progress finish; then the run stops
as interrupted: no final validation, last.pt written at that step (by the Checkpointer, which
runs its ``after_train`` before this hook), and ``TrainResult.stopped_by`` names the signal.
Under torchrun the ranks agree after every step on whether any of them received one, so every
rank stops at the same step even when the signal reached only one of them.
"""

from __future__ import annotations

from ..runtime.signals import SIGNAL_NAMES, StopSignals
from .hooks import HookBase


class SignalStop(HookBase):
    """Registered after the default hooks: its ``after_step`` sees the step saved and logged."""

    def __init__(self) -> None:
        self.signals: StopSignals | None = None

    def before_train(self) -> None:
        self.signals = StopSignals(graceful=True, unit="step").__enter__()

    def after_step(self) -> None:
        name = self.agreed_signal()
        if name is not None:
            self.trainer.request_stop(name, interrupted=True)

    def close(self) -> None:
        if self.signals is not None:  # the previous handlers are back, also when a step raised
            self.signals.__exit__(None, None, None)
            self.signals = None

    def agreed_signal(self) -> str | None:
        """The signal any rank has received (the first in SIGNAL_NAMES when they differ), the
        same on every rank: one small all-reduce per step under torchrun."""
        received = self.signals.received if self.signals else None
        flags = self.trainer.dist.mean_floats({name: float(received == name) for name in SIGNAL_NAMES})
        return next((name for name, flag in flags.items() if flag > 0), None)
