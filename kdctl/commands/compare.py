"""``kdctl distill --baseline [--seeds N]``: the runs of :mod:`kdctl.engine.compare` and the one table of the gain."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdctl.commands.output import console

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.engine.config import RunConfig

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def distill_with_baseline(cfg: RunConfig, seeds: int = 1) -> dict[str, Any]:
    """Distil, train the baseline (per seed), evaluate the teacher, print the comparison table and the paths."""
    from kdctl.engine.compare import run_with_baseline

    con = console()
    comp = run_with_baseline(cfg, seeds=seeds, on_stage=None if cfg.quiet else con.rule)
    if comp:
        print_comparison(comp)
    return comp


def print_comparison(comp: dict[str, Any], title: str | None = None) -> None:
    """The comparison table, then where the runs and ``comparison.json`` are."""
    con = console()
    con.print(comparison_table(comp, title))
    first = comp["runs"][0]
    con.print(f"distilled: {first['distilled']['run']}\nbaseline: {first['baseline']['run']}\n"
              f"comparison: {comp['path']}", soft_wrap=True)


def points(v: float | None, signed: bool = False) -> str:
    """A metric or gain (a fraction) in AP points with one decimal; "n/a" when undefined."""
    if v is None or (not signed and v < 0):
        return "n/a"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def comparison_table(comp: dict[str, Any], title: str | None = None):
    """One rich table: teacher, the student without KD (baseline), the distilled student, the gain (and with
    several seeds its 95 % confidence interval and the per-seed gains); the cost in time and peak memory."""
    from rich.table import Table

    n = len(comp["runs"])
    mean = f" (mean of {n} seeds)" if n > 1 else ""
    t = Table(title=title or f"KD gain on the {comp['split']} split ({comp['images']} images, imgsz "
                             f"{comp['imgsz']}, {comp['steps']} steps, {comp['device']}){mean}")
    t.add_column("model")
    for col in (*COLUMNS, "train time", "s/step", "peak memory"):
        t.add_column(col, justify="right")
    teacher = comp.get("teacher") or {}
    if teacher:
        t.add_row("teacher", *(points(teacher["metrics"][k]) for k in COLUMNS), "-", "-", "-")
    for side, label in (("baseline", "student, baseline (no KD)"), ("distilled", f"student + {comp['method']}")):
        cost = comp[f"{side}_cost"]
        t.add_row(label, *(points(comp[side][k]) for k in COLUMNS), f"{cost['seconds']:.1f}s",
                  f"{cost['step_time']:.3f}", f"{cost['peak_memory_mb']:.0f} MB")
    c = comp["cost"]
    t.add_row("gain (KD - baseline)", *(points(comp["gain"][k], signed=True) for k in COLUMNS), ratio(c["time_ratio"]),
              ratio(c["step_time_ratio"]), f"{c['extra_memory_mb']:+.0f} MB", style="bold")
    if n > 1:
        t.add_row("gain 95% CI (paired t)", *(ci_cell(comp["ci95"][k]) for k in COLUMNS), "", "", "")
        for r in comp["runs"]:
            d, b = r["distilled"], r["baseline"]
            t.add_row(f"  gain, seed {r['seed']}", *(points(r["gain"][k], signed=True) for k in COLUMNS),
                      ratio(d["seconds"] / b["seconds"] if b["seconds"] else None),
                      ratio(d["step_time"] / b["step_time"] if b["step_time"] else None),
                      f"{d['peak_memory_mb'] - b['peak_memory_mb']:+.0f} MB")
    return t


def ratio(r: float | None) -> str:
    """A cost ratio (distilled / baseline) as ``x1.52``; "-" when unknown."""
    return f"x{r:.2f}" if r else "-"


def ci_cell(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{points(ci[0], True)}, {points(ci[1], True)}]"
