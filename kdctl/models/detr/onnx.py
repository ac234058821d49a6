"""ONNX and stock-transformers export of DETR-family models (the generic flow is :mod:`kdctl.export`).

ONNX graph: ``pixel_values`` [N, 3, H, W] float32 NORMALISED ((x - mean) / std, zero on padding) and
``pixel_mask`` [N, H, W] int64 (1 = valid pixel) in; the model's raw ``logits`` [N, Q, C'] and ``pred_boxes``
[N, Q, 4] (normalised cx, cy, w, h relative to the valid region) out. N, H and W are dynamic for the variants whose
``onnx_kind`` is "dynamic"; "fixed-size" graphs (Deformable DETR) keep N dynamic but H and W fixed at the traced
size (the graph is wrong at other sizes). Models that ignore the pixel mask (RT-DETR, ``square_input``) take
``pixel_values`` alone, a square image padded at the bottom/right, and their boxes are relative to that square.

DETRs with a timm backbone built of ``BatchNormAct2d`` (the MobileNet-V2 presets) are written with the timm backbone
option ``freeze_batch_norm_2d``: stock transformers then keeps the activations that kdctl restores with hooks, and
computes kdctl's network (checked on an example batch, :func:`as_stock_transformers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.detr.adapter import DetrDetector
from kdctl.models.detr.backbone import stock_transformers_model
from kdctl.models.detr.variants import VARIANTS_BY_CLASS
from kdctl.models.onnx_common import graph_meta, trace
from kdctl.models.weights import write_kdctl_config

HF_TOLERANCE = 1e-4  # fp32 max abs diff, kdctl vs the exported transformers model (measured 0)


class DetrOnnx(nn.Module):
    """(pixel_values [N, 3, H, W], pixel_mask [N, H, W]) -> (logits [N, Q, C'], pred_boxes [N, Q, 4])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes


def onnx_kind(det: DetrDetector) -> str:
    """"dynamic" | "fixed-size" for a variant that exports to ONNX; one KdctlError line otherwise."""
    kind = det.variant.onnx_kind
    if kind is None:
        supported = ", ".join(name for name, v in VARIANTS_BY_CLASS.items() if v.onnx_kind)
        raise KdctlError(f"ONNX export of {det.architecture} is not supported yet (supported DETRs: {supported}); "
                         "use --format hf or --format safetensors")
    return kind


def example_input(det: DetrDetector, size: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A deterministic batch of 2 normalised images [2, 3, size, size]; image 2 has its right quarter padded."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, size, size), generator=g)
    mask = torch.ones((2, size, size), dtype=torch.long)
    mask[1, :, size - size // 4:] = 0
    if det.variant.square_input:  # no mask input: the padding is part of the square image
        return {"pixel_values": det.normalize(x, mask).to(dtype)}
    return {"pixel_values": det.normalize(x, mask).to(dtype), "pixel_mask": mask}


def reference_outputs(det: DetrDetector, feeds: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """What the graph must compute on ``feeds``: the PyTorch model's raw (logits, pred_boxes)."""
    return DetrOnnx(det.model)(*feeds.values())


@torch.no_grad()
def comparable_queries(det: DetrDetector, feeds: dict[str, Tensor]) -> Tensor | None:
    """[N, Q] True where a query's output is well defined for a parity check: for models that select their queries
    by top-k over encoder scores (RT-DETR), the queries whose score is not tied with another position's (onnxruntime
    and PyTorch may break ties differently, and tied positions carry different anchors); None = every query."""
    if not det.variant.queries_image_dependent(det.model) or not det.variant.square_input:
        return None
    out = det.model(**feeds)
    scores = out.enc_outputs_class.max(-1).values  # [N, S]
    top = scores.topk(det.num_queries, dim=1).values  # [N, Q]
    same = (scores[:, None, :] - top[..., None]).abs() <= 1e-6 * top.abs().clamp_min(1)[..., None]
    return same.sum(-1) == 1


def export_onnx(det: DetrDetector, path: Path, size: int, opset: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Legacy-trace ``det`` to ``path`` with a batch of 2 (the second image's right quarter padded); returns the
    graph's description for ``model.onnx.json`` and the example input it was traced on."""
    kind = onnx_kind(det)
    dtype = torch.float32
    m = det.variant.input_multiple(det.model)  # windowed ViTs (LW-DETR, RF-DETR): multiples of patch x windows
    size = -(-size // m) * m
    det.variant.check_input_size(det.model, size, size)
    feeds = example_input(det, size, dtype)
    spatial = kind == "dynamic"
    axes = {
        "pixel_values": {0: "batch", **({2: "height", 3: "width"} if spatial else {})},
        "pixel_mask": {0: "batch", **({1: "height", 2: "width"} if spatial else {})},
        "logits": {0: "batch"},
        "pred_boxes": {0: "batch"},
    }
    axes = {k: v for k, v in axes.items() if k in feeds or k in ("logits", "pred_boxes")}
    with det.variant.onnx_context(det.model, size):
        trace(DetrOnnx(det.model).eval(), tuple(feeds.values()), path, list(feeds), ["logits", "pred_boxes"], axes,
              opset)
    hw: list[Any] = ["height", "width"] if spatial else [size, size]
    softmax = det.logit_kind == "softmax"
    classes = det.num_classes + (1 if softmax else 0)
    meta = graph_meta(det, kind, size, opset)
    square = det.variant.square_input
    meta.update(
        inputs=[
            {"name": "pixel_values", "dtype": str(dtype).removeprefix("torch."), "shape": ["batch", 3, *hw],
             "description": "RGB in [0, 1], resized so the longer side is imgsz, then (x - image_mean) / image_std; "
                            "0 on padding" + (" (padded at the bottom/right to a square)" if square else "")},
            {"name": "pixel_mask", "dtype": "int64", "shape": ["batch", *hw],
             "description": "1 on valid pixels, 0 on padding (all ones for an unpadded image)"},
        ][: 1 if square else 2],
        outputs=[
            {"name": "logits", "shape": ["batch", det.num_queries, classes],
             "description": ("class logits; scores = softmax over the last axis without the last (no-object) class"
                             if softmax else "class logits; scores = sigmoid (top-k over queries x classes)")},
            {"name": "pred_boxes", "shape": ["batch", det.num_queries, 4],
             "description": "boxes (cx, cy, w, h) in [0, 1], relative to the "
                            + ("whole square input" if square else "valid (unpadded) image region")},
        ],
        normalization={"image_mean": list(det.image_mean), "image_std": list(det.image_std),
                       "applied": "outside the graph, by the caller"},
        box_format="cxcywh normalised to [0, 1] of the " + ("square input" if square else "valid image region"),
        scores="softmax, last class = no-object" if softmax else "sigmoid",
        square_input=bool(square),
    )
    return meta, feeds


def as_stock_transformers(det: DetrDetector) -> str | None:
    """Make ``det.model`` the network plain transformers builds from the exported ``config.json``; returns a note
    for the user when the model had to be rebuilt, else None.

    A timm backbone whose activations kdctl restores with hooks (MobileNet-V2 and the rest of timm's EfficientNet
    family) is rebuilt with the timm backbone option ``freeze_batch_norm_2d``
    (:func:`kdctl.models.detr.backbone.stock_transformers_model`), whose frozen norms keep their activation in stock
    transformers. The rebuilt model is checked against kdctl's on a fixed example batch (max abs diff of the raw
    logits and boxes within :data:`HF_TOLERANCE`), else one KdctlError line naming the formats that work.
    """
    stock = stock_transformers_model(det.model)
    if stock is det.model:
        return None
    feeds = example_input(det, 64, torch.float32)
    with torch.no_grad():
        ours, theirs = DetrOnnx(det.model.eval())(**feeds), DetrOnnx(stock)(**feeds)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    if not diff <= HF_TOLERANCE:
        raise KdctlError(f"plain transformers cannot compute this {det.architecture}'s timm backbone as kdctl does "
                         f"(max abs diff {diff:.2e}); use --format onnx or --format safetensors (kdctl.load)")
    det.model = stock
    return (f"timm backbone norms saved with freeze_batch_norm_2d: transformers keeps their activations and "
            f"computes kdctl's network (logits and boxes max abs diff {diff:.1e} on a 2x3x64x64 batch)")


def save_kdctl_config(det: DetrDetector, out: Path) -> None:
    """Write kdctl.json next to the saved model; the image processor config is removed when the normalisation is
    the variant's default (kdctl.json then says all)."""
    write_kdctl_config(out, {
        "format": "kdctl", "version": 1, "family": det.family, "architecture": det.architecture,
        "label_names": list(det.label_names), "imgsz": det.imgsz, "weights_file": "model.safetensors",
        "image_mean": list(det.image_mean), "image_std": list(det.image_std),
    })
    default_norm = det.image_mean == tuple(det.variant.image_mean) and det.image_std == tuple(det.variant.image_std)
    proc = out / "preprocessor_config.json"
    if default_norm and proc.is_file():
        proc.unlink()


__all__ = ["HF_TOLERANCE", "DetrOnnx", "as_stock_transformers", "comparable_queries", "example_input", "export_onnx", "onnx_kind",
           "reference_outputs", "save_kdctl_config"]
