"""The ``kdctl`` command line: a thin Typer shell over the library.

Every command imports its library code (and with it torch / transformers) inside its body, so ``kdctl --help``
and ``kdctl COMMAND --help`` stay instant. User errors (:class:`kdctl.errors.KdctlError`) print one line
prefixed with ``error:`` and exit with code 2.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdctl.errors import KdctlError, worker_message

app = typer.Typer(
    name="kdctl",
    help="Distil object-detector checkpoints (torchvision CNN detectors, transformers DETRs) into smaller students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)
app.add_typer(data_app, name="data")

SPEC_HELP = "Hub id (user/name[@rev]), model or run dir, torchvision:NAME[:WEIGHTS], or preset (detr-r18, ...)."
DATA_HELP = ("Dataset folder: COCO (DIR/{train,val}.json + DIR/images, the official layout or a Roboflow export), "
             "YOLO (data.yaml), Pascal VOC or Hugging Face datasets; detected (see --format).")
FORMAT_HELP = "Dataset format: auto (detected), coco, yolo, voc or hf (Hugging Face datasets; the [datasets] extra)."


def _version(value: bool) -> None:
    if value:
        from kdctl import __version__

        typer.echo(f"kdctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Distil object-detector checkpoints into smaller, faster students."""


# --------------------------------------------------------------------------- inspect
@app.command(short_help="Family, size, labels, input size and KD methods of a model.")
def inspect(
    spec: Annotated[str, typer.Argument(help=SPEC_HELP)],
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow transformers checkpoints that ship their own code.")
    ] = False,
) -> None:
    """Show a model's family, class, size, labels, input size and the KD methods it can take part in."""
    from kdctl.commands.inspect import inspect_model

    inspect_model(spec, as_json=json_out, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- eval
@app.command("eval", short_help="COCO mAP of a model on a split, or of a results file.")
def eval_(
    model: Annotated[str | None, typer.Option("--model", "-m", help=SPEC_HELP)] = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val or test.")] = "val",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    imgsz: Annotated[int | None, typer.Option(min=32, help="Longer image side (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    label_map: Annotated[
        Path | None, typer.Option(help="JSON {dataset class name: model label name} overriding name matching.")
    ] = None,
    val_ann: Annotated[Path | None, typer.Option(help="Annotation file overriding the dataset layout.")] = None,
    images: Annotated[Path | None, typer.Option(help="Image folder overriding the dataset layout.")] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Score this COCO results JSON instead of running a model.")
    ] = None,
    annotations: Annotated[Path | None, typer.Option(help="Ground truth for --predictions.")] = None,
    output: Annotated[Path, typer.Option(help="Runs folder (results go to OUTPUT/eval/NAME).")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name (auto-numbered).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoints with their own code.")] = False,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last", help="Channels-last (NHWC) convolutions.")] = True,
) -> None:
    """COCO bbox mAP of a model on a dataset split, or of an existing results file (--predictions)."""
    from kdctl.commands.evaluate import eval_model, eval_predictions

    if predictions is not None or annotations is not None:
        if predictions is None or annotations is None:
            raise KdctlError("--predictions and --annotations go together")
        eval_predictions(predictions, annotations, json_out=json_out)
        return
    if model is None:
        raise KdctlError("pass --model SPEC (or --predictions FILE --annotations FILE)")
    eval_model(
        model, data=data, split=split, batch_size=batch_size, imgsz=imgsz, device=device, workers=workers,
        json_out=json_out, label_map=label_map, ann=val_ann, images=images, output=output, name=name,
        trust_remote_code=trust_remote_code, channels_last=channels_last, format=format,
    )


# --------------------------------------------------------------------------- train / distill
Opt = typer.Option
Data = Annotated[Path | None, Opt(help=DATA_HELP)]
DataFormat = Annotated[str | None, Opt("--format", help=FORMAT_HELP)]
Epochs = Annotated[int | None, Opt(min=1, help="Epochs (default: the recipe's).")]
MaxSteps = Annotated[int | None, Opt(min=1, help="Stop after this many optimiser steps (overrides --epochs).")]
BatchSize = Annotated[int | None, Opt(min=1, help="Global batch size, split over processes (default: recipe).")]
Imgsz = Annotated[int | None, Opt(min=32, help="Longer image side in pixels (default: recipe / model).")]


def _positive_finite(value: float | None) -> float | None:
    """Option callback: a hyper-parameter must be a finite number > 0 (nan, inf and negatives are refused)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise KdctlError(f"--lr {value}: must be a finite number greater than 0")
    return value


Lr = Annotated[float | None, Opt(callback=_positive_finite,
                                 help="Learning rate (default: the recipe's, scaled with the batch size).")]
Device = Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int | None, Opt(help="Random seed.")]
Workers = Annotated[int | None, Opt(min=0, help="DataLoader worker processes.")]
GradAccum = Annotated[int | None, Opt(min=1, help="Micro-batches per optimiser step.")]
Amp = Annotated[str | None, Opt(help="Mixed precision: auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off.")]
TeacherAmp = Annotated[str | None, Opt(
    help="Teacher forward precision: auto (the --amp dtype; else bf16 where the GPU or CPU (AMX / AVX512-BF16) "
         "runs it natively; else float32), bf16, fp16, off.")]
ChannelsLast = Annotated[bool | None, Opt(
    "--channels-last/--no-channels-last",
    help="Channels-last (NHWC) convolutions for teacher, student and distiller (default: on; the layout fast "
         "bf16/fp16 convolutions need on AMX CPUs and CUDA tensor cores).")]
EvalEvery = Annotated[int | None, Opt(min=1, help="Evaluate every N epochs (and always at the end).")]
LogEvery = Annotated[int | None, Opt(min=1, help="Log every N steps.")]
SaveEvery = Annotated[int | None, Opt(min=0, help=(
    "Also checkpoint last/ every N optimiser steps within an epoch (0: at epoch ends only; default: every 500 "
    "steps when an epoch is longer than that)."))]
Name = Annotated[str | None, Opt(help="Run name under OUTPUT/TASK (auto-numbered: exp, exp2, ...).")]
Output = Annotated[Path | None, Opt(help="Runs folder (default runs/).")]
Recipe = Annotated[str | None, Opt(help="Recipe preset (cnn, retinanet, detr, rtdetr, lwdetr; default: by "
                                         "architecture) or a recipe TOML file (base = PRESET to start from one).")]
Resume = Annotated[Path | None, Opt(help="Continue this run directory from its last checkpoint.")]
Quiet = Annotated[bool, Opt("--quiet", "-q", help="Print only errors and the final table.")]
NoPretrained = Annotated[
    bool, Opt("--no-pretrained-backbone", help="Do not download ImageNet backbone weights for preset models.")
]
BackboneWeights = Annotated[Path | None, Opt(
    help="ImageNet backbone weights from a local file (.pth / .safetensors, torchvision or timm names) for a "
         "preset model; no download.")]
LabelMap = Annotated[Path | None, Opt(help="JSON {dataset class name: model label name}.")]
Head = Annotated[str | None, Opt(
    help="The model's class head: auto (a new head for the data's classes when the model lacks one of them, rows "
         "of the classes it knows kept), keep (refuse a missing class), new (always a fresh head).")]
TrainAnn = Annotated[Path | None, Opt(help="Training annotation file (overrides the layout).")]
ValAnn = Annotated[Path | None, Opt(help="Validation annotation file (overrides the layout).")]
Images = Annotated[Path | None, Opt(help="Image folder (overrides the layout).")]
Trust = Annotated[bool, Opt(help="Allow transformers checkpoints that ship their own code.")]
ReportTo = Annotated[str | None, Opt(help=(
    "Experiment trackers, comma-separated: tensorboard (event files in the run directory), wandb, mlflow, all or "
    "none (default: tensorboard when it is installed)."))]


def _run(task: str, opts: dict) -> None:
    from kdctl.commands.train import run_training

    run_training(task, opts)


@app.command(short_help="Train or fine-tune a detector without KD.")
def train(
    model: Annotated[str | None, Opt("--model", "-m", help=SPEC_HELP)] = None,
    data: Data = None, format: DataFormat = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None,
    imgsz: Imgsz = None, lr: Lr = None, device: Device = None, seed: Seed = None, workers: Workers = None,
    grad_accum: GradAccum = None, amp: Amp = None, channels_last: ChannelsLast = None, eval_every: EvalEvery = None,
    log_every: LogEvery = None, save_every_steps: SaveEvery = None,
    name: Name = None, output: Output = None, recipe: Recipe = None, resume: Resume = None, quiet: Quiet = False,
    no_pretrained_backbone: NoPretrained = False, backbone_weights: BackboneWeights = None,
    label_map: LabelMap = None, head: Head = None, train_ann: TrainAnn = None, val_ann: ValAnn = None,
    images: Images = None, trust_remote_code: Trust = False, report_to: ReportTo = None,
) -> None:
    """Train or fine-tune a detector without KD (a teacher for your data, or the non-distilled baseline)."""
    _run("train", locals())


@app.command(short_help="Distil a teacher into a student (DRKD, KD-DETR).")
def distill(
    teacher: Annotated[str | None, Opt("--teacher", "-t", help="Teacher: " + SPEC_HELP)] = None,
    student: Annotated[str | None, Opt("--student", "-s", help="Student: " + SPEC_HELP)] = None,
    method: Annotated[str | None, Opt(help="auto (by architectures; pred-kd across families), drkd, kd-detr, cwd, "
                                           "pkd, mgd, pred-kd, A+B (e.g. drkd+pred-kd) or none.")] = None,
    data: Data = None, format: DataFormat = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None,
    imgsz: Imgsz = None, lr: Lr = None, device: Device = None, seed: Seed = None, workers: Workers = None,
    grad_accum: GradAccum = None, amp: Amp = None, teacher_amp: TeacherAmp = None,
    channels_last: ChannelsLast = None, eval_every: EvalEvery = None, log_every: LogEvery = None,
    save_every_steps: SaveEvery = None, name: Name = None, output: Output = None, recipe: Recipe = None,
    resume: Resume = None, quiet: Quiet = False,
    no_pretrained_backbone: NoPretrained = False, backbone_weights: BackboneWeights = None,
    label_map: LabelMap = None, head: Head = None, train_ann: TrainAnn = None, val_ann: ValAnn = None,
    images: Images = None, trust_remote_code: Trust = False, report_to: ReportTo = None,
    baseline: Annotated[bool, Opt("--baseline", help=(
        "Then train the same student without KD (same init, data order, recipe, steps) into RUN/baseline/, "
        "evaluate teacher, baseline and distilled student on the same split and print the gain and its cost."))]
    = False,
    seeds: Annotated[int, Opt(min=1, help=(
        "With --baseline: repeat both runs for this many seeds (--seed, --seed + 1, ...) and report the mean gain, "
        "the per-seed gains and a paired 95% confidence interval."))] = 1,
) -> None:
    """Distil a teacher into a student: student detection loss + the KD loss of the auto-chosen method."""
    _run("distill", locals())


@app.command(short_help="The whole pipeline on synthetic data, no download.")
def quickstart(
    output: Annotated[Path, Opt(help="Folder for the dataset and the three runs.")] = Path("runs/quickstart"),
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quiet: Quiet = False,
) -> None:
    """Generate a synthetic dataset, train a teacher and a student, distil the student, compare the three APs."""
    from kdctl.commands.quickstart import quickstart as run

    run(output, device=device, quiet=quiet)


# --------------------------------------------------------------------------- export / push-to-hub
@app.command()
def export(
    model: Annotated[str, Opt("--model", "-m", help="Run directory (exports its best/, else last/) or " + SPEC_HELP)],
    output: Annotated[Path, Opt("--output", "-o", help="Output directory (must be empty unless --force).")],
    format: Annotated[str, Opt("--format", "-f", help="hf (transformers dir; kdctl dir for CNNs), safetensors or onnx.")] = "hf",
    half: Annotated[bool, Opt("--half", help=(
        "fp16: weights (hf/safetensors); ONNX: an fp16 graph (DETRs: weights, activations and I/O; CNNs: weights), "
        "checked in onnxruntime against fp32 PyTorch with the tolerance stated in model.onnx.json."))] = False,
    opset: Annotated[int, Opt(min=11, help="ONNX opset.")] = 17,
    imgsz: Annotated[int | None, Opt(min=32, help="ONNX example / fixed input side (default: the model's).")] = None,
    simplify: Annotated[bool, Opt("--simplify", help="ONNX: simplify the graph (needs onnxslim or onnxsim).")] = False,
    force: Annotated[bool, Opt("--force", help="Write into a non-empty --output.")] = False,
    trust_remote_code: Trust = False,
) -> None:
    """Export a model: transformers dir (pipeline-ready), safetensors + config, or ONNX (checked in onnxruntime).

    ONNX: DETR / Conditional / DAB-DETR (dynamic batch and size), Deformable DETR (dynamic batch, fixed size),
    Faster R-CNN / RetinaNet / FCOS (one image per run, dynamic size)."""
    from kdctl.commands.export import export_command

    export_command(model, format, output, half=half, opset=opset, imgsz=imgsz, force=force, simplify=simplify,
                   trust_remote_code=trust_remote_code)


@app.command("push-to-hub")
def push_to_hub(
    model: Annotated[Path, Opt("--model", "-m", help="Run directory (or model directory) to publish.")],
    repo_id: Annotated[str, Opt("--repo-id", help="Hub repository USER/NAME (created if needed).")],
    private: Annotated[bool, Opt("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, Opt(help="Branch to push to (created if needed).")] = None,
    commit_message: Annotated[str | None, Opt(help="Commit message.")] = None,
    token: Annotated[str | None, Opt(help="Hub token (default: HF_TOKEN, then the `hf auth login` token).")] = None,
    dry_run: Annotated[Path | None, Opt(
        help="Write what would be uploaded to this directory instead (must be empty unless --force).")] = None,
    force: Annotated[bool, Opt("--force", help="Write into a non-empty --dry-run directory.")] = False,
) -> None:
    """Upload a student (transformers dir for DETRs, kdctl dir for CNNs) with a model card built from the run."""
    from kdctl.commands.export import push_command

    push_command(model, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
                 dry_run=dry_run, force=force)


# --------------------------------------------------------------------------- predict / benchmark
from kdctl.commands.tools_cli import benchmark, predict  # noqa: E402  (Typer signatures only: no heavy import)

app.command(short_help="Draw and write a model's detections for images, folders, globs and videos.")(predict)
app.command(short_help="Latency and throughput: PyTorch and ONNX Runtime, batch 1 and batch N.")(benchmark)


# --------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output folder (must not hold a dataset already).")],
    images: Annotated[int, typer.Option("--images", "-n", min=1, help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a deterministic synthetic COCO dataset of coloured shapes (train/val/test)."""
    from kdctl.commands.data import synth_data

    synth_data(out, images=images, seed=seed)


@data_app.command("check")
def data_check(
    data: Annotated[Path, typer.Argument(help=DATA_HELP)],
    split: Annotated[str | None, typer.Option(help="Only this split (default: every split present).")] = None,
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    deep: Annotated[bool, typer.Option(
        "--deep", help="Decode every image in full (slower; by default each file's header and end are read).")] = False,
    plot: Annotated[Path | None, typer.Option(
        help="Also write a PNG (FILE.png) of the boxes per class and size, and of the box centres and shapes.")] = None,
) -> None:
    """Validate a dataset folder (COCO, YOLO, Pascal VOC, Hugging Face datasets) and print its statistics (exit 2
    on a fatal problem): images, boxes per class and split, COCO small/medium/large counts, classes with boxes in
    one split and none in another.

    Every image file is opened: unreadable or truncated files, and sizes that differ from the annotation's
    width/height (with the EXIF orientation applied where that makes them match), are fatal."""
    from kdctl.commands.data import check_data

    check_data(data, split=split, deep=deep, plot=plot, format=format)


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help=DATA_HELP)],
    dst: Annotated[Path, typer.Argument(help="Output folder (must not exist, or be empty).")],
    to: Annotated[str, typer.Option("--to", help="Output format: coco (DST/{split}.json + DST/images) or yolo "
                                    "(DST/data.yaml + images/ + labels/).")],
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    split: Annotated[str | None, typer.Option(help="Only this split (default: every split present).")] = None,
) -> None:
    """Convert a dataset to COCO or YOLO, loss-free for boxes and class names (validated first; a fatal problem
    writes nothing)."""
    from kdctl.commands.data import convert_data

    convert_data(src, dst, to=to, format=format, split=split)


# --------------------------------------------------------------------------- entry point
FILESYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                     errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST}
"""OS errors that are the state of the user's file system, reported as one ``error:`` line (exit 2)."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the Typer app, turning KdctlError into one line and exit code 2."""
    try:
        app(args=argv, prog_name="kdctl")
    except KdctlError as e:
        msg = worker_message(str(e))  # an error of a DataLoader worker: its own message, not the worker's traceback
        first, *rest = msg.splitlines() or [""]
        sys.stderr.write(f"error: {first}\n" + "".join(f"{line}\n" for line in rest))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except OSError as e:  # the file system said no (read-only, full, a file in the way): the user's to fix
        if e.errno not in FILESYSTEM_ERRNOS:
            raise
        sys.stderr.write(f"error: {e.filename or 'a file'}: {e.strerror}\n")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
