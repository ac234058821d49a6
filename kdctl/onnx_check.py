"""Running an exported ONNX graph in onnxruntime, and checking it against the PyTorch model it came from.

* :func:`ort_session` / :func:`run_onnx`: a session on the CPU (or CUDA, when onnxruntime has it) and one run on
  torch tensors; float inputs are cast to the graph's input type, so fp16 graphs take the same feeds.
* :func:`onnx_parity`: onnxruntime vs fp32 PyTorch on the export's example input, with the tolerance that
  applies (float32 graphs: :data:`ONNX_TOLERANCE`; fp16 graphs: :data:`FP16_RTOL` of the output's scale).
* :func:`match_detections`: the one-to-one pairing of two runtimes' post-processed CNN detections.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kdctl.errors import KdctlError
from kdctl.models.cnn.onnx import MAX_DETECTIONS as CNN_MAX_DETECTIONS
from kdctl.models.cnn.onnx import SCORE_THRESHOLD as CNN_SCORE_THRESHOLD
from kdctl.models.cnn.onnx import reference_outputs as cnn_reference_outputs
from kdctl.models.detr import onnx as detr_onnx

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

ONNX_TOLERANCE = 1e-4  # fp32 max abs diff of the DETR raw outputs (measured ~1e-7)
CNN_SCORE_TOLERANCE = 1e-4  # fp32 scores of the two runtimes (measured ~1e-7)
CNN_BOX_RTOL = 1e-4  # fp32 box coordinates, relative to the longer image side (measured ~1e-5: 5e-3 px at 640)
FP16_RTOL = 1e-2
"""fp16 graphs vs fp32 PyTorch: max abs diff <= FP16_RTOL * max(1, max |fp32 output|). fp16 rounds each value to
2^-11 (4.9e-4) relative; 1e-2 is 20 such roundings, room for their accumulation through a detector's layers
(measured on a tiny DETR: 1.2e-4 on logits, 4e-5 on boxes)."""
ORT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}


def ort_session(path: Path, device: str = "cpu"):
    """An onnxruntime session on ``path``: CUDA when ``device`` is a CUDA device and onnxruntime has the CUDA
    provider, else the CPU. One KdctlError line when onnxruntime is missing or cannot read the file."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise KdctlError("onnxruntime is not installed (pip install 'kdctl[onnx]')") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime's own error types: a corrupt or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise KdctlError(f"{path}: onnxruntime cannot load it ({first})") from e


def session_provider(sess: Any) -> str:
    """"CUDAExecutionProvider" or "CPUExecutionProvider": where ``sess`` runs."""
    return sess.get_providers()[0]


def ort_feeds(sess: Any, feeds: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Torch tensors -> numpy arrays of the graph's input types (float inputs cast to fp16 for an fp16 graph)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for k, v in feeds.items():
        a = v.detach().cpu().numpy()
        want = ORT_TYPES.get(types.get(k, ""))
        out[k] = a.astype(want) if want is not None and a.dtype.kind == "f" else a
    return out


def run_onnx(path: Path, feeds: dict[str, Tensor], sess: Any = None) -> list[Any]:
    """Run the graph in onnxruntime on torch tensors; returns numpy arrays in output order (fp16 graphs: fp16)."""
    sess = sess or ort_session(path)
    return sess.run(None, ort_feeds(sess, feeds))


def onnx_parity(det: Detector, path: Path, feeds: dict[str, Tensor], outputs: list[dict[str, Any]],
                half: bool = False) -> dict[str, Any]:
    """onnxruntime vs fp32 PyTorch on the example input; ``compared`` says on what, ``tolerance`` what passes.

    DETR: max abs diff of the raw outputs of every query, within :data:`ONNX_TOLERANCE` (fp16 graphs:
    :data:`FP16_RTOL` times the output's scale), else KdctlError.
    CNN: the post-processed detections, matched one to one (same label, scores within
    :data:`CNN_SCORE_TOLERANCE`, nearest box), leaving out those whose score lies within the score tolerance of
    the score threshold or of the top-100 cut (they may be kept by one runtime and not the other). ``unmatched``
    counts detections without a partner and ``warning`` says why the check is weak or failed (untrained models
    give tied scores, which change NMS choices between runtimes).
    """
    sess = ort_session(path)
    got = run_onnx(path, feeds, sess)
    with torch.no_grad():
        ref = detr_onnx.reference_outputs(det, feeds) if det.family == "detr" else cnn_reference_outputs(det, feeds)
    names = [o["name"] for o in outputs]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    if det.family == "detr":
        keep = detr_onnx.comparable_queries(det, feeds)  # RT-DETR: queries not tied in its top-k
        sel = (lambda t: t) if keep is None else (lambda t: t[keep])
        diffs = {n: float((sel(torch.from_numpy(g).float()) - sel(r.float())).abs().amax(0).max()) if sel(r).numel()
                 else 0.0 for n, g, r in zip(names, got, ref, strict=True)}
        tol = {n: (FP16_RTOL * max(1.0, float(r.abs().max())) if half else ONNX_TOLERANCE)
               for n, r in zip(names, ref, strict=True)}
        which = (f"all {det.num_queries} queries" if keep is None else
                 f"{int(keep.sum())} of {keep.numel()} queries (the others tie in the encoder's top-k)")
        report: dict[str, Any] = {"compared": f"raw outputs of {which} on a random batch "
                                              f"{shapes['pixel_values']}", "input_shapes": shapes,
                                  "max_abs_diff": diffs}
    else:
        size = max(feeds["images"].shape[-2:])
        score_tol = FP16_RTOL if half else CNN_SCORE_TOLERANCE
        box_tol = (FP16_RTOL if half else CNN_BOX_RTOL) * size
        tol = {"scores": score_tol, "boxes": box_tol}
        report = {"input_shapes": shapes, **match_detections([torch.as_tensor(g).float() for g in got], ref,
                                                             box_tolerance=box_tol, score_tolerance=score_tol)}
    report["reference"] = "float32 PyTorch"
    report["tolerance"] = {k: float(f"{v:.3g}") for k, v in tol.items()}
    if half:
        report["tolerance_rule"] = (f"fp16 graph: max abs diff <= {FP16_RTOL:g} x max(1, max |fp32 output|) "
                                    "(CNN: scores within 1e-2, boxes within 1e-2 of the image side)")
    report["onnxruntime_ms"] = ort_ms(sess, feeds)
    bad = {k: v for k, v in report["max_abs_diff"].items() if not v <= tol[k]}
    if det.family == "detr" and bad:
        raise KdctlError(f"the ONNX graph does not match PyTorch (max abs diff {bad}, tolerance {report['tolerance']});"
                         " not exported correctly")
    return report


def match_detections(got: list[Any], ref: tuple[Tensor, ...], *, box_tolerance: float,
                     score_tolerance: float = CNN_SCORE_TOLERANCE) -> dict[str, Any]:
    """Pair the detections (boxes, scores, labels) of two runtimes one to one and report what was compared.

    Only detections scoring at least the cut (the threshold, or the lowest kept score when a runtime returned
    :data:`CNN_MAX_DETECTIONS`) plus ``score_tolerance`` take part. In descending PyTorch score order, each takes
    the unpaired onnxruntime detection of the same label, with a score within the tolerance, whose box is nearest
    (max abs coordinate diff), when that box is within ``box_tolerance`` pixels.
    """
    gb, gs, gl = (torch.as_tensor(a) for a in got)
    rb, rs, rl = ref
    cut = CNN_SCORE_THRESHOLD
    for s in (gs, rs):
        if len(s) >= CNN_MAX_DETECTIONS:
            cut = max(cut, float(s.min()))
    floor = cut + score_tolerance
    gk, rk = gs.double() >= floor, rs.double() >= floor
    gb, gs, gl, rb, rs, rl = gb[gk].double(), gs[gk].double(), gl[gk], rb[rk].double(), rs[rk].double(), rl[rk]
    cost = (rb[:, None] - gb[None]).abs().amax(-1) if len(rb) and len(gb) else torch.zeros((len(rb), len(gb)))
    ok = (rl[:, None] == gl[None]) & ((rs[:, None] - gs[None]).abs() <= score_tolerance)
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
                    f"one by label, score (+-{score_tolerance:g}) and nearest box (+-{box_tolerance:.2g} px)",
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


def ort_ms(sess: Any, feeds: dict[str, Tensor], repeats: int = 3) -> float:
    """Median onnxruntime wall time (ms) of one run on ``feeds`` (a quick indication, not a benchmark)."""
    inputs = ort_feeds(sess, feeds)
    sess.run(None, inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, inputs)
        times.append(1000 * (time.perf_counter() - t0))
    return round(sorted(times)[len(times) // 2], 2)


__all__ = ["CNN_BOX_RTOL", "CNN_SCORE_TOLERANCE", "FP16_RTOL", "ONNX_TOLERANCE", "match_detections", "onnx_parity",
           "ort_feeds", "ort_session", "run_onnx", "session_provider"]
