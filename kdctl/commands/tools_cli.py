"""The Typer signatures of ``kdctl predict`` and ``kdctl benchmark`` (registered on the app by :mod:`kdctl.cli`).

Options only: each body imports its command module (and with it torch) when it runs, so ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdctl.errors import KdctlError

Opt = typer.Option
SPEC_HELP = "Hub id (user/name[@rev]), model or run dir, torchvision:NAME[:WEIGHTS], or preset (detr-r18, ...)."
Trust = Annotated[bool, Opt(help="Allow transformers checkpoints that ship their own code.")]
Quiet = Annotated[bool, Opt("--quiet", "-q", help="Print only errors and the summary line.")]


def predict(
    sources: Annotated[list[str] | None, typer.Argument(
        metavar="SOURCE", help="Images, folders, glob patterns ('imgs/**/*.jpg') or video files (PyAV).")] = None,
    model: Annotated[str, Opt("--model", "-m", help="A kdctl model or run, an exported model.onnx (or its "
                                                    "folder), or " + SPEC_HELP)] = "",
    conf: Annotated[float, Opt(min=0.0, max=1.0, help="Score threshold.")] = 0.25,
    iou: Annotated[float | None, Opt(min=0.0, max=1.0, help=(
        "Class-wise NMS IoU threshold (CNN detectors: their own NMS at this threshold; DETRs and ONNX graphs: "
        "applied to the output; default: the model's own, none for DETRs).") )] = None,
    max_det: Annotated[int, Opt(min=1, help="At most this many detections per image.")] = 100,
    imgsz: Annotated[int | None, Opt(min=32, help="Longer image side (default: the model's).")] = None,
    classes: Annotated[str | None, Opt(help="Only these classes: names or indices, comma-separated.")] = None,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, Opt(min=1, help="Images per forward pass.")] = 4,
    save: Annotated[bool, Opt("--save/--no-save", help="Write the images with their boxes drawn.")] = True,
    save_txt: Annotated[bool, Opt("--save-txt", help="Write labels/NAME.txt in YOLO format (class cx cy w h).")] = False,
    save_conf: Annotated[bool, Opt("--save-conf", help="With --save-txt: the score as a sixth column.")] = False,
    vid_stride: Annotated[int, Opt(min=1, help="Videos: every N-th frame.")] = 1,
    output: Annotated[Path, Opt(help="Runs folder (results go to OUTPUT/predict/NAME, auto-numbered).")] = Path("runs"),
    name: Annotated[str | None, Opt(help="Run name (auto-numbered: exp, exp2, ...).")] = None,
    save_dir: Annotated[Path | None, Opt(help="Write into exactly this new or empty folder instead of "
                                              "OUTPUT/predict/NAME.")] = None,
    trust_remote_code: Trust = False,
    quiet: Quiet = False,
) -> None:
    """Run a model (PyTorch, or an exported ONNX graph in onnxruntime) on images, folders, glob patterns and
    videos; write the drawn images, predictions.json (COCO results) and, with --save-txt, YOLO labels into
    runs/predict/NAME; print the detections per image."""
    from kdctl.commands.predict import predict_command

    if not model:
        raise KdctlError("pass --model SPEC (a run, a model, an exported model.onnx, a hub id or a preset)")
    predict_command(model, sources or [], conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, classes=classes,
                    device=device, batch_size=batch_size, save=save, save_txt=save_txt, save_conf=save_conf,
                    vid_stride=vid_stride, output=output, name=name, save_dir=save_dir,
                    trust_remote_code=trust_remote_code, quiet=quiet)


def benchmark(
    model: Annotated[str, Opt("--model", "-m", help="A kdctl model or run, an exported model.onnx, or " + SPEC_HELP)],
    imgsz: Annotated[int | None, Opt(min=32, help="Input side (square; default: the model's).")] = None,
    batch_size: Annotated[int, Opt(min=1, help="N of the batch-N rows (batch 1 is always measured).")] = 8,
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    warmup: Annotated[int, Opt(min=0, help="Untimed runs before each row.")] = 3,
    repeats: Annotated[int, Opt(min=1, help="Timed runs per row (the median is reported).")] = 10,
    onnx: Annotated[bool, Opt("--onnx/--no-onnx", help="Also export to ONNX and time it in onnxruntime.")] = True,
    half: Annotated[bool, Opt("--half", help="Time the fp16 ONNX graph (kdctl export --half).")] = False,
    json_out: Annotated[Path | None, Opt("--json", help="Also write the measurements as JSON here.")] = None,
    trust_remote_code: Trust = False,
) -> None:
    """Latency and throughput of a model at its input size, in PyTorch and as its ONNX export in onnxruntime, on
    the current device, at batch 1 and batch N, with the warm-up and repeats stated: the number to compare a
    teacher and its distilled student by."""
    from kdctl.commands.benchmark import benchmark_command

    benchmark_command(model, imgsz=imgsz, batch_size=batch_size, device=device, warmup=warmup, repeats=repeats,
                      onnx=onnx, half=half, json_out=json_out, trust_remote_code=trust_remote_code)
