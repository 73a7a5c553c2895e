"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, configuration or files (not a bug in maskrcnn)."""


class DataError(UserError):
    """A data file that cannot be used, named with what is wrong with it. ``every_rank``: raised
    alike by every rank of a torchrun after they shared what they found (a collective), so the
    ranks can meet once more before they leave the process group (maskrcnn.runtime.distributed)."""

    def __init__(self, path: str | Path, problem: str, every_rank: bool = False):
        self.path = str(path)
        self.problem = problem
        self.every_rank = every_rank
        super().__init__(f"{self.path}: {problem}")
