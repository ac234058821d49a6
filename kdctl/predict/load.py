"""The model ``kdctl predict --model SPEC`` runs: an exported ONNX graph in onnxruntime, or any kdctl spec."""

from __future__ import annotations

from typing import Any


def load_predictor(spec: str, *, device: str = "auto", trust_remote_code: bool = False) -> Any:
    """An :class:`~kdctl.predict.onnx_runner.OnnxDetector` for a ``.onnx`` file or a ``kdctl export --format
    onnx`` directory, else the :class:`~kdctl.models.base.Detector` the spec names (a run dir: its ``best/``,
    else ``last/``), in eval mode on ``device``."""
    from kdctl.engine.rundir import resolve_device
    from kdctl.predict.onnx_runner import OnnxDetector, onnx_path

    dev = resolve_device(device)
    path = onnx_path(spec)
    if path is not None:
        return OnnxDetector(path, dev)
    from kdctl.specs import load_detector

    det = load_detector(spec, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    return det.to(dev).eval()


__all__ = ["load_predictor"]
