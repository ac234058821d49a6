"""The gain of a distillation, measured in one go (``kdctl distill --baseline [--seeds N]``, ``kdctl quickstart``).

Per seed: the distillation run, then the same student trained without KD, its *baseline*, from the
distillation's resolved configuration (:func:`baseline_config`: the same student set-up and so the same init, the
same data order, recipe, schedule and steps), into ``RUN/baseline/`` (other seeds: ``RUN/seedS/`` and
``RUN/seedS/baseline/``). Then the teacher is evaluated on the same validation split at the same image size, and
``RUN/comparison.json`` records, per seed and as means, the COCO metrics of the three, the gain
``distilled - baseline`` per metric, its paired 95 % confidence interval over seeds (t distribution, n - 1 degrees
of freedom) and the cost: training time and peak memory of both runs.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdctl.io import write_json

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.engine.config import RunConfig
    from kdctl.engine.state import RunResult

GAIN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The metrics whose gain is reported."""
COMPARISON = "comparison.json"
"""The file in the (first) distillation run directory."""


def baseline_config(distilled: RunConfig) -> RunConfig:
    """The baseline of a distillation from its *resolved* configuration (``RunResult.config``): task ``train``, no
    teacher, everything else kept (seed, data, recipe, optimiser, schedule, image and batch size, EMA,
    augmentation, and ``student_setup``, so the student starts from exactly the distilled student's init)."""
    b = copy.deepcopy(distilled)
    b.task, b.teacher, b.method, b.teacher_amp, b.kd, b.name = "train", None, "auto", "auto", {}, None
    return b


def paired_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of paired differences: mean -/+ t(0.5 + level / 2, n - 1) *
    sd / sqrt(n). None for fewer than 2 values."""
    n = len(diffs)
    if n < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(diffs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return (mean - half, mean + half)


def gains(distilled: dict[str, float], baseline: dict[str, float]) -> dict[str, float | None]:
    """``distilled - baseline`` per :data:`GAIN_METRICS` (fractions); None where either is undefined (-1)."""
    return {k: (distilled[k] - baseline[k] if distilled.get(k, -1) >= 0 and baseline.get(k, -1) >= 0 else None)
            for k in GAIN_METRICS}


def run_record(r: RunResult) -> dict[str, Any]:
    """What the comparison keeps of a run: its directory, final metrics, steps, time and peak memory."""
    return {"run": str(r.run_dir), "metrics": {k: r.metrics.get(k, -1.0) for k in GAIN_METRICS},
            "steps": r.steps, "seconds": round(r.seconds, 2), "step_time": round(r.step_time, 4),
            "peak_memory_mb": round(r.peak_memory_mb, 1)}


def summarise(runs: list[dict[str, Any]], teacher: dict[str, Any] | None, info: dict[str, Any]) -> dict[str, Any]:
    """The comparison: ``info`` (method, models, split, device), the teacher's evaluation, the per-seed ``runs``
    (each ``{seed, distilled, baseline, gain}``), means of both runs' metrics and costs, the mean gain and its
    paired 95 % confidence interval per metric (None with one seed, or where a metric is undefined)."""
    def mean(values: list[float | None]) -> float | None:
        return statistics.fmean(values) if values and all(v is not None for v in values) else None

    out: dict[str, Any] = {**info, "seeds": [r["seed"] for r in runs], "teacher": teacher, "runs": runs}
    for side in ("distilled", "baseline"):
        out[side] = {k: mean([r[side]["metrics"][k] if r[side]["metrics"][k] >= 0 else None for r in runs])
                     for k in GAIN_METRICS}
        out[f"{side}_cost"] = {c: mean([r[side][c] for r in runs]) for c in ("seconds", "step_time", "peak_memory_mb")}
    out["gain"] = {k: mean([r["gain"][k] for r in runs]) for k in GAIN_METRICS}
    out["ci95"] = {}
    for k in GAIN_METRICS:
        diffs = [r["gain"][k] for r in runs]
        ci = paired_ci(diffs) if all(d is not None for d in diffs) else None
        out["ci95"][k] = list(ci) if ci is not None else None
    b, d = out["baseline_cost"], out["distilled_cost"]
    out["cost"] = {"time_ratio": d["seconds"] / b["seconds"] if b["seconds"] else None,
                   "step_time_ratio": d["step_time"] / b["step_time"] if b["step_time"] else None,
                   "extra_memory_mb": d["peak_memory_mb"] - b["peak_memory_mb"]}
    return out


def evaluate_teacher(cfg: RunConfig, device: str) -> dict[str, Any]:
    """The teacher of a resolved distillation config on its validation split, at its image and batch size (the
    pixels the students were evaluated on), in float32: metrics, seconds, peak memory."""
    from kdctl.engine.build import build_teacher, open_data
    from kdctl.engine.evaluate import evaluate_detector
    from kdctl.engine.precision import peak_memory_mb, prepare_device, to_channels_last, use_channels_last
    from kdctl.specs import resolve

    prepare_device(device)
    data = open_data(cfg, lambda msg: None)
    teacher = build_teacher(cfg, resolve(cfg.teacher), data, device)
    if use_channels_last(cfg.channels_last):
        to_channels_last(teacher)
    res = evaluate_detector(teacher, data.val, imgsz=cfg.imgsz, batch_size=cfg.batch_size or 8, device=device,
                            workers=min(cfg.workers, 2))
    return {"spec": str(cfg.teacher), "metrics": {k: res.metrics[k] for k in GAIN_METRICS},
            "seconds": round(res.seconds, 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "images": res.num_images}


def run_with_baseline(cfg: RunConfig, seeds: int = 1, on_stage: Callable[[str], None] | None = None,
                      **train_kw: Any) -> dict[str, Any]:
    """Distil, train the baseline, per seed (``cfg.seed``, ``cfg.seed + 1``, ...), evaluate the teacher; write and
    return the comparison (:func:`summarise`, plus ``path``). ``on_stage(title)`` is called as each stage starts;
    ``train_kw`` go to :func:`kdctl.engine.trainer.train`. Under torchrun every rank trains; rank 0 evaluates the
    teacher and writes ``comparison.json`` (the other ranks return ``{}``)."""
    from kdctl.engine.rundir import resolve_device
    from kdctl.engine.trainer import train

    say = on_stage or (lambda title: None)
    runs: list[dict[str, Any]] = []
    first: Path | None = None
    kd = None
    for seed in range(cfg.seed, cfg.seed + seeds):
        c = copy.deepcopy(cfg)
        c.seed = seed
        say(f"distil {cfg.model} <- {cfg.teacher} (seed {seed})")
        kd = train(c, run_dir=None if first is None else first / f"seed{seed}", **train_kw)
        first = first or kd.run_dir
        say(f"baseline: the same student without KD (seed {seed})")
        base = train(baseline_config(kd.config), run_dir=kd.run_dir / "baseline", **train_kw)
        d, b = run_record(kd), run_record(base)
        runs.append({"seed": seed, "distilled": d, "baseline": b, "gain": gains(d["metrics"], b["metrics"])})
    if int(os.environ.get("RANK", "0")) != 0 or kd is None or first is None:
        return {}
    say(f"teacher: {cfg.teacher} on the same split")
    device = resolve_device(kd.config.device)
    teacher = evaluate_teacher(kd.config, device)
    info = {"method": kd.method, "student": str(cfg.model), "split": "val", "images": teacher["images"],
            "device": device, "imgsz": kd.config.imgsz, "steps": kd.steps}
    comp = summarise(runs, teacher, info)
    write_json(first / COMPARISON, comp)
    return {**comp, "path": str(first / COMPARISON)}
