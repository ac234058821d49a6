"""What a model spec resolves to (:func:`kdctl.specs.resolve`), handed to a family's loader.

Torch-free: resolving a spec (and ``kdctl --help``) never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Resolved:
    """A spec resolved to what must be built.

    kind: "hf_dir" | "kdctl_dir" | "torchvision" | "preset" (hub ids resolve to one of the dir kinds).
    family: "cnn" or "detr" (see :mod:`kdctl.models.registry`).
    architecture: HF class name (``DetrForObjectDetection``), torchvision builder
        (``fasterrcnn_resnet50_fpn``) or kdctl builder (``fasterrcnn``).
    path: the local directory for dir kinds (a hub snapshot for hub ids).
    weights: torchvision weights enum name or file, if any.
    config: the preset's ``[config]`` table, or the kdctl.json contents.
    """

    spec: str
    kind: str
    family: str
    architecture: str
    path: Path | None = None
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    imgsz: int | None = None
    description: str = ""
    hub_id: str | None = None
