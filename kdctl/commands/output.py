"""The console, warnings and the metric tables every command prints with."""

from __future__ import annotations

from kdctl.engine.progress import new_console, percent


def console():
    """The console commands print to (no wrapping when the output is not a terminal)."""
    return new_console()


def warn(msg: str) -> None:
    """One ``warning:`` line on stderr."""
    new_console(stderr=True).print(f"[yellow]warning:[/] {msg}")


def metrics_table(title: str, metrics: dict[str, float]):
    from rich.table import Table

    t = Table(title=title)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    for k in keys:
        t.add_column(k, justify="right")
    t.add_row(*[percent(metrics[k]) for k in keys])
    return t


def per_class_table(per_class: dict[str, float]):
    from rich.table import Table

    t = Table(title="AP per class (IoU 0.50:0.95)")
    t.add_column("class")
    t.add_column("AP", justify="right")
    for name, ap in per_class.items():
        t.add_row(name, percent(ap))
    return t
