"""``kdctl train`` and ``kdctl distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError

CLI_TO_CONFIG = {"student": "model"}
EXPLICIT_FLAGS = {"channels_last"}  # --x/--no-x flags whose False was given (their default is None)


def run_training(task: str, opts: dict[str, Any]):
    """``kdctl train`` / ``kdctl distill``: options given on the command line win over a resumed config and the
    recipe. Ctrl-C saves the last checkpoint and prints the resume command (exit 130)."""
    import sys

    from kdctl.engine.config import RunConfig

    opts = dict(opts)
    resume = opts.pop("resume", None)
    no_pre = opts.pop("no_pretrained_backbone", False)
    baseline, seeds = opts.pop("baseline", False), opts.pop("seeds", 1)
    if seeds > 1 and not baseline:
        raise KdctlError(f"--seeds {seeds} repeats the --baseline comparison; add --baseline")
    if baseline and resume is not None:
        raise KdctlError("--baseline starts new runs; it cannot be combined with --resume")
    given: dict[str, Any] = {}
    for k, v in opts.items():
        if v is None or (isinstance(v, bool) and not v and k not in EXPLICIT_FLAGS):
            continue
        key = CLI_TO_CONFIG.get(k, k)
        given[key] = str(v) if isinstance(v, Path) else v
    if no_pre:
        given["pretrained_backbone"] = False
    from kdctl.engine.trainer import train

    try:
        if resume is not None:
            return train(resume=resume, overrides=given)
        cfg = RunConfig(task=task, **given)
        if task == "distill" and cfg.teacher is None:
            raise KdctlError("distill needs --teacher SPEC and --student SPEC")
        if baseline:
            from kdctl.commands.compare import distill_with_baseline

            return distill_with_baseline(cfg, seeds=seeds)
        return train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
