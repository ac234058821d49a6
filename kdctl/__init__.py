"""kdctl: distil object detectors (torchvision CNN detectors, transformers DETR family) into smaller students.

The package import is light: torch and transformers are imported only by the functions that need them,
so ``kdctl --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector


def load(spec: str, **kwargs: Any) -> Detector:
    """Load a detector from a spec string (hub id, local dir, run dir, ``torchvision:NAME`` or preset).

    >>> import kdctl
    >>> det = kdctl.load("runs/distill/exp")               # doctest: +SKIP
    >>> det.predict_images(["image.jpg"])                  # doctest: +SKIP
    [{'boxes': [[x0, y0, x1, y1], ...], 'scores': [...], 'labels': [...], 'names': [...]}]

    Keyword arguments are passed to :func:`kdctl.specs.load_detector`.
    """
    from kdctl.specs import load_detector

    return load_detector(spec, **kwargs)


__all__ = ["__version__", "load"]
