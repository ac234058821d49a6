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

* DETR, Conditional DETR, DAB-DETR: ``pixel_values`` [N, 3, H, W] float32 NORMALISED ((x - mean) / std, zero on
  padding) and ``pixel_mask`` [N, H, W] int64 (1 = valid pixel); N, H and W dynamic. Outputs the model's raw
  ``logits`` [N, Q, C'] and ``pred_boxes`` [N, Q, 4] (normalised cx, cy, w, h relative to the valid region).
* Deformable DETR (plain, box refine, two-stage): the same, but H and W are fixed to the traced size (``--imgsz``;
  the graph is wrong at other sizes); N stays dynamic.
* Faster R-CNN, RetinaNet, FCOS: ``images`` [1, 3, H, W] float32 0-1 RGB (normalised inside the graph), H and W
  dynamic, ONE image per run; outputs post-processed ``boxes`` [D, 4] xyxy pixels of the input, ``scores`` [D],
  ``labels`` [D] (indices into ``label_names``), score threshold 0.001 and at most 100 detections as in
  :meth:`kdctl.models.base.Detector.predict`.

The exported weights are the student's own (``Detector.save``): a run directory's ``best/`` (else ``last/``)
checkpoint never contains distiller modules or the teacher, and ``trainer.pt`` is never copied.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

FORMATS = ("hf", "safetensors", "onnx")
ONNX_FILE = "model.onnx"
ONNX_META = "model.onnx.json"
ONNX_TOLERANCE = 1e-4  # fp32 max abs diff of the DETR raw outputs (measured ~1e-7)
CNN_SCORE_THRESHOLD = 0.001
CNN_MAX_DETECTIONS = 100

# architecture (DETR class name, or torchvision / kdctl builder prefix) -> ONNX shape support
ONNX_SUPPORT: dict[str, str] = {
    "DetrForObjectDetection": "dynamic",  # batch, height, width dynamic
    "ConditionalDetrForObjectDetection": "dynamic",
    "DabDetrForObjectDetection": "dynamic",
    "DeformableDetrForObjectDetection": "fixed-size",  # batch dynamic, height/width = the traced size
    "fasterrcnn": "one-image",  # batch 1, height/width dynamic, post-processed detections
    "retinanet": "one-image",
    "fcos": "one-image",
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
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        res = export_hf(det, out, half=half)
    elif fmt == "safetensors":
        res = export_safetensors(det, out, half=half)
    else:
        res = export_onnx(det, out, half=half, opset=opset, imgsz=imgsz, check=check)
    res.files = sorted(p.name for p in out.iterdir() if p.is_file())
    return res


def export_command(model: str, fmt: str, output: Path, *, half: bool = False, opset: int = 17,
                   imgsz: int | None = None, force: bool = False, trust_remote_code: bool = False) -> ExportResult:
    """``kdctl export``: export, then print the files, the ONNX parity and what the graph takes and gives."""
    from kdctl.commands import console

    res = export_model(model, fmt, output, half=half, opset=opset, imgsz=imgsz, force=force,
                       trust_remote_code=trust_remote_code)
    c = console()
    c.print(f"exported {res.architecture} ({res.family}) as {res.format} to {res.output}: {', '.join(res.files)}",
            soft_wrap=True)
    for note in res.notes:
        c.print(f"  {note}", soft_wrap=True)
    return res


def load_for_export(model: str, *, trust_remote_code: bool = False) -> Detector:
    """The student only, in eval mode, fp32, on the CPU (a run dir resolves to ``best/``, else ``last/``)."""
    from kdctl.specs import load_detector

    det = load_detector(model, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    return det.float().cpu().eval()


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out`` (one line) unless ``force``; a file in its place is always refused."""
    if out.exists() and not out.is_dir():
        raise KdctlError(f"--output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KdctlError(f"--output {out} is not empty; choose another directory or pass --force to overwrite")


# --------------------------------------------------------------------------- hf / safetensors
def export_hf(det: Detector, out: Path, *, half: bool = False) -> ExportResult:
    """DETR: transformers directory; CNN: kdctl directory (no transformers class exists for it)."""
    res = ExportResult("hf", out, det.family, det.architecture)
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
    if half:
        det.half()
    det.save(out)
    if det.family == "detr":
        _detr_kdctl_config(det, out)
    res.notes.append("weights + config; load with kdctl.load(DIR)" + (" (float16 weights)" if half else ""))
    return res


def _detr_kdctl_config(det: Detector, out: Path) -> None:
    """Replace the image processor config by kdctl.json (kept only when the normalisation is not ImageNet's)."""
    from kdctl.models.base import write_kdctl_config
    from kdctl.models.detr import IMAGENET_MEAN, IMAGENET_STD

    write_kdctl_config(out, {
        "format": "kdctl", "version": 1, "family": det.family, "architecture": det.architecture,
        "label_names": list(det.label_names), "imgsz": det.imgsz, "weights_file": "model.safetensors",
        "image_mean": list(det.image_mean), "image_std": list(det.image_std),
    })
    default_norm = det.image_mean == tuple(IMAGENET_MEAN) and det.image_std == tuple(IMAGENET_STD)
    proc = out / "preprocessor_config.json"
    if default_norm and proc.is_file():
        proc.unlink()


# --------------------------------------------------------------------------- onnx
def onnx_kind(det: Detector) -> str:
    """"dynamic" | "fixed-size" | "one-image" for a supported architecture; one KdctlError line otherwise."""
    arch = det.architecture
    for key, kind in ONNX_SUPPORT.items():
        if arch == key or (det.family == "cnn" and arch.startswith(key)):
            return kind
    supported = ", ".join(ONNX_SUPPORT)
    raise KdctlError(f"ONNX export of {arch} is not supported yet (supported: {supported}); "
                     "use --format hf or --format safetensors")


class DetrOnnx(nn.Module):
    """(pixel_values [N, 3, H, W], pixel_mask [N, H, W]) -> (logits [N, Q, C'], pred_boxes [N, Q, 4])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes


class CnnOnnx(nn.Module):
    """images [1, 3, H, W] 0-1 -> boxes [D, 4] xyxy, scores [D], labels [D] (indices into label_names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        det = self.model([images[0]])[0]
        return det["boxes"], det["scores"], det["labels"] - 1


def export_onnx(det: Detector, out: Path, *, half: bool = False, opset: int = 17, imgsz: int | None = None,
                check: bool = True) -> ExportResult:
    """Trace ``det`` to ``out/model.onnx``, write ``out/model.onnx.json`` and check the graph in onnxruntime."""
    kind = onnx_kind(det)
    size = int(imgsz or det.imgsz)
    res = ExportResult("onnx", out, det.family, det.architecture)
    _refuse_half_onnx(half)
    if det.family == "detr":
        meta, feeds = _export_detr(det, out / ONNX_FILE, kind, size, opset)
    else:
        meta, feeds = _export_cnn(det, out / ONNX_FILE, size, opset)
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


def _export_detr(det: Detector, path: Path, kind: str, size: int, opset: int
                 ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Legacy-trace a DETR with a batch of 2 (the second image's right quarter padded) and describe the graph."""
    dtype = torch.float32
    feeds = _detr_example(det, size, dtype)
    wrapper = DetrOnnx(det.model).eval()
    spatial = kind == "dynamic"
    axes = {
        "pixel_values": {0: "batch", **({2: "height", 3: "width"} if spatial else {})},
        "pixel_mask": {0: "batch", **({1: "height", 2: "width"} if spatial else {})},
        "logits": {0: "batch"},
        "pred_boxes": {0: "batch"},
    }
    _trace(wrapper, tuple(feeds.values()), path, list(feeds), ["logits", "pred_boxes"], axes, opset)
    hw: list[Any] = ["height", "width"] if spatial else [size, size]
    softmax = det.logit_kind == "softmax"
    classes = det.num_classes + (1 if softmax else 0)
    meta = _meta_common(det, kind, size, opset)
    meta.update(
        inputs=[
            {"name": "pixel_values", "dtype": str(dtype).removeprefix("torch."), "shape": ["batch", 3, *hw],
             "description": "RGB in [0, 1], resized so the longer side is imgsz, then (x - image_mean) / image_std; "
                            "0 on padding"},
            {"name": "pixel_mask", "dtype": "int64", "shape": ["batch", *hw],
             "description": "1 on valid pixels, 0 on padding (all ones for an unpadded image)"},
        ],
        outputs=[
            {"name": "logits", "shape": ["batch", det.num_queries, classes],
             "description": ("class logits; scores = softmax over the last axis without the last (no-object) class"
                             if softmax else "class logits; scores = sigmoid (top-k over queries x classes)")},
            {"name": "pred_boxes", "shape": ["batch", det.num_queries, 4],
             "description": "boxes (cx, cy, w, h) in [0, 1], relative to the valid (unpadded) image region"},
        ],
        normalization={"image_mean": list(det.image_mean), "image_std": list(det.image_std),
                       "applied": "outside the graph, by the caller"},
    )
    return meta, feeds


def _detr_example(det: Detector, size: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """A deterministic batch of 2 normalised images [2, 3, size, size]; image 2 has its right quarter padded."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, size, size), generator=g)
    mask = torch.ones((2, size, size), dtype=torch.long)
    mask[1, :, size - size // 4:] = 0
    mean = torch.tensor(det.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(det.image_std).view(1, 3, 1, 1)
    pixel_values = ((x - mean) / std) * mask[:, None]
    return {"pixel_values": pixel_values.to(dtype), "pixel_mask": mask}


def _export_cnn(det: Detector, path: Path, size: int, opset: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Legacy-trace a torchvision detector on one 0-1 image (pre- and post-processing inside the graph)."""
    from kdctl.models.torchvision import _attributes, _no_background

    g = torch.Generator().manual_seed(0)
    h = max(64, (size * 3 // 4) // 32 * 32)  # a non-square example: both sides stay dynamic
    feeds = {"images": torch.rand((1, 3, h, size), generator=g)}
    axes = {"images": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
            "labels": {0: "detections"}}
    owner = det._postprocess_owner()
    with _attributes(owner, score_thresh=CNN_SCORE_THRESHOLD, detections_per_img=CNN_MAX_DETECTIONS), \
            _no_background(det.model):
        _trace(CnnOnnx(det.model).eval(), tuple(feeds.values()), path, list(feeds), ["boxes", "scores", "labels"],
               axes, opset)
    t = det.model.transform
    meta = _meta_common(det, "one-image", size, opset)
    meta.update(
        inputs=[{"name": "images", "dtype": "float32", "shape": [1, 3, "height", "width"],
                 "description": "ONE RGB image in [0, 1] (not normalised), resized so the longer side is imgsz; "
                                "run the graph once per image"}],
        outputs=[
            {"name": "boxes", "shape": ["detections", 4], "description": "x0, y0, x1, y1 in pixels of the input"},
            {"name": "scores", "shape": ["detections"], "description": "scores, descending"},
            {"name": "labels", "shape": ["detections"], "description": "indices into label_names"},
        ],
        normalization={"image_mean": list(t.image_mean), "image_std": list(t.image_std),
                       "applied": "inside the graph"},
        score_threshold=CNN_SCORE_THRESHOLD,
        max_detections=CNN_MAX_DETECTIONS,
    )
    return meta, feeds


def _meta_common(det: Detector, kind: str, size: int, opset: int) -> dict[str, Any]:
    shapes = {"dynamic": "batch, height and width dynamic",
              "fixed-size": f"batch dynamic; height and width fixed at {size} (the graph is only valid there)",
              "one-image": "one image per run; height and width dynamic"}
    return {
        "format": "onnx", "file": ONNX_FILE, "opset": opset, "exporter": "torch.onnx.export(dynamo=False)",
        "family": det.family, "architecture": det.architecture, "dtype": "float32",
        "shapes": shapes[kind], "imgsz": size, "label_names": list(det.label_names),
    }


def _trace(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
           axes: dict[str, dict[int, str]], opset: int) -> None:
    """``torch.onnx.export(dynamo=False)``; an exporter failure is one KdctlError line."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise KdctlError(f"ONNX export failed ({e.__class__.__name__}: {first})") from e


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
    """Max abs diff per output between onnxruntime and PyTorch on the example input; fp32 DETR outputs must
    agree within :data:`ONNX_TOLERANCE` (else KdctlError). CNN detections are compared as sets (random models
    tie scores, and tied detections may come out in another order)."""
    got = run_onnx(path, feeds)
    with torch.no_grad():
        if det.family == "detr":
            ref = DetrOnnx(det.model)(*feeds.values())
        else:
            from kdctl.models.torchvision import _attributes, _no_background

            with _attributes(det._postprocess_owner(), score_thresh=CNN_SCORE_THRESHOLD,
                             detections_per_img=CNN_MAX_DETECTIONS), _no_background(det.model):
                ref = CnnOnnx(det.model)(*feeds.values())
    names = [o["name"] for o in outputs]
    if det.family == "detr":
        diffs = {n: float((torch.from_numpy(g).float() - r.float()).abs().max()) for n, g, r in zip(names, got, ref,
                                                                                                     strict=True)}
    else:
        diffs = _detection_set_diff(got, ref)
    report = {"input_shapes": {k: list(v.shape) for k, v in feeds.items()}, "max_abs_diff": diffs,
              "onnxruntime_ms": _ort_ms(path, feeds)}
    bad = {k: v for k, v in diffs.items() if not v <= ONNX_TOLERANCE}
    if det.family == "detr" and bad:
        raise KdctlError(f"the ONNX graph does not match PyTorch (max abs diff {bad}); not exported correctly")
    return report


def _detection_set_diff(got: list[Any], ref: tuple[Tensor, ...]) -> dict[str, float]:
    """Detections of both runtimes sorted by (label, score, x0, y0): max abs diff of scores and boxes, and the
    count difference (the boxes of tied detections are compared after this canonical order)."""
    def canon(boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        rows = torch.cat([labels[:, None].double(), scores[:, None].double().round(decimals=4), boxes.double()], 1)
        for col in reversed(range(rows.shape[1])):
            rows = rows[rows[:, col].argsort(stable=True)]
        return rows

    g = canon(*(torch.from_numpy(a) for a in got))
    r = canon(*ref)
    if g.shape != r.shape:
        return {"count": float(abs(g.shape[0] - r.shape[0])), "boxes": float("inf"), "scores": float("inf")}
    return {"count": 0.0, "scores": float((g[:, 1] - r[:, 1]).abs().max()) if len(g) else 0.0,
            "boxes": float((g[:, 2:] - r[:, 2:]).abs().max()) if len(g) else 0.0}


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
        notes.append(f"onnxruntime vs PyTorch max abs diff: {diffs} ({p['onnxruntime_ms']} ms per run on "
                     f"{p['input_shapes']})")
    return notes


__all__ = ["FORMATS", "ONNX_SUPPORT", "ExportResult", "export_command", "export_model"]
