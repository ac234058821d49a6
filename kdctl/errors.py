"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class KdctlError(Exception):
    """A problem with the user's input (bad path, malformed data, class mismatch, corrupt checkpoint...).

    The message must be one clear line that says what is wrong and, where possible, how to fix it.
    """

    exit_code = 2
