"""One process per run directory: a lock file that a second ``--resume`` of the same run is refused by.

The lock is an advisory ``flock`` on ``RUN/.kdctl.lock`` holding the owner's PID. The kernel releases it when the
owner exits in any way (kill -9 included), so a stale lock never blocks a later resume.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdctl.errors import KdctlError

LOCK_FILE = ".kdctl.lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run for this process; a second holder gets one KdctlError line."""

    def __init__(self, run: Path) -> None:
        self.path = Path(run) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, the run is not guarded
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise KdctlError(f"cannot write {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise KdctlError(f"{self.path.parent} is in use by process {owner} (another kdctl run or resume); "
                             "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
