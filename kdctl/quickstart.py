"""``kdctl quickstart``: the whole job on an embedded synthetic dataset, with no download.

1. writes a synthetic COCO dataset (:mod:`kdctl.data.synth`);
2. trains a teacher (a larger detector, a longer schedule);
3. trains a smaller student without KD (the baseline);
4. distils the same student, same recipe and steps, with the method ``--method auto`` picks;
5. evaluates the three on the validation split and prints one table.

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
    ``device``, ``seconds``, ``data`` and one row per model (``model``, ``spec``, ``method``, ``seconds``,
    ``run``, ``AP``, ``AP50``, ``AP75``). ``on_stage(title)`` is called as each stage starts."""
    from kdctl.data.synth import synthesize
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
    t_all = time.perf_counter()
    summary: dict[str, Any] = {"device": dev, "data": str(data), "imgsz": plan.imgsz, "rows": []}
    teacher_dir = None
    stages = [("teacher", plan.teacher, "train", plan.teacher_epochs, "teacher"),
              ("student", plan.student, "train", plan.student_epochs, "student"),
              ("student+KD", plan.student, "distill", plan.student_epochs, "student-kd")]
    for label, spec, task, epochs, name in stages:
        if on_stage is not None:
            on_stage(f"{label}: {spec}" + (f" <- {plan.teacher}" if task == "distill" else ""))
        cfg = RunConfig(task=task, model=spec, epochs=epochs, name=name,
                        teacher=teacher_dir if task == "distill" else None,
                        method="auto", **common)
        t0 = time.perf_counter()
        r = train(cfg)
        teacher_dir = teacher_dir or str(r.run_dir)
        summary["rows"].append({"model": label, "spec": spec, "method": r.method if task == "distill" else "-",
                                "seconds": round(time.perf_counter() - t0, 1), "run": str(r.run_dir),
                                **{k: r.metrics[k] for k in ("AP", "AP50", "AP75")}})
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(out / "quickstart.json", summary)
    return summary
