"""ONNX graphs of the CNN detectors (Faster R-CNN, RetinaNet, FCOS): one image in, post-processed detections out.

``images`` [1, 3, H, W] float32 0-1 RGB (normalised inside the graph), H and W dynamic, ONE image per run; outputs
``boxes`` [D, 4] xyxy pixels of the input, ``scores`` [D], ``labels`` [D] (indices into ``label_names``), score
threshold :data:`SCORE_THRESHOLD` and at most :data:`MAX_DETECTIONS` detections as in
:meth:`kdctl.models.base.Detector.predict`. The generic flow (output directory, parity check, metadata file) is
:mod:`kdctl.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdctl.models.cnn.adapter import TorchvisionDetector
from kdctl.models.onnx_common import graph_meta, trace

SCORE_THRESHOLD = 0.001
MAX_DETECTIONS = 100


class CnnOnnx(nn.Module):
    """images [1, 3, H, W] 0-1 -> boxes [D, 4] xyxy, scores [D], labels [D] (indices into label_names).

    Call it inside :meth:`TorchvisionDetector.postprocessing` (threshold, detection count, no background).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        det = self.model([images[0]])[0]
        return det["boxes"], det["scores"], det["labels"] - 1


def example_input(size: int) -> dict[str, Tensor]:
    """A deterministic non-square 0-1 image [1, 3, h, size] (h ~ 3/4 size): both sides stay dynamic."""
    g = torch.Generator().manual_seed(0)
    h = max(64, (size * 3 // 4) // 32 * 32)
    return {"images": torch.rand((1, 3, h, size), generator=g)}


def reference_outputs(det: TorchvisionDetector, feeds: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """What the graph computes, in PyTorch: (boxes, scores, labels) of ``feeds["images"]``."""
    with torch.no_grad(), det.postprocessing(SCORE_THRESHOLD, MAX_DETECTIONS):
        return CnnOnnx(det.model)(*feeds.values())


def export_onnx(det: TorchvisionDetector, path: Path, size: int, opset: int
                ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Legacy-trace ``det`` on one 0-1 image (pre- and post-processing inside the graph) to ``path``; returns the
    graph's description for ``model.onnx.json`` and the example input it was traced on."""
    feeds = example_input(size)
    axes = {"images": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
            "labels": {0: "detections"}}
    with det.postprocessing(SCORE_THRESHOLD, MAX_DETECTIONS):
        trace(CnnOnnx(det.model).eval(), tuple(feeds.values()), path, list(feeds), ["boxes", "scores", "labels"],
              axes, opset)
    t = det.model.transform
    meta = graph_meta(det, "one-image", size, opset)
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
        box_format="xyxy pixels of the input image",
        scores="post-processed (NMS inside the graph)",
        score_threshold=SCORE_THRESHOLD,
        max_detections=MAX_DETECTIONS,
    )
    return meta, feeds


__all__ = ["MAX_DETECTIONS", "SCORE_THRESHOLD", "CnnOnnx", "example_input", "export_onnx", "reference_outputs"]
