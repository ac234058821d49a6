"""Run a graph written by ``kdctl export --format onnx`` in onnxruntime, behind kdctl's prediction contract.

:class:`OnnxDetector` reads what the graph needs from its own ``metadata_props`` (class names, input size,
normalisation, box format, score kind; :func:`kdctl.onnx_deploy.read_metadata`), else from ``model.onnx.json``
beside it, and turns a :class:`kdctl.data.batch.Batch` into the graph's inputs and its outputs into detections as
:meth:`kdctl.models.base.Detector.predict` returns them (xyxy boxes in original pixels, scores, label indices).

* DETR family: ``pixel_values`` normalised and zero on padding, ``pixel_mask``; "fixed-size" graphs (Deformable
  DETR) get the batch padded to imgsz x imgsz; square-input graphs (RT-DETR) a square, boxes relative to it. Raw
  logits become detections as the PyTorch adapter does (softmax without the no-object class / sigmoid top-k).
* CNN detectors: one image per run (post-processing inside the graph), unpadded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdctl.boxes import cxcywh_to_xyxy
from kdctl.data.batch import Batch
from kdctl.errors import KdctlError
from kdctl.io import read_json
from kdctl.models.detr.outputs import sigmoid_detections, softmax_detections
from kdctl.onnx_check import ort_session, run_onnx, session_provider
from kdctl.onnx_deploy import read_metadata

ONNX_FILE, ONNX_META = "model.onnx", "model.onnx.json"


def onnx_path(spec: str | Path) -> Path | None:
    """The ``.onnx`` file a spec names (the file, or ``DIR/model.onnx`` of a directory without a PyTorch model),
    else None."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        return p
    if p.is_dir() and (p / ONNX_FILE).is_file() and not any((p / f).exists() for f in ("kdctl.json", "config.json")):
        return p / ONNX_FILE
    return None


class OnnxDetector:
    """An exported kdctl graph in onnxruntime with ``predict(batch, score_threshold, max_detections)``."""

    family = "onnx"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = Path(path)
        meta = read_metadata(self.path)
        side = self.path.with_name(ONNX_META)
        if meta is None and side.is_file():
            meta = read_json(side, "kdctl ONNX description")
        if meta is None or "label_names" not in meta:
            raise KdctlError(f"{self.path}: not a graph kdctl exported (no kdctl metadata_props and no {ONNX_META} "
                             "beside it); export it with kdctl export --format onnx")
        self.meta = meta
        self.label_names = list(meta["label_names"])
        self.imgsz = int(meta["imgsz"])
        self.graph_family = meta["family"]
        self.architecture = f"{meta['architecture']} (ONNX)"
        self.square = bool(meta.get("square_input"))
        self.fixed = "fixed" in meta.get("shapes", "")
        self.pad_stride = 32 if (self.square or self.graph_family == "cnn") else 1
        norm = meta.get("normalization", {})
        self.mean = torch.tensor(norm.get("image_mean") or [0.0, 0.0, 0.0]).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.get("image_std") or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
        self.sigmoid = meta.get("scores", "").startswith("sigmoid") or (
            "sigmoid" in str(meta.get("outputs", [{}])[0].get("description", "")))
        self.session = ort_session(self.path, device)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def provider(self) -> str:
        return session_provider(self.session)

    def predict(self, batch: Batch, score_threshold: float = 0.001, max_detections: int = 100) -> list[dict]:
        """Per image ``boxes`` [D, 4] xyxy in original pixels, ``scores`` [D], ``labels`` [D], best first."""
        batch = batch.to("cpu")
        raw = self._cnn(batch) if self.graph_family == "cnn" else self._detr(batch, score_threshold, max_detections)
        out = []
        for det, (sx, sy), (oh, ow) in zip(raw, batch.scales(), batch.orig_sizes, strict=True):
            boxes = det["boxes"].float() / torch.stack([sx, sy, sx, sy])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
            scores, labels = det["scores"].float(), det["labels"].long()
            m = scores > score_threshold
            order = scores[m].argsort(descending=True)[:max_detections]
            out.append({"boxes": boxes[m][order], "scores": scores[m][order], "labels": labels[m][order]})
        return out

    def _cnn(self, batch: Batch) -> list[dict[str, Tensor]]:
        dets = []
        for img, (h, w) in zip(batch.images, batch.sizes, strict=True):
            boxes, scores, labels = run_onnx(self.path, {"images": img[None, :, :h, :w]}, self.session)
            dets.append({"boxes": torch.as_tensor(boxes).float(), "scores": torch.as_tensor(scores).float(),
                         "labels": torch.as_tensor(labels).long()})
        return dets

    def detr_inputs(self, batch: Batch) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """The graph's feeds for ``batch`` and per image the (h, w) its normalised boxes are relative to."""
        images, mask = batch.images, batch.pixel_mask()
        h, w = images.shape[-2:]
        if self.square or self.fixed:
            side = self.imgsz if self.fixed else max(h, w)
            if max(h, w) > side:
                raise KdctlError(f"{self.path}: this graph takes {side}x{side} inputs only; predict with --imgsz {side}")
            images = torch.nn.functional.pad(images, (0, side - w, 0, side - h))
            mask = torch.nn.functional.pad(mask, (0, side - w, 0, side - h))
        pixels = ((images - self.mean) / self.std) * mask[:, None].to(images.dtype)
        feeds = {"pixel_values": pixels, "pixel_mask": mask}
        frames = [(images.shape[-2], images.shape[-1])] * len(batch) if self.square else list(batch.sizes)
        return {k: v for k, v in feeds.items() if k in self.input_names}, frames

    def _detr(self, batch: Batch, threshold: float, k: int) -> list[dict[str, Tensor]]:
        feeds, frames = self.detr_inputs(batch)
        logits, boxes = (torch.as_tensor(a).float() for a in run_onnx(self.path, feeds, self.session))
        dets = []
        for lg, bx, (h, w) in zip(logits, boxes, frames, strict=True):
            xyxy = cxcywh_to_xyxy(bx) * torch.tensor([w, h, w, h], dtype=bx.dtype)
            pick = sigmoid_detections if self.sigmoid else softmax_detections
            dets.append(pick(lg, xyxy, threshold, k))
        return dets

    def predict_paths(self, sources: list[str | Path], **kwargs: Any):
        """:func:`kdctl.predict.engine.predict_paths` with this graph (the same options)."""
        from kdctl.predict.engine import predict_paths

        return predict_paths(self, sources, **kwargs)


__all__ = ["OnnxDetector", "onnx_path"]
