"""What each CLI command does, as plain functions (the Typer layer only parses options).

These functions print with rich and write files; the computations live in the library modules they call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError


def console():
    from kdctl.engine.progress import new_console

    return new_console()


def warn(msg: str) -> None:
    from kdctl.engine.progress import new_console

    new_console(stderr=True).print(f"[yellow]warning:[/] {msg}")


# --------------------------------------------------------------------------- inspect
def inspect_model(spec: str, *, as_json: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    from kdctl.specs import load_detector, resolve

    r = resolve(spec)
    # a preset has no label space of its own: build it with one placeholder class to show its architecture
    placeholder = ["object"] if r.kind == "preset" else None
    det = load_detector(r, label_names=placeholder, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    info = det.info()
    if placeholder:
        info.update(num_labels=None, label_names=[], labels="taken from the data or teacher",
                    parameters_note="counted with a 1-class head")
    if as_json:
        print(json.dumps(info, indent=2))
        return info
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    names = info["label_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    labels = info.get("labels") or f"{info['num_labels']}: {shown}"
    size = f"{info['parameters'] / 1e6:.2f} M ({info['parameters']:,})"
    if info.get("parameters_note"):
        size += f", {info['parameters_note']}"
    rows = [
        ("spec", info["source"]),
        ("family", f"{info['family']} ({'CNN detector' if info['family'] == 'cnn' else 'DETR family'})"),
        ("architecture", info["architecture"]),
        ("class", info["class"]),
        ("parameters", size),
        ("labels", labels),
        ("input size", f"longer side {info['imgsz']} px"),
        ("KD methods", ", ".join(info["kd_methods"]) or "none"),
    ]
    for k, v in info.items():
        if k not in {"source", "family", "architecture", "class", "parameters", "num_labels", "label_names",
                     "imgsz", "kd_methods", "labels", "parameters_note"}:
            rows.append((k.replace("_", " "), str(v)))
    for k, v in rows:
        t.add_row(k, v)
    console().print(t)
    return info


# --------------------------------------------------------------------------- data
def split_options(command: str, split: str) -> dict[str, str]:
    """The options of ``command`` that give the files of ``split`` (the hints of data errors name them)."""
    if command == "data check":  # a dataset folder only
        return {}
    ann = "--val-ann" if command == "eval" else {"train": "--train-ann", "val": "--val-ann"}.get(split)
    return {"data": "--data", "images": "--images"} | ({"ann": ann} if ann else {})


def open_split(data: Path | str | None, split: str, *, ann: Path | None = None, images: Path | None = None,
               command: str = "train", deep: bool = False):
    """Locate, read and validate one split; warnings are printed, fatal problems raise KdctlError.

    ``command`` (train, distill, eval or data check) is the one whose options the hints name; ``deep`` decodes
    every image (the default reads each file's header and end).
    """
    from kdctl.data.coco import find_split, load_coco

    ann_p, img_p = find_split(data, split, ann=ann, images=images, options=split_options(command, split))
    cd = load_coco(ann_p, img_p, deep=deep)
    for w in cd.warnings:
        warn(w)
    return cd


def synth_data(out: Path, *, images: int, seed: int) -> dict[str, int]:
    from kdctl.data.synth import synthesize

    try:
        counts = synthesize(out, images, seed=seed)
    except OSError as e:  # read-only folder, a file in the way, disk full
        raise KdctlError(f"cannot write {e.filename or out}: {e.strerror or e.__class__.__name__}") from e
    console().print(f"wrote {sum(counts.values())} images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return counts


def check_data(data: Path, *, split: str | None = None, deep: bool = False) -> None:
    """``kdctl data check``: validate every split present (or ``split``), opening every image file."""
    from rich.table import Table

    from kdctl.data.coco import LAYOUT, SPLITS, annotation_candidates

    root = Path(data).expanduser()
    if not root.is_dir():
        raise KdctlError(f"dataset folder {root} does not exist or is not a folder")
    splits = [split] if split else [s for s in SPLITS if any(c.is_file() for c in annotation_candidates(root, s))]
    if not splits:
        raise KdctlError(f"{root}: no annotation file found; expected {LAYOUT.format(split='SPLIT')} "
                         f"(SPLIT: {', '.join(SPLITS)})")
    t = Table(title=f"{data}" + (" (every image decoded)" if deep else ""))
    for col in ("split", "images", "boxes", "classes", "warnings"):
        t.add_column(col)
    for s in splits:
        cd = open_split(data, s, command="data check", deep=deep)
        t.add_row(s, str(len(cd.images)), str(len(cd.coco["annotations"])), str(cd.num_classes), str(len(cd.warnings)))
    console().print(t)


# --------------------------------------------------------------------------- eval
def _metrics_table(title: str, metrics: dict[str, float]):
    from rich.table import Table

    t = Table(title=title)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    for k in keys:
        t.add_column(k, justify="right")
    t.add_row(*[(f"{100 * metrics[k]:.1f}" if metrics[k] >= 0 else "-") for k in keys])
    return t


def _per_class_table(per_class: dict[str, float]):
    from rich.table import Table

    t = Table(title="AP per class (IoU 0.50:0.95)")
    t.add_column("class")
    t.add_column("AP", justify="right")
    for name, ap in per_class.items():
        t.add_row(name, f"{100 * ap:.1f}" if ap >= 0 else "-")
    return t


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def eval_predictions(predictions: Path, annotations: Path, *, json_out: Path | None = None):
    from kdctl.engine.evaluate import evaluate_results_file

    res = evaluate_results_file(predictions, annotations)
    c = console()
    c.print(_metrics_table(f"{predictions.name} vs {annotations.name}", res.metrics))
    c.print(_per_class_table(res.per_class))
    if json_out is not None:
        _write_json(json_out, res.to_json())
        c.print(f"metrics: {json_out}")
    return res


def eval_model(
    spec: str,
    *,
    data: Path | None,
    split: str = "val",
    batch_size: int = 8,
    imgsz: int | None = None,
    device: str = "auto",
    workers: int = 2,
    json_out: Path | None = None,
    label_map: Path | None = None,
    ann: Path | None = None,
    images: Path | None = None,
    output: Path = Path("runs"),
    name: str | None = None,
    trust_remote_code: bool = False,
    channels_last: bool = True,
):
    """``kdctl eval --model``: validate data first, load the model, predict, score with pycocotools."""
    from kdctl.data.coco import load_label_map

    cd = open_split(data, split, ann=ann, images=images, command="eval")  # validate before loading anything heavy
    lm = load_label_map(label_map)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kdctl.engine.evaluate import evaluate_detector
    from kdctl.engine.rundir import new_run_dir, resolve_device
    from kdctl.engine.trainer import to_channels_last
    from kdctl.specs import load_detector

    dev = resolve_device(device)
    det = load_detector(spec, label_names=cd.names, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    det.set_classes(cd.names, lm)
    det.to(dev).eval()
    if channels_last:
        to_channels_last(det)
    c = console()
    results: list[dict] = []
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=c,
                  transient=True, disable=not c.is_terminal) as prog:
        task = prog.add_task("eval", total=len(cd.images))
        res = evaluate_detector(
            det, cd, imgsz=imgsz, batch_size=batch_size, device=dev, workers=workers, results_out=results,
            progress=lambda done, total: prog.update(task, completed=done),
        )
    res.extra = {"model": spec, "data": str(cd.ann_path), "split": split, "device": dev,
                 "imgsz": imgsz or det.imgsz, "batch_size": batch_size}
    run = new_run_dir(output, "eval", name)
    _write_json(run / "metrics.json", res.to_json())
    _write_json(run / "predictions.json", results)
    if json_out is not None:
        _write_json(json_out, res.to_json())
    c.print(_metrics_table(f"{spec} on {cd.ann_path.name} ({res.num_images} images)", res.metrics))
    c.print(_per_class_table(res.per_class))
    c.print(f"{res.images_per_second:.1f} images/s on {dev}; results: {run}/metrics.json, {run}/predictions.json"
            + (f", {json_out}" if json_out else ""))
    return res


# --------------------------------------------------------------------------- train / distill
CLI_TO_CONFIG = {"student": "model"}
EXPLICIT_FLAGS = {"channels_last"}  # --x/--no-x flags whose False was given (their default is None)


def run_training(task: str, opts: dict[str, Any]):
    """``kdctl train`` / ``kdctl distill``: options given on the command line win over a resumed config and the
    recipe. Ctrl-C saves the last checkpoint and prints the resume command (exit 130)."""
    import sys

    from kdctl.engine.config import RunConfig

    opts = dict(opts)
    resume = opts.pop("resume", None)
    no_pre = opts.pop("no_pretrained_backbone", False)
    given: dict[str, Any] = {}
    for k, v in opts.items():
        if v is None or (isinstance(v, bool) and not v and k not in EXPLICIT_FLAGS):
            continue
        key = CLI_TO_CONFIG.get(k, k)
        given[key] = str(v) if isinstance(v, Path) else v
    if no_pre:
        given["pretrained_backbone"] = False
    from kdctl.engine.trainer import train

    try:
        if resume is not None:
            return train(resume=resume, overrides=given)
        cfg = RunConfig(task=task, **given)
        if task == "distill" and cfg.teacher is None:
            raise KdctlError("distill needs --teacher SPEC and --student SPEC")
        return train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
