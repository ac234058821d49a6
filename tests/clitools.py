"""Running the ``kdctl`` command line inside a test."""

from __future__ import annotations

from kdctl.cli import main


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    """``kdctl ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
