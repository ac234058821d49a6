"""What each CNN architecture is, declared once: one :class:`CnnArchitecture` per detector type.

Read by kdctl's builder (:mod:`kdctl.models.cnn.presets`: detector class, FPN levels, extra options), the recipe
choice (:func:`recipe_for`), DRKD's default weights (:func:`architecture_of`) and ONNX export (``onnx``).
Adding an architecture of the CNN family is one entry in :data:`ARCHITECTURES` (plus a recipe if it needs one).

No torch import: the CLI and the registry may read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CnnArchitecture:
    """One CNN detector type: kdctl's builder ``name`` and the prefix of torchvision's builders of that type.

    Attributes:
        name: kdctl builder name (``architecture`` of a preset) = torchvision builder prefix (``fasterrcnn_...``).
        detector: the ``torchvision.models.detection`` class kdctl's builder instantiates.
        fpn: FPN levels of kdctl's builder: ``"c2-p6"`` (C2..C5 + max-pool P6, strides 4..64) or ``"c3-p7"``
            (C3..C5 + P6, P7 from P5, strides 8..128).
        options: config keys only this architecture takes (besides the detector class keywords and the backbone
            keys): ``representation_size`` (narrower box head), ``head_norm`` (GroupNorm head towers).
        fpn_channel_multiple: ``fpn_channels`` must be a multiple of this (FCOS' GroupNorm head: 32).
        recipes: recipes picked, first available, when ``--recipe`` is not given (else the family's recipe).
        drkd_weights: DRKD's official (pixel, relation, instance) loss weights for a student of this type.
        onnx: ONNX graph kind (``"one-image"``: batch 1, height/width dynamic, post-processed), None: unsupported.
    """

    name: str
    detector: str
    fpn: str
    drkd_weights: tuple[float, float, float]
    recipes: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    fpn_channel_multiple: int = 1
    onnx: str | None = "one-image"


ARCHITECTURES: dict[str, CnnArchitecture] = {a.name: a for a in (
    CnnArchitecture("fasterrcnn", "FasterRCNN", "c2-p6", (1e-3, 4e-3, 2.4e-3), recipes=("fasterrcnn",),
                    options=("representation_size",)),
    CnnArchitecture("retinanet", "RetinaNet", "c3-p7", (4e-3, 5e-3, 6e-3), recipes=("retinanet",),
                    options=("head_norm",)),
    CnnArchitecture("fcos", "FCOS", "c3-p7", (4e-3, 5e-3, 6e-3), recipes=("fcos", "retinanet"),
                    fpn_channel_multiple=32),
)}
DEFAULT_ARCHITECTURE = "fasterrcnn"  # DRKD's weights for a student of no known type


def architecture_of(architecture: str) -> CnnArchitecture | None:
    """The declaration of a kdctl builder or torchvision builder name (``retinanet_resnet50_fpn_v2`` ->
    retinanet): the one whose name occurs in it (case-insensitive); None for a non-CNN architecture."""
    arch = str(architecture).lower()
    return next((a for a in ARCHITECTURES.values() if a.name in arch), None)


def recipe_for(architecture: str, available: Iterable[str]) -> str | None:
    """The recipe for a model of ``architecture`` when ``--recipe`` is not given: the first of its declared
    ``recipes`` in ``available``; None when it has none there (the caller then uses the family's recipe)."""
    a = architecture_of(architecture)
    have = set(available)
    return next((r for r in a.recipes if r in have), None) if a else None


__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "CnnArchitecture", "architecture_of", "recipe_for"]
