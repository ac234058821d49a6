"""Progress reporting with rich: a per-epoch bar on a terminal, plain log lines otherwise, nothing with --quiet.

Also the metrics log (``metrics.jsonl``) and the PNG plot of losses and AP over training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.engine.state import RunResult
    from kdctl.engine.trackers import Trackers


def percent(value: float) -> str:
    """A COCO metric (a fraction, -1 when undefined: no ground truth) as points with one decimal, or "n/a"."""
    return f"{100 * value:.1f}" if value >= 0 else "n/a"


def new_console(stderr: bool = False) -> Console:
    """A rich console that wraps nothing when its output is not a terminal (a pipe or a log file keeps whole
    lines and whole paths; tables take the width they need)."""
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        c = Console(stderr=stderr, highlight=False, soft_wrap=True, width=max(c.width, 200))
    return c


def fmt_terms(terms: dict[str, float], limit: int = 8) -> str:
    items = list(terms.items())[:limit]
    return " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in items)


class Reporter:
    """Prints progress on rank 0. ``enabled`` False (other ranks, --quiet) prints nothing but errors."""

    def __init__(self, enabled: bool = True, console: Console | None = None, rank0: bool = True) -> None:
        self.enabled = enabled
        self.rank0 = rank0
        self.console = console or new_console()
        self.live = self.enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def print(self, *args: Any, **kw: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kw)

    def warn(self, msg: str) -> None:
        """One ``warning:`` line on stderr (on rank 0; also with --quiet, as errors are)."""
        if self.rank0:
            new_console(stderr=True).print(f"[yellow]warning:[/] {msg}")

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        if not self.live:
            return
        self.end_epoch()
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, speed="", info="")

    def update(self, done: int, total: int, epoch: int, epochs: int, step: int, speed: float,
               terms: dict[str, float], extra: str = "") -> None:
        if not self.enabled:
            return
        info = fmt_terms(terms) + (f" {extra}" if extra else "")
        if self.live and self._progress is not None:
            self._progress.update(self._task, completed=done, speed=f"{speed:.2f} it/s", info=info)
        else:  # plain lines (stdout is not a terminal); the trainer calls this every --log-every steps
            eta = (total - done) / speed if speed > 0 else 0
            self.console.print(
                f"epoch {epoch + 1}/{epochs} batch {done}/{total} step {step} {speed:.2f} it/s "
                f"ETA {eta:.0f}s {info}", soft_wrap=True,
            )

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        t = Table(title=title, show_header=False)
        t.add_column(style="bold")
        t.add_column()
        for k, v in rows:
            t.add_row(k, v)
        self.console.print(t)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logging step and per evaluation, each row also handed to
    the run's experiment trackers (:class:`kdctl.engine.trackers.Trackers`, ``--report-to``)."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Trackers | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers if trackers is not None and enabled else None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.trackers:
            self.trackers.log_row(row)

    def log_images(self, images: dict[str, Any] | Callable[[], dict[str, Any]], step: int) -> None:
        """Images (HWC uint8 by tag, or a function making them) for the trackers; nothing without trackers."""
        if self.trackers:
            self.trackers.log_images(images, step)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot(metrics: MetricsLog, out: Path) -> Path | None:
    """Losses (left) and AP (right) against the optimiser step, as a PNG."""
    rows = metrics.rows()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    meta = {"type", "step", "epoch", "lr", "time_per_step", "gpu_mem_gb"}
    keys = [k for k in (train[-1] if train else {}) if k not in meta and isinstance(train[-1][k], (int, float))]
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
        if pts:
            a.plot(*zip(*pts, strict=True), label=k, lw=1.2 if k == "loss" else 0.8,
                   marker="o" if len(pts) == 1 else None)
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log" if all(r.get("loss", 1) > 0 for r in train) else "linear")
    if keys:
        a.legend(fontsize=7)
    a.set_title("training losses")
    for k in ("AP", "AP50", "AP75"):
        pts = [(r["step"], 100 * r[k]) for r in evals if isinstance(r.get(k), (int, float)) and r[k] >= 0]
        if pts:
            b.plot(*zip(*pts, strict=True), marker="o", label=k)
    b.set_ylim(bottom=0, top=max(5.0, min(100.0, 1.1 * max((100 * r.get("AP50", 0) for r in evals), default=0))))
    b.set_xlabel("step")
    b.set_ylabel("AP (%)")
    b.set_title("validation")
    if evals:
        b.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out


def final_rows(r: RunResult, best_ap: float, device: str) -> list[tuple[str, str]]:
    """The rows of a run's final table: run, method, steps, time, memory, AP and the paths that exist."""
    m = r.metrics
    rows = [("run", str(r.run_dir)), ("method", r.method), ("steps", str(r.steps)),
            ("time", f"{r.seconds:.1f}s ({r.step_time:.3f}s/step median)"),
            ("peak memory", f"{r.peak_memory_mb:.0f} MB ({'GPU' if device.startswith('cuda') else 'RSS'})")]
    if m:
        rows += [("AP / AP50 / AP75", f"{percent(m['AP'])} / {percent(m['AP50'])} / {percent(m['AP75'])}"),
                 ("best AP", percent(best_ap))]
    weights = [str(d) for d in (r.run_dir / "best", r.run_dir / "last") if d.is_dir()]
    rows += [(what, ", ".join(paths)) for what, paths in (
        ("weights", weights), ("metrics", [str(r.run_dir / "metrics.jsonl")]),
        ("plot", [str(r.run_dir / "results.png")])) if paths and all(Path(x).exists() for x in paths)]
    return rows
