"""``kdctl predict``: detections drawn and written for images, folders, globs and videos, with a count table."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from kdctl.commands.output import console
from kdctl.errors import KdctlError

MAX_ROWS = 40  # rows of the per-image table; the rest is summed in one line


def predict_command(model: str, sources: list[str], *, conf: float = 0.25, iou: float | None = None,
                    max_det: int = 100, imgsz: int | None = None, classes: str | None = None, device: str = "auto",
                    batch_size: int = 4, save: bool = True, save_txt: bool = False, save_conf: bool = False,
                    vid_stride: int = 1, output: Path = Path("runs"), name: str | None = None,
                    save_dir: Path | None = None, trust_remote_code: bool = False, quiet: bool = False) -> Any:
    """Check the sources, load the model, make the run folder (auto-numbered ``OUTPUT/predict/NAME``, or exactly
    ``--save-dir``), predict with a progress bar, print the count table. A failure removes the folder it made."""
    from kdctl.predict.sources import collect_sources

    collect_sources(sources)  # a missing or empty SOURCE is one line, before the model loads
    class_list = [c for c in (classes or "").split(",") if c.strip()] or None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kdctl.engine.rundir import new_run_dir
    from kdctl.predict.engine import resolve_classes
    from kdctl.predict.load import load_predictor

    det = load_predictor(model, device=device, trust_remote_code=trust_remote_code)
    resolve_classes(class_list, list(det.label_names))  # an unknown --classes value: one line, nothing written
    run = _save_dir(save_dir) if save_dir is not None else new_run_dir(output, "predict", name)
    c = console()
    try:
        with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=c,
                      transient=True, disable=quiet or not c.is_terminal) as prog:
            task = prog.add_task("predict", total=None)
            res = det.predict_paths(
                sources, conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, classes=class_list,
                batch_size=batch_size, save_dir=run, save=save, save_txt=save_txt, save_conf=save_conf,
                vid_stride=vid_stride, progress=lambda done, total: prog.update(task, completed=done, total=total))
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)
        raise
    if not quiet:
        c.print(counts_table(res), soft_wrap=True)
    n = len(res.images)
    found = sum(len(r.labels) for r in res.images)
    where = getattr(det, "provider", None) or str(next(det.parameters()).device)
    c.print(f"{n} picture(s), {found} detection(s) in {res.seconds:.1f}s ({n / max(res.seconds, 1e-9):.1f}/s, "
            f"{where}); results: {run / 'predictions.json'}" + (f", drawn: {run}" if save else ""), soft_wrap=True)
    return res


def _save_dir(path: Path) -> Path:
    """``--save-dir``: used as it is, created if needed; one that holds files is refused (nothing is overwritten)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KdctlError(f"--save-dir {path} exists and is not an empty folder; nothing is overwritten: pass a new "
                         "folder, or --output DIR for auto-numbered runs (DIR/predict/exp, exp2, ...)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdctlError(f"--save-dir {path}: cannot create it ({e.strerror or e})") from e
    return path


def counts_table(res: Any):
    """One row per image (per video: its frames summed): detections and the count per class."""
    from rich.table import Table

    rows: dict[tuple[str, bool], tuple[int, Counter[str]]] = {}
    for r in res.images:
        key = (str(r.path), r.frame is not None)
        frames, counts = rows.get(key, (0, Counter()))
        rows[key] = (frames + 1, counts + r.counts() if r.labels else counts)
    t = Table(title="detections per image")
    for col in ("image", "frames", "detections", "per class"):
        t.add_column(col, justify="right" if col in ("frames", "detections") else "left")
    items = list(rows.items())
    for (path, video), (frames, counts) in items[:MAX_ROWS]:
        per = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"
        t.add_row(Path(path).name, str(frames) if video else "", str(sum(counts.values())), per)
    if len(items) > MAX_ROWS:
        rest = sum((c for _, (_, c) in items[MAX_ROWS:]), Counter())
        t.add_row(f"... {len(items) - MAX_ROWS} more", "", str(sum(rest.values())), "")
    total = sum((c for _, (_, c) in items), Counter())
    t.add_row("all", str(len(res.images)), str(sum(total.values())),
              ", ".join(f"{k} {v}" for k, v in sorted(total.items(), key=lambda kv: -kv[1])) or "-")
    return t
