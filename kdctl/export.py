"""Export a trained student: a transformers directory, bare safetensors, or an ONNX graph.

=============  ===========================================================================================
``hf``         DETR family: a transformers directory (``config.json`` with id2label/label2id,
               ``model.safetensors``, ``preprocessor_config.json``) that ``AutoModelForObjectDetection`` and
               ``pipeline("object-detection")`` load offline. CNN detectors have no transformers class: a kdctl
               directory (``kdctl.json`` + ``model.safetensors``) that ``kdctl.load(DIR)`` loads.
``safetensors``  the weights (``model.safetensors``) plus the model's config: ``kdctl.json`` (both families)
               and the transformers ``config.json`` (DETRs). ``kdctl.load(DIR)`` loads it.
``onnx``       ``model.onnx`` (legacy TorchScript exporter, ``dynamo=False``) plus ``model.onnx.json``
               describing inputs, outputs, labels and normalisation; checked against PyTorch in onnxruntime.
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdctl.errors import KdctlError
from kdctl.models.cnn import ARCHITECTURES as CNN_ARCHITECTURES
from kdctl.models.cnn.onnx import MAX_DETECTIONS as CNN_MAX_DETECTIONS
from kdctl.models.cnn.onnx import SCORE_THRESHOLD as CNN_SCORE_THRESHOLD
from kdctl.models.cnn.onnx import export_onnx as export_cnn_onnx
from kdctl.models.cnn.onnx import reference_outputs as cnn_reference_outputs
from kdctl.models.detr import onnx as detr_onnx
from kdctl.models.onnx_common import ONNX_FILE

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

FORMATS = ("hf", "safetensors", "onnx")
ONNX_META = "model.onnx.json"
ONNX_TOLERANCE = 1e-4  # fp32 max abs diff of the DETR raw outputs (measured ~1e-7)
CNN_SCORE_TOLERANCE = 1e-4  # fp32 scores of the two runtimes (measured ~1e-7)
CNN_BOX_RTOL = 1e-4  # fp32 box coordinates, relative to the longer image side (measured ~1e-5: 5e-3 px at 640)

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
    trust_remote_code: bool = False,
) -> ExportResult:
    """Export the model a spec names (a run directory exports its ``best/``, else ``last/``) to ``output``.

    Args:
        model: a model spec (run dir, model dir, hub id, preset, ``torchvision:NAME``).
        fmt: "hf", "safetensors" or "onnx".
        output: the output directory; refused when it exists and is not empty, unless ``force``.
        half: fp16 weights (hf / safetensors); refused for ONNX (not supported yet).
        opset: ONNX opset.
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
        _refuse_half_onnx(half)
    with writing_into(out):
        if fmt == "hf":
            res = export_hf(det, out, half=half)
        elif fmt == "safetensors":
            res = export_safetensors(det, out, half=half)
        else:
            res = export_onnx(det, out, half=half, opset=opset, imgsz=imgsz, check=check)
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
def export_hf(det: Detector, out: Path, *, half: bool = False) -> ExportResult:
    """DETR: transformers directory; CNN: kdctl directory (no transformers class exists for it)."""
    res = ExportResult("hf", out, det.family, det.architecture)
    if det.family == "detr":
        res.notes += [n for n in [detr_onnx.as_stock_transformers(det)] if n]
    if half:
        det.half()
    det.save(out)
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
    res = ExportResult("safetensors", out, det.family, det.architecture)
    if det.family == "detr":
        res.notes += [n for n in [detr_onnx.as_stock_transformers(det)] if n]
    if half:
        det.half()
    det.save(out)
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
                check: bool = True) -> ExportResult:
    """Trace ``det`` to ``out/model.onnx``, write ``out/model.onnx.json`` and check the graph in onnxruntime."""
    onnx_kind(det)  # one line for an unsupported architecture, before tracing
    size = int(imgsz or det.imgsz)
    res = ExportResult("onnx", out, det.family, det.architecture)
    _refuse_half_onnx(half)
    if det.family == "detr":
        meta, feeds = detr_onnx.export_onnx(det, out / ONNX_FILE, size, opset)
    else:
        meta, feeds = export_cnn_onnx(det, out / ONNX_FILE, size, opset)
    if check:
        meta["parity"] = onnx_parity(det, out / ONNX_FILE, feeds, meta["outputs"])
    (out / ONNX_META).write_text(json.dumps(meta, indent=2) + "\n")
    res.onnx = meta
    res.notes += _onnx_notes(meta)
    return res


def _refuse_half_onnx(half: bool) -> None:
    """fp16 graphs traced on the CPU mix fp16 and fp32 (onnxruntime refuses DETR's, Deformable's is off by 0.3)."""
    if half:
        raise KdctlError("fp16 ONNX export is not supported yet (CPU tracing gives mixed-precision graphs); export "
                         "fp32 and convert the graph, e.g. with onnxconverter-common's float16 converter")


def _ort_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise KdctlError("onnxruntime is not installed (pip install 'kdctl[onnx]'); pass check=False") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, feeds: dict[str, Tensor]) -> list[Any]:
    """Run the graph in onnxruntime (CPU) on torch tensors; returns numpy arrays in output order."""
    sess = _ort_session(path)
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def onnx_parity(det: Detector, path: Path, feeds: dict[str, Tensor], outputs: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """onnxruntime vs PyTorch on the example input; ``compared`` says on what.

    DETR: max abs diff of the raw outputs of every query, within :data:`ONNX_TOLERANCE` (else KdctlError).
    CNN: the post-processed detections, matched one to one (same label, scores within
    :data:`CNN_SCORE_TOLERANCE`, nearest box), leaving out those whose score lies within the score tolerance of
    the score threshold or of the top-100 cut (they may be kept by one runtime and not the other). ``unmatched``
    counts detections without a partner and ``warning`` says why the check is weak or failed (untrained models
    give tied scores, which change NMS choices between runtimes).
    """
    got = run_onnx(path, feeds)
    with torch.no_grad():
        if det.family == "detr":
            ref = detr_onnx.reference_outputs(det, feeds)
        else:
            ref = cnn_reference_outputs(det, feeds)
    names = [o["name"] for o in outputs]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    if det.family == "detr":
        keep = detr_onnx.comparable_queries(det, feeds)  # RT-DETR: queries not tied in its top-k
        sel = (lambda t: t) if keep is None else (lambda t: t[keep])
        diffs = {n: float((sel(torch.from_numpy(g).float()) - sel(r.float())).abs().amax(0).max()) if sel(r).numel()
                 else 0.0 for n, g, r in zip(names, got, ref, strict=True)}
        which = (f"all {det.num_queries} queries" if keep is None else
                 f"{int(keep.sum())} of {keep.numel()} queries (the others tie in the encoder's top-k)")
        report: dict[str, Any] = {"compared": f"raw outputs of {which} on a random batch "
                                              f"{shapes['pixel_values']}", "input_shapes": shapes,
                                  "max_abs_diff": diffs}
    else:
        size = max(feeds["images"].shape[-2:])
        report = {"input_shapes": shapes, **match_detections(got, ref, box_tolerance=CNN_BOX_RTOL * size)}
    report["onnxruntime_ms"] = _ort_ms(path, feeds)
    bad = {k: v for k, v in report["max_abs_diff"].items() if not v <= ONNX_TOLERANCE}
    if det.family == "detr" and bad:
        raise KdctlError(f"the ONNX graph does not match PyTorch (max abs diff {bad}); not exported correctly")
    return report


def match_detections(got: list[Any], ref: tuple[Tensor, ...], *, box_tolerance: float) -> dict[str, Any]:
    """Pair the detections (boxes, scores, labels) of two runtimes one to one and report what was compared.

    Only detections scoring at least the cut (the threshold, or the lowest kept score when a runtime returned
    :data:`CNN_MAX_DETECTIONS`) plus :data:`CNN_SCORE_TOLERANCE` take part. In descending PyTorch score order,
    each takes the unpaired onnxruntime detection of the same label, with a score within the tolerance, whose box
    is nearest (max abs coordinate diff), when that box is within ``box_tolerance`` pixels.
    """
    gb, gs, gl = (torch.as_tensor(a) for a in got)
    rb, rs, rl = ref
    cut = CNN_SCORE_THRESHOLD
    for s in (gs, rs):
        if len(s) >= CNN_MAX_DETECTIONS:
            cut = max(cut, float(s.min()))
    floor = cut + CNN_SCORE_TOLERANCE
    gk, rk = gs.double() >= floor, rs.double() >= floor
    gb, gs, gl, rb, rs, rl = gb[gk].double(), gs[gk].double(), gl[gk], rb[rk].double(), rs[rk].double(), rl[rk]
    cost = (rb[:, None] - gb[None]).abs().amax(-1) if len(rb) and len(gb) else torch.zeros((len(rb), len(gb)))
    ok = (rl[:, None] == gl[None]) & ((rs[:, None] - gs[None]).abs() <= CNN_SCORE_TOLERANCE)
    cost = torch.where(ok, cost.double(), torch.full_like(cost.double(), float("inf")))
    box_diffs, score_diffs = [], []
    for i in rs.argsort(descending=True).tolist():
        if not len(gb):
            break
        j = int(cost[i].argmin())
        if cost[i, j] <= box_tolerance:
            box_diffs.append(float(cost[i, j]))
            score_diffs.append(float((rs[i] - gs[j]).abs()))
            cost[:, j] = float("inf")
    matched = len(box_diffs)
    report: dict[str, Any] = {
        "compared": f"detections scoring >= {floor:.4g} ({len(rs)} PyTorch, {len(gs)} onnxruntime), matched one to "
                    f"one by label, score (+-{CNN_SCORE_TOLERANCE:g}) and nearest box (+-{box_tolerance:.2g} px)",
        "matched": matched, "unmatched": len(rs) - matched + len(gs) - matched,
        "max_abs_diff": {"scores": max(score_diffs, default=0.0), "boxes": max(box_diffs, default=0.0)},
    }
    if report["unmatched"]:
        report["warning"] = (f"{report['unmatched']} detections have no partner in the other runtime; tied scores "
                             "of an untrained model change NMS choices, so check a trained model on real images")
    elif not matched:
        report["warning"] = (f"no detection scored >= {floor:.4g} on the random example image: nothing was "
                             "compared; check a trained model on real images")
    return report


def _ort_ms(path: Path, feeds: dict[str, Tensor], repeats: int = 3) -> float:
    """Median onnxruntime wall time (ms) of one run on ``feeds`` (a quick indication, not a benchmark)."""
    sess = _ort_session(path)
    inputs = {k: v.numpy() for k, v in feeds.items()}
    sess.run(None, inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, inputs)
        times.append(1000 * (time.perf_counter() - t0))
    return round(sorted(times)[len(times) // 2], 2)


def _onnx_notes(meta: dict[str, Any]) -> list[str]:
    ins = "; ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in meta["inputs"])
    outs = ", ".join(o["name"] for o in meta["outputs"])
    notes = [f"inputs: {ins} ({meta['normalization']['applied'].replace('by the caller', 'normalise first')})",
             f"outputs: {outs}; {meta['shapes']}; details in {ONNX_META}"]
    if "parity" in meta:
        p = meta["parity"]
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in p["max_abs_diff"].items())
        notes.append(f"onnxruntime vs PyTorch max abs diff: {diffs}, on {p['compared']} "
                     f"({p['onnxruntime_ms']} ms per run on {p['input_shapes']})")
        if p.get("warning"):
            notes.append(f"warning: {p['warning']}")
    return notes


__all__ = ["FORMATS", "ONNX_SUPPORT", "ExportResult", "export_model"]
