"""``kdctl quickstart``: the whole job on an embedded synthetic dataset, with no download.

1. writes a synthetic COCO dataset (:mod:`kdctl.data.synth`);
2. trains a teacher (a larger detector, a longer schedule);
3. distils a smaller student with the method ``--method auto`` picks and trains the same student without KD, same
   init, recipe and steps (its baseline), and evaluates the teacher on the same split: the path of
   ``kdctl distill --baseline`` (:func:`kdctl.engine.compare.run_with_baseline`), one table of the gain.

The defaults are sized for 2 CPU cores and under 10 minutes; on a GPU the same pipeline runs at a larger image size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError
from kdctl.io import write_json


@dataclass
class QuickstartPlan:
    """The models and budgets of a quickstart (CPU defaults)."""

    teacher: str = "fcos-mobilenet-v2"  # 3.8 M parameters
    student: str = "fcos-mobilenet-v2-0.5"  # 1.0 M parameters
    images: int = 400
    image_size: tuple[int, int] = (128, 192)  # shorter / longer side range of the synthetic images
    imgsz: int = 160
    batch_size: int = 8
    teacher_epochs: int = 12
    student_epochs: int = 8
    seed: int = 0


def run_quickstart(output: str | Path = "runs/quickstart", device: str = "auto", plan: QuickstartPlan | None = None,
                   quiet: bool = False, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the pipeline into ``output``; return the summary (also written to ``output/quickstart.json``):
    ``device``, ``seconds``, ``data``, the teacher's run and seconds, ``comparison`` (what
    :func:`kdctl.engine.compare.run_with_baseline` returns: the distillation with its baseline and the teacher
    evaluated on the same split) and one row per model (``model``, ``spec``, ``method``, ``seconds``, ``run``,
    ``AP``, ``AP50``, ``AP75``). ``on_stage(title)`` is called as each stage starts."""
    from kdctl.data.synth import synthesize
    from kdctl.engine.compare import run_with_baseline
    from kdctl.engine.config import RunConfig
    from kdctl.engine.rundir import resolve_device
    from kdctl.engine.trainer import train

    plan = plan or QuickstartPlan()
    out = Path(output).expanduser()
    dev = resolve_device(device)
    data = out / "data"
    if not (data / "train.json").exists():
        synthesize(data, plan.images, seed=plan.seed, size=plan.image_size)
    elif not (data / "val.json").exists():
        raise KdctlError(f"{data} holds a partial dataset; remove it or pass another --output")
    common = dict(data=str(data), device=dev, imgsz=plan.imgsz, batch_size=plan.batch_size, seed=plan.seed,
                  output=str(out), pretrained_backbone=False, quiet=quiet, workers=1, log_every=20)
    say = on_stage or (lambda title: None)
    t_all = time.perf_counter()
    say(f"teacher: {plan.teacher}")
    teacher = train(RunConfig(task="train", model=plan.teacher, epochs=plan.teacher_epochs, name="teacher", **common))
    kd_cfg = RunConfig(task="distill", model=plan.student, teacher=str(teacher.run_dir), method="auto",
                       epochs=plan.student_epochs, name="student-kd", **common)
    comp = run_with_baseline(kd_cfg, seeds=1, on_stage=say)
    first = comp["runs"][0]
    rows = [("teacher", plan.teacher, "-", teacher.seconds, str(teacher.run_dir), comp["teacher"]["metrics"]),
            ("student", plan.student, "-", first["baseline"]["seconds"], first["baseline"]["run"],
             first["baseline"]["metrics"]),
            ("student+KD", plan.student, comp["method"], first["distilled"]["seconds"], first["distilled"]["run"],
             first["distilled"]["metrics"])]
    summary: dict[str, Any] = {
        "device": dev, "data": str(data), "imgsz": plan.imgsz, "seconds": round(time.perf_counter() - t_all, 1),
        "teacher_run": str(teacher.run_dir), "teacher_seconds": round(teacher.seconds, 1), "comparison": comp,
        "rows": [{"model": m, "spec": spec, "method": method, "seconds": round(secs, 1), "run": run,
                  **{k: metrics[k] for k in ("AP", "AP50", "AP75")}} for m, spec, method, secs, run, metrics in rows]}
    write_json(out / "quickstart.json", summary)
    return summary
