"""Export a trained student: a transformers directory, bare safetensors, or an ONNX graph.

=============  ===========================================================================================
``hf``         DETR family: a transformers directory (``config.json`` with id2label/label2id,
               ``model.safetensors``, ``preprocessor_config.json``) that ``AutoModelForObjectDetection`` and
               ``pipeline("object-detection")`` load offline. CNN detectors have no transformers class: a kdctl
               directory (``kdctl.json`` + ``model.safetensors``) that ``kdctl.load(DIR)`` loads.
``safetensors``  the weights (``model.safetensors``) plus the model's config: ``kdctl.json`` (both families)
               and the transformers ``config.json`` (DETRs). ``kdctl.load(DIR)`` loads it.
``onnx``       ``model.onnx`` (legacy TorchScript exporter, ``dynamo=False``; ``--half`` fp16, ``--simplify``) plus
               ``model.onnx.json`` describing inputs, outputs, labels, normalisation and box format (also in the
               graph's own ``metadata_props``); checked in onnxruntime against fp32 PyTorch
               (:mod:`kdctl.onnx_check`, :mod:`kdctl.onnx_deploy`).
=============  ===========================================================================================

ONNX graphs (:data:`ONNX_SUPPORT`):

* DETR, Table Transformer, Conditional DETR, DAB-DETR: ``pixel_values`` [N, 3, H, W] float32 NORMALISED
  ((x - mean) / std, zero on padding) and ``pixel_mask`` [N, H, W] int64 (1 = valid pixel); N, H and W dynamic. Outputs the model's raw
  ``logits`` [N, Q, C'] and ``pred_boxes`` [N, Q, 4] (normalised cx, cy, w, h relative to the valid region).
* Deformable DETR (plain, box refine, two-stage): the same, but H and W are fixed to the traced size (``--imgsz``;
  the graph is wrong at other sizes); N stays dynamic.
* Faster R-CNN, RetinaNet, FCOS: ``images`` [1, 3, H, W] float32 0-1 RGB (normalised inside the graph), H and W
  dynamic, ONE image per run; outputs post-processed ``boxes`` [D, 4] xyxy pixels of the input, ``scores`` [D],
  ``labels`` [D] (indices into ``label_names``), score threshold 0.001 and at most 100 detections as in
  :meth:`kdctl.models.base.Detector.predict`.

DETRs with a timm backbone built of ``BatchNormAct2d`` (the MobileNet-V2 presets) are written with the timm
backbone option ``freeze_batch_norm_2d``: stock transformers then keeps the activations that kdctl restores with
hooks, and computes kdctl's network (checked on an example batch at export,
:func:`kdctl.models.detr.onnx.as_stock_transformers`).

The exported weights are the student's own (``Detector.save``): a run directory's ``best/`` (else ``last/``)
checkpoint never contains distiller modules or the teacher, and ``trainer.pt`` is never copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdctl import onnx_deploy
from kdctl.errors import KdctlError
from kdctl.models.cnn import ARCHITECTURES as CNN_ARCHITECTURES
from kdctl.models.cnn.onnx import export_onnx as export_cnn_onnx
from kdctl.models.detr import onnx as detr_onnx
from kdctl.models.onnx_common import ONNX_FILE
from kdctl.onnx_check import (  # noqa: F401  (re-exported: the parity API lived here)
    CNN_BOX_RTOL,
    CNN_SCORE_TOLERANCE,
    ONNX_TOLERANCE,
    match_detections,
    onnx_parity,
    run_onnx,
)

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

FORMATS = ("hf", "safetensors", "onnx")
ONNX_META = "model.onnx.json"

# torchvision / kdctl builder prefix -> ONNX shape support; the CNNs' is declared with each architecture
# (kdctl.models.cnn.architectures), the DETRs' with each variant (kdctl.models.detr.variants, onnx_kind)
ONNX_SUPPORT: dict[str, str] = {
    **{name: a.onnx for name, a in CNN_ARCHITECTURES.items() if a.onnx},  # "one-image": batch 1, post-processed
}


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``files`` relative to ``output``, ``notes`` for the user, ONNX details."""

    format: str
    output: Path
    family: str
    architecture: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    onnx: dict[str, Any] | None = None


# --------------------------------------------------------------------------- entry points
def export_model(
    model: str,
    fmt: str,
    output: str | Path,
    *,
    half: bool = False,
    opset: int = 17,
    imgsz: int | None = None,
    force: bool = False,
    check: bool = True,
    simplify: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export the model a spec names (a run directory exports its ``best/``, else ``last/``) to ``output``.

    Args:
        model: a model spec (run dir, model dir, hub id, preset, ``torchvision:NAME``).
        fmt: "hf", "safetensors" or "onnx".
        output: the output directory; refused when it exists and is not empty, unless ``force``.
        half: fp16 weights (hf / safetensors); ONNX: an fp16 graph (:func:`export_onnx`).
        opset: ONNX opset.
        simplify: ONNX: simplify the graph with onnxslim / onnxsim (one error line when neither is installed).
        imgsz: ONNX example / fixed input side (default: the model's ``imgsz``).
        check: run the ONNX graph in onnxruntime and compare with PyTorch.
    """
    if fmt not in FORMATS:
        raise KdctlError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(output)
    check_output_dir(out, force)
    det = load_for_export(model, trust_remote_code=trust_remote_code)
    if fmt == "onnx":
        onnx_kind(det)  # refuse unsupported architectures and options before writing anything
        if simplify:
            onnx_deploy.require_simplifier()
    elif simplify:
        raise KdctlError("--simplify applies to --format onnx only")
    with writing_into(out):
        if fmt == "hf":
            res = export_hf(det, out, half=half)
        elif fmt == "safetensors":
            res = export_safetensors(det, out, half=half)
        else:
            res = export_onnx(det, out, half=half, opset=opset, imgsz=imgsz, check=check, simplify=simplify)
        res.files = sorted(p.name for p in out.iterdir() if p.is_file())
    return res


def load_for_export(model: str, *, trust_remote_code: bool = False) -> Detector:
    """The student only, in eval mode, fp32, on the CPU (a run dir resolves to ``best/``, else ``last/``)."""
    from kdctl.specs import load_detector

    det = load_detector(model, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    return det.float().cpu().eval()


def check_output_dir(out: Path, force: bool, option: str = "--output") -> None:
    """One KdctlError line, before any work, for an output directory that cannot be written: a file in its place
    or above it, an unwritable (read-only, no permission) directory, or an existing non-empty one without
    ``force`` (``option`` is the command's option that names it, e.g. ``--dry-run``)."""
    if out.exists() and not out.is_dir():
        raise KdctlError(f"{option} {out} is a file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdctlError(f"{option} {out}: cannot create it: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdctlError(f"{option} {out}: cannot write to {existing}: permission denied or read-only file system")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KdctlError(f"{option} {out} is not empty; choose another directory or pass --force to overwrite")


def _is_write_error(e: BaseException) -> bool:
    """OSError, or safetensors' error for a failed file write (disk full, read-only file system)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "serializ" in str(e).lower())


@contextmanager
def writing_into(out: Path) -> Iterator[Path]:
    """Create ``out`` (and its missing parents) for the block that writes into it.

    When the block fails, what it created is removed (the folders this call made, else the files and folders the
    block added to an existing ``out``), and a write error (read-only file system, disk full, a file in the way) is
    one KdctlError line naming the path and the cause.
    """
    from kdctl.io import write_error

    top = out
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    made = None if out.exists() else top  # the highest folder this call creates
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield out
    except BaseException as e:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif out.is_dir():
            for p in set(out.iterdir()) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from e
        if _is_write_error(e):
            raise KdctlError(f"cannot write into {out}: {(str(e).splitlines() or [''])[0][:200]}") from e
        raise


# --------------------------------------------------------------------------- hf / safetensors
def _save_weights(det: Detector, out: Path, fmt: str, half: bool) -> ExportResult:
    """``det`` saved into ``out`` (a DETR as its stock transformers class where kdctl wrapped it; float16 weights
    with ``half``): the common part of the ``hf`` and ``safetensors`` exports."""
    res = ExportResult(fmt, out, det.family, det.architecture)
    if det.family == "detr":
        res.notes += [n for n in [detr_onnx.as_stock_transformers(det)] if n]
    if half:
        det.half()
    det.save(out)
    return res


def export_hf(det: Detector, out: Path, *, half: bool = False) -> ExportResult:
    """DETR: transformers directory; CNN: kdctl directory (no transformers class exists for it)."""
    res = _save_weights(det, out, "hf", half)
    if det.family == "detr":
        res.notes.append("loads with AutoModelForObjectDetection.from_pretrained(DIR) and "
                         "pipeline('object-detection', model=DIR), offline")
    else:
        res.notes.append("torchvision detectors have no transformers class: wrote a kdctl directory "
                         "(kdctl.json + model.safetensors); load it with kdctl.load(DIR)")
    if half:
        res.notes.append("weights in float16")
    return res


def export_safetensors(det: Detector, out: Path, *, half: bool = False) -> ExportResult:
    """``model.safetensors`` + ``kdctl.json`` (+ the transformers ``config.json`` for DETRs)."""
    res = _save_weights(det, out, "safetensors", half)
    if det.family == "detr":
        detr_onnx.save_kdctl_config(det, out)
    res.notes.append("weights + config; load with kdctl.load(DIR)" + (" (float16 weights)" if half else ""))
    return res


# --------------------------------------------------------------------------- onnx
def onnx_kind(det: Detector) -> str:
    """"dynamic" | "fixed-size" | "one-image" for a supported architecture; one KdctlError line otherwise."""
    arch = det.architecture
    if det.family == "detr":
        return detr_onnx.onnx_kind(det)
    for key, kind in ONNX_SUPPORT.items():
        if arch == key or (det.family == "cnn" and arch.startswith(key)):
            return kind
    supported = ", ".join(ONNX_SUPPORT)
    raise KdctlError(f"ONNX export of {arch} is not supported yet (supported: {supported}); "
                     "use --format hf or --format safetensors")


def export_onnx(det: Detector, out: Path, *, half: bool = False, opset: int = 17, imgsz: int | None = None,
                check: bool = True, simplify: bool = False) -> ExportResult:
    """Trace ``det`` to ``out/model.onnx`` (optionally simplified, optionally fp16), write its description into
    the graph's ``metadata_props`` and ``out/model.onnx.json``, and check it in onnxruntime against fp32 PyTorch.

    ``half``: DETRs are converted in full to float16 (weights, activations, float inputs and outputs); when
    onnxruntime refuses that graph or it misses the fp16 tolerance, and for the CNN graphs (whose NMS subgraphs the
    converter cannot type), the weights only (float32 compute and I/O). ``model.onnx.json`` says which.
    """
    onnx_kind(det)  # one line for an unsupported architecture, before tracing
    size = int(imgsz or det.imgsz)
    res = ExportResult("onnx", out, det.family, det.architecture)
    path = out / ONNX_FILE
    if det.family == "detr":
        meta, feeds = detr_onnx.export_onnx(det, path, size, opset)
    else:
        meta, feeds = export_cnn_onnx(det, path, size, opset)
    if simplify:
        res.notes.append(onnx_deploy.simplify(path))
    modes = (["full", "weights"] if det.family == "detr" else ["weights"]) if half else [None]
    fp32 = path.read_bytes() if half else b""
    for i, mode in enumerate(modes):
        if mode is not None:
            path.write_bytes(fp32)
            meta["precision"] = onnx_deploy.to_half(path, mode)
            if mode == "full":
                for entry in meta["inputs"]:
                    entry["dtype"] = "float16" if entry["dtype"] == "float32" else entry["dtype"]
            else:
                meta["inputs"] = [{**e, "dtype": "float32" if e["dtype"] == "float16" else e["dtype"]}
                                  for e in meta["inputs"]]
        meta["dtype"] = "float16" if mode == "full" else "float32"
        onnx_deploy.write_metadata(path, meta)
        try:
            if check:
                meta["parity"] = onnx_parity(det, path, feeds, meta["outputs"], half=half)
            break
        except KdctlError as e:
            if i + 1 == len(modes):
                raise
            res.notes.append(f"full fp16 graph refused ({str(e)[:120]}); stored fp16 weights instead")
    (out / ONNX_META).write_text(json.dumps(meta, indent=2) + "\n")
    res.onnx = meta
    res.notes += _onnx_notes(meta)
    return res


def _onnx_notes(meta: dict[str, Any]) -> list[str]:
    ins = "; ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in meta["inputs"])
    outs = ", ".join(o["name"] for o in meta["outputs"])
    notes = [f"inputs: {ins} ({meta['normalization']['applied'].replace('by the caller', 'normalise first')})",
             f"outputs: {outs}; {meta['shapes']}; details in {ONNX_META}"]
    if "precision" in meta:
        notes.append(f"precision: {meta['precision']}")
    notes.append("class names, input size, normalisation and box format are in the graph's metadata_props")
    if "parity" in meta:
        p = meta["parity"]
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in p["max_abs_diff"].items())
        notes.append(f"onnxruntime vs float32 PyTorch max abs diff: {diffs} (tolerance {p['tolerance']}), on {p['compared']} "
                     f"({p['onnxruntime_ms']} ms per run on {p['input_shapes']})")
        if p.get("warning"):
            notes.append(f"warning: {p['warning']}")
    return notes


__all__ = ["CNN_BOX_RTOL", "CNN_SCORE_TOLERANCE", "FORMATS", "ONNX_SUPPORT", "ONNX_TOLERANCE", "ExportResult",
           "export_model", "match_detections", "onnx_parity", "run_onnx"]
