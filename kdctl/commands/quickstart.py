"""``kdctl quickstart``: the pipeline of :mod:`kdctl.quickstart`, with its stages and the table of the gain (the
table of ``kdctl distill --baseline``) printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.commands.output import console


def quickstart(output: str | Path = "runs/quickstart", device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Run :func:`kdctl.quickstart.run_quickstart`; print the teacher, baseline and distilled student's metrics,
    the gain and its cost, and where everything is."""
    from kdctl.commands.compare import points, print_comparison
    from kdctl.quickstart import QuickstartPlan, run_quickstart

    con = console()
    plan = QuickstartPlan()
    con.print(f"[bold]kdctl quickstart[/]: synthetic dataset in {Path(output).expanduser() / 'data'}, imgsz "
              f"{plan.imgsz}", soft_wrap=True)
    summary = run_quickstart(output, device=device, plan=plan, quiet=quiet, on_stage=con.rule)
    comp = summary["comparison"]
    print_comparison(comp, title=f"kdctl quickstart: {plan.teacher} -> {plan.student}, KD gain on the val split "
                                 f"({comp['images']} images, {summary['device']}, {summary['seconds']:.0f}s in all)")
    con.print(f"teacher: {summary['teacher_run']} (trained in {summary['teacher_seconds']:.0f}s)", soft_wrap=True)
    kd_run = comp["runs"][0]["distilled"]["run"]
    con.print(f"KD gain: {points(comp['gain']['AP'], signed=True)} AP. The same for your data: kdctl distill --teacher T "
              f"--student S --data DIR --baseline. Next: kdctl eval --model {kd_run} --data {summary['data']}",
              soft_wrap=True)
    return summary
