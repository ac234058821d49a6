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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError


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


def quickstart(output: str | Path = "runs/quickstart", device: str = "auto", plan: QuickstartPlan | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Run the pipeline into ``output`` and return the table rows (also written to ``output/quickstart.json``)."""
    from rich.table import Table

    from kdctl.commands import _write_json
    from kdctl.data.synth import synthesize
    from kdctl.engine.config import RunConfig
    from kdctl.engine.rundir import resolve_device
    from kdctl.engine.trainer import train

    plan = plan or QuickstartPlan()
    out = Path(output).expanduser()
    from kdctl.engine.progress import new_console

    con = new_console()
    dev = resolve_device(device)
    data = out / "data"
    if not (data / "train.json").exists():
        synthesize(data, plan.images, seed=plan.seed, size=plan.image_size)
    elif not (data / "val.json").exists():
        raise KdctlError(f"{data} holds a partial dataset; remove it or pass another --output")
    con.print(f"[bold]kdctl quickstart[/]: synthetic dataset in {data}, device {dev}, imgsz {plan.imgsz}")
    common = dict(data=str(data), device=dev, imgsz=plan.imgsz, batch_size=plan.batch_size, seed=plan.seed,
                  output=str(out), pretrained_backbone=False, quiet=quiet, workers=1, log_every=20)
    t_all = time.perf_counter()
    stages = [
        ("teacher", RunConfig(task="train", model=plan.teacher, epochs=plan.teacher_epochs, name="teacher", **common)),
        ("student", RunConfig(task="train", model=plan.student, epochs=plan.student_epochs, name="student", **common)),
    ]
    rows = []
    results = {}
    for label, cfg in stages:
        con.rule(f"{label}: {cfg.model}")
        t0 = time.perf_counter()
        results[label] = train(cfg)
        rows.append((label, cfg.model, "-", results[label], time.perf_counter() - t0))
    teacher_dir = str(results["teacher"].run_dir)
    kd_cfg = RunConfig(task="distill", teacher=teacher_dir, model=plan.student, method="auto",
                       epochs=plan.student_epochs, name="student-kd", **common)
    con.rule(f"student + KD: {plan.student} <- {plan.teacher}")
    t0 = time.perf_counter()
    results["student+KD"] = train(kd_cfg)
    rows.append(("student+KD", plan.student, results["student+KD"].method, results["student+KD"],
                 time.perf_counter() - t0))
    total = time.perf_counter() - t_all

    t = Table(title=f"kdctl quickstart ({dev}, {total:.0f}s)")
    for col in ("model", "spec", "KD", "AP", "AP50", "AP75", "time"):
        t.add_column(col, justify="right" if col in {"AP", "AP50", "AP75", "time"} else "left")
    summary: dict[str, Any] = {"device": dev, "seconds": round(total, 1), "rows": []}
    for label, spec, method, r, secs in rows:
        m = r.metrics
        t.add_row(label, spec, method, f"{100 * m['AP']:.1f}", f"{100 * m['AP50']:.1f}", f"{100 * m['AP75']:.1f}",
                  f"{secs:.0f}s")
        summary["rows"].append({"model": label, "spec": spec, "method": method, "seconds": round(secs, 1),
                                "run": str(r.run_dir), **{k: m[k] for k in ("AP", "AP50", "AP75")}})
    con.print(t)
    for label, _, _, r, _ in rows:
        con.print(f"{label}: {r.run_dir}", soft_wrap=True)
    gain = 100 * (results["student+KD"].metrics["AP"] - results["student"].metrics["AP"])
    con.print(f"KD gain: {gain:+.1f} AP. Next: kdctl eval --model {results['student+KD'].run_dir} --data {data}",
              soft_wrap=True)
    _write_json(out / "quickstart.json", summary)
    return summary
