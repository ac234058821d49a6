"""Where a run is (:class:`Position`) and what it gave (:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.engine.config import RunConfig


@dataclass
class Position:
    """Where the loop is: optimiser steps done, epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_ap: float = -1.0
    steps: int = 0
    seconds: float = 0.0
    step_time: float = 0.0
    peak_memory_mb: float = 0.0
    interrupted: bool = False
    method: str = "none"
    config: RunConfig | None = None  # the run's resolved configuration (the caller's RunConfig is not changed)
