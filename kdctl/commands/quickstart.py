"""``kdctl quickstart``: the pipeline of :mod:`kdctl.quickstart`, with its stages and one table printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.commands.output import console


def quickstart(output: str | Path = "runs/quickstart", device: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Run :func:`kdctl.quickstart.run_quickstart` and print the teacher, student and student + KD APs."""
    from rich.table import Table

    from kdctl.quickstart import QuickstartPlan, run_quickstart

    con = console()
    plan = QuickstartPlan()
    con.print(f"[bold]kdctl quickstart[/]: synthetic dataset in {Path(output).expanduser() / 'data'}, imgsz "
              f"{plan.imgsz}", soft_wrap=True)
    summary = run_quickstart(output, device=device, plan=plan, quiet=quiet, on_stage=con.rule)
    t = Table(title=f"kdctl quickstart ({summary['device']}, {summary['seconds']:.0f}s)")
    for col in ("model", "spec", "KD", "AP", "AP50", "AP75", "time"):
        t.add_column(col, justify="right" if col in {"AP", "AP50", "AP75", "time"} else "left")
    for row in summary["rows"]:
        t.add_row(row["model"], row["spec"], row["method"], *(f"{100 * row[k]:.1f}" for k in ("AP", "AP50", "AP75")),
                  f"{row['seconds']:.0f}s")
    con.print(t)
    for row in summary["rows"]:
        con.print(f"{row['model']}: {row['run']}", soft_wrap=True)
    ap = {row["model"]: row["AP"] for row in summary["rows"]}
    kd_run = summary["rows"][-1]["run"]
    con.print(f"KD gain: {100 * (ap['student+KD'] - ap['student']):+.1f} AP. Next: kdctl eval --model {kd_run} "
              f"--data {summary['data']}", soft_wrap=True)
    return summary
