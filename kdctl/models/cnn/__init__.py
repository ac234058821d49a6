"""The CNN family: torchvision Faster R-CNN, RetinaNet and FCOS behind the kdctl Detector contract.

=====================  ======================================================================================
``architectures.py``   what each architecture is, declared once (:data:`ARCHITECTURES`; no torch)
``adapter.py``         :class:`TorchvisionDetector`: the Detector contract, KD taps, save
``build.py``           :func:`load`: torchvision builders and weights enums, kdctl presets, saved directories
``presets.py``         kdctl's own builders: backbones, FPN, norms, MobileNet width
``onnx.py``            the one-image ONNX graph and its export
=====================  ======================================================================================

Importing this package is light (no torch): :func:`load` and :class:`TorchvisionDetector` are imported on first
use, so the CLI and the registry may read the architecture declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdctl.models.cnn.architectures import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    CnnArchitecture,
    architecture_of,
    recipe_for,
)

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.cnn.adapter import TorchvisionDetector
    from kdctl.models.cnn.build import load

_LAZY = {"load": "kdctl.models.cnn.build", "TorchvisionDetector": "kdctl.models.cnn.adapter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "CnnArchitecture", "TorchvisionDetector", "architecture_of",
           "load", "recipe_for"]
