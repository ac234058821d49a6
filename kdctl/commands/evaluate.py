"""``kdctl eval``: a model on a split, or an existing results file."""

from __future__ import annotations

from pathlib import Path

from kdctl.commands.data import open_split
from kdctl.commands.output import console, metrics_table, per_class_table
from kdctl.io import write_json


def eval_predictions(predictions: Path, annotations: Path, *, json_out: Path | None = None):
    from kdctl.engine.evaluate import evaluate_results_file

    res = evaluate_results_file(predictions, annotations)
    c = console()
    c.print(metrics_table(f"{predictions.name} vs {annotations.name}", res.metrics))
    c.print(per_class_table(res.per_class))
    if json_out is not None:
        write_json(json_out, res.to_json())
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
    format: str = "auto",
):
    """``kdctl eval --model``: validate data first, load the model, predict, score with pycocotools."""
    from kdctl.data.coco import load_label_map

    cd = open_split(data, split, ann=ann, images=images, command="eval", format=format)  # validate before loading anything heavy
    lm = load_label_map(label_map)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kdctl.engine.evaluate import evaluate_detector
    from kdctl.engine.precision import to_channels_last
    from kdctl.engine.rundir import new_run_dir, resolve_device
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
    write_json(run / "metrics.json", res.to_json())
    write_json(run / "predictions.json", results)
    if json_out is not None:
        write_json(json_out, res.to_json())
    c.print(metrics_table(f"{spec} on {cd.ann_path.name} ({res.num_images} images)", res.metrics))
    c.print(per_class_table(res.per_class))
    c.print(f"{res.images_per_second:.1f} images/s on {dev}; results: {run}/metrics.json, {run}/predictions.json"
            + (f", {json_out}" if json_out else ""))
    return res
