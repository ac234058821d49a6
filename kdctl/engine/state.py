"""Where a run is (:class:`Position`) and what it gave (:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def resolved_summary(t: Any, names: list[str]) -> dict[str, Any]:
    """What a set-up :class:`~kdctl.engine.trainer.Trainer` resolved, beside the options, for ``config.toml``."""
    from kdctl.engine.precision import dtype_name

    return {
        "method": t.method, "lr": t.lr, "device": t.device, "world_size": t.dist.world,
        "amp": dtype_name(t.amp, "off"), "teacher_amp": dtype_name(t.teacher_amp, "off"),
        "channels_last": t.channels_last, "total_steps": t.total_steps,
        "steps_per_epoch": t.steps_per_epoch, "save_every_steps": t.save_every,
        "student": t.student.architecture, "teacher": t.teacher.architecture if t.teacher else "",
        "classes": list(names), "trainable": t.trainable,
        "kd": t.distiller.kd_tables() if t.distiller is not None else {},
    }
