"""What every family's ONNX export shares: the legacy tracer and the common part of ``model.onnx.json``.

Each family writes its own graph (:mod:`kdctl.models.cnn.onnx`, the DETRs' ``onnx`` module) with these; the
generic flow (formats, output directory, parity check, metadata file) is :mod:`kdctl.export`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

ONNX_FILE = "model.onnx"
SHAPES = {"dynamic": "batch, height and width dynamic",
          "fixed-size": "batch dynamic; height and width fixed at {size} (the graph is only valid there)",
          "one-image": "one image per run; height and width dynamic"}


def graph_meta(det: Detector, kind: str, size: int, opset: int) -> dict[str, Any]:
    """The family-independent part of ``model.onnx.json`` for a graph of ``kind`` traced at ``size``."""
    return {
        "format": "onnx", "file": ONNX_FILE, "opset": opset, "exporter": "torch.onnx.export(dynamo=False)",
        "family": det.family, "architecture": det.architecture, "dtype": "float32",
        "shapes": SHAPES[kind].format(size=size), "imgsz": size, "label_names": list(det.label_names),
    }


def trace(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
          axes: dict[str, dict[int, str]], opset: int) -> None:
    """``torch.onnx.export(dynamo=False)``; an exporter failure is one KdctlError line (a write error stays an
    OSError, for :func:`kdctl.export.writing_into` to report)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        except OSError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise KdctlError(f"ONNX export failed ({e.__class__.__name__}: {first})") from e


__all__ = ["ONNX_FILE", "graph_meta", "trace"]
