"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class KdctlError(Exception):
    """A problem with the user's input (bad path, malformed data, class mismatch, corrupt checkpoint...).

    The message must be one clear line that says what is wrong and, where possible, how to fix it.
    """

    exit_code = 2


class BackboneWeightsUnavailable(KdctlError):
    """ImageNet backbone weights for a preset could not be fetched (offline, no cache).

    ``kdctl train``/``distill`` turn it into a one-line warning and build the model from scratch; other callers see
    the error, which says to pass ``--no-pretrained-backbone``.
    """
