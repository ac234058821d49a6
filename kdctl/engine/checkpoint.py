"""Atomic checkpoints of a run: ``last/`` and ``best/`` directories.

A checkpoint directory holds the student as a loadable model directory (``kdctl.load(run/best)`` works: weights in
safetensors plus its config) and ``trainer.pt``: optimiser, scheduler, AMP scaler, distiller weights, RNG states,
epoch and step. ``trainer.pt`` contains tensors and plain Python values only and is read back with
``torch.load(weights_only=True)``.

Writing is atomic at the directory level: the new checkpoint is written to ``NAME.tmp-PID``, the old one renamed
to ``NAME.old``, the new one renamed to ``NAME`` and the old one removed. A kill at any moment leaves either
``NAME`` or ``NAME.old`` complete; :func:`checkpoint_dir` finds whichever survived.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdctl.errors import KdctlError
from kdctl.io import first_line, write_error

TRAINER_STATE = "trainer.pt"


_TEMP = re.compile(r"^(?P<name>.+)\.tmp-?(?P<pid>\d+)(\.png)?$")
"""Temp names of the atomic writes: ``NAME.tmp-PID`` folders (checkpoints), ``.NAME.tmpPID`` files (JSON, TOML)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def clean_stale_temps(run: Path) -> list[Path]:
    """Remove the ``NAME.tmp-PID`` checkpoint folders a killed process left in ``run`` (its PID is gone, or it is
    this process). Returns what was removed."""
    removed = []
    for folder in (Path(run), Path(run) / "eval"):
        for p in folder.glob("*.tmp*") if folder.is_dir() else []:
            m = _TEMP.match(p.name)
            if m and (int(m["pid"]) == os.getpid() or not pid_alive(int(m["pid"]))):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(directory: Path, student, trainer_state: dict[str, Any] | None) -> Path:
    """Write ``directory`` atomically: the student model dir plus, if given, ``trainer.pt``.

    A failed write (disk full, read-only folder) removes its temp folder, leaves the previous checkpoint as it
    was and raises one KdctlError line naming the path and the cause.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f"{directory.name}.old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        student.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the previous checkpoint {directory} is intact" if directory.exists() else ""
        raise KdctlError(f"{write_error(tmp, e)}{kept}") from e
    except RuntimeError as e:  # torch.save reports a full disk as RuntimeError (file write failed)
        shutil.rmtree(tmp, ignore_errors=True)
        if "write" not in str(e).lower():
            raise
        kept = f"; the previous checkpoint {directory} is intact" if directory.exists() else ""
        raise KdctlError(f"cannot write {tmp / TRAINER_STATE}: {first_line(e)}{kept}") from e
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def checkpoint_dir(run: Path, name: str = "last") -> Path | None:
    """The complete checkpoint ``run/name`` (or its ``.old`` copy after a kill mid-write), or None."""
    for cand in (run / name, run / f"{name}.old"):
        if cand.is_dir() and any(cand.iterdir()):
            return cand
    return None


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise KdctlError(f"{directory}: no {TRAINER_STATE} (not a resumable checkpoint)") from e
    except Exception as e:
        raise KdctlError(f"{path}: corrupt trainer state ({first_line(e)})") \
            from e
