"""Helpers shared by the tests that run the command line in-process."""

from __future__ import annotations

from maskrcnn.cli.main import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``maskrcnn ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_user_error(code: int, err: str, *names: object) -> None:
    """Exit code 2, one line on stderr naming each of ``names``, no traceback."""
    assert code == 2
    assert err.startswith("maskrcnn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err
