"""Run directories: ``OUTPUT/TASK/NAME``, auto-numbered like Ultralytics (exp, exp2, exp3, ...)."""

from __future__ import annotations

import os
from pathlib import Path


def new_run_dir(output: str | Path, task: str, name: str | None = None, exact: str | Path | None = None) -> Path:
    """Create and return a fresh ``output/task/name`` directory; never reuses an existing one.

    ``name`` defaults to "exp"; when ``output/task/name`` exists, the first free ``name2``, ``name3``... is used.
    ``exact``: create exactly this directory instead (its parent may exist; the directory itself must not).
    """
    from kdctl.errors import KdctlError

    if exact is not None:
        path = Path(exact).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path)
            return path
        except FileExistsError as e:
            raise KdctlError(f"{path} already exists; nothing was overwritten") from e
        except OSError as e:
            raise KdctlError(f"cannot create the run folder {e.filename or path}: {e.strerror}") from e
    base = Path(output).expanduser() / task
    stem = name or "exp"
    candidate, n = base / stem, 2
    try:
        base.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                os.mkdir(candidate)  # atomic: two processes never get the same directory
                return candidate
            except FileExistsError:
                candidate = base / f"{stem}{n}"
                n += 1
    except OSError as e:  # read-only folder, a file where a folder should be, disk full
        where = e.filename or candidate
        raise KdctlError(f"cannot create the run folder {where}: {e.strerror or e.__class__.__name__} "
                         "(pass another --output)") from e


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; checks that a requested CUDA device exists."""
    import torch

    from kdctl.errors import KdctlError

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdctlError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise KdctlError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise KdctlError("--device mps: MPS is not available on this machine")
        return device
    if device != "cpu":
        raise KdctlError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device
