"""Helpers shared by the tests that run the command line in-process."""

from __future__ import annotations

from maskrcnn.cli.main import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``maskrcnn ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
