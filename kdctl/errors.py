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


def worker_message(message: str) -> str:
    """The message an error had in a DataLoader worker process, from the one torch re-raises it with.

    torch re-raises a worker's exception in the main process with its type kept but its message replaced by
    ``"Caught KdctlError in DataLoader worker process 0.\\nOriginal Traceback (most recent call last): ..."``,
    which ends with the formatted original, ``"kdctl.errors.KdctlError: <message>"``. Returns ``<message>``;
    any other message is returned unchanged.
    """
    import re

    m = re.match(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", message)
    if m is None:
        return message
    starts = [h.end() for h in re.finditer(rf"^(?:[\w.]+\.)?{m.group(1)}: ", message, re.M)]
    return message[starts[-1]:].rstrip("\n") if starts else message
