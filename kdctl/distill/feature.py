"""What the FPN feature-imitation methods share (CWD, PKD, MGD): level matching, 1x1 adapters, options.

A :class:`FeatureDistiller` distils the FPN levels teacher and student share (matched by stride, as DRKD) -- all of
them, or the ``levels`` finest -- and sums one loss per level into a single term ``kd_<method>``. Where the FPN
widths differ, a 1x1 convolution per level (``align``, student channels -> teacher channels, the authors' own
"align" connector) maps the student's map into the teacher's space; equal widths get none (as the authors' code).
The adapters, and any module a method adds (MGD's generators), are trainable parts of the distiller: optimised with
the student, saved with the run (``trainer.pt``), never exported.

Per method, the published hyper-parameters are declared per student architecture (``DEFAULTS``: Faster R-CNN,
RetinaNet, FCOS); the recipe's ``[kd.<method>]`` table overrides any of them.

Supported pairs: any two kdctl CNN detectors (``fpn_strides``, ``fpn_channels``; taps ``features``) sharing at
least one FPN stride.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.distill.base import Distiller
from kdctl.distill.drkd import crop_common
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.cnn.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, architecture_of

# option kinds: how a [kd.<method>] value is checked and converted
KINDS = {
    "weight": "a finite number >= 0",
    "positive": "a finite number > 0",
    "fraction": "a number in [0, 1)",
    "levels": "an integer >= 0 (0: every shared level)",
    "bool": "true or false",
}


def check_option(method: str, key: str, value: Any, kind: str) -> Any:
    """A ``[kd.<method>]`` value converted to its kind, or one KdctlError naming the key and what it must be."""
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "levels":
            if isinstance(value, bool) or int(value) != value or int(value) < 0:
                raise ValueError
            return int(value)
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
        ok = {"weight": x >= 0, "positive": x > 0, "fraction": 0 <= x < 1}[kind]
        if not (math.isfinite(x) and ok):
            raise ValueError
        return x
    except (TypeError, ValueError):
        raise KdctlError(f"[kd.{method}] {key} must be {KINDS[kind]}, got {value!r}") from None


def fpn_levels(teacher: Any, student: Any, method: str, count: int = 0) -> list[int]:
    """Strides both models have, fine to coarse; the ``count`` finest (0: all). No common stride: KdctlError."""
    found = []
    for role, model in (("teacher", teacher), ("student", student)):
        strides = getattr(model, "fpn_strides", None)
        if not strides or not getattr(model, "fpn_channels", None):
            raise KdctlError(f"{method}: the {role} ({getattr(model, 'architecture', type(model).__name__)}) exposes "
                             f"no FPN levels; {method} needs a CNN detector with an FPN")
        found.append([int(x) for x in strides])
    shared = sorted(set(found[0]) & set(found[1]))
    if not shared:
        raise KdctlError(f"{method}: teacher FPN strides {found[0]} and student FPN strides {found[1]} share none; "
                         f"{method} needs at least one common FPN level")
    return shared[:count] if count > 0 else shared


def level_key(stride: int) -> str:
    return f"s{stride}"


def wide(x: Tensor) -> Tensor:
    """x in float32 (float64 stays float64): losses are never computed in 16 bits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FeatureDistiller(Distiller):
    """Base of the FPN feature-imitation methods: subclasses declare ``OPTIONS`` / ``DEFAULTS`` and
    :meth:`level_loss`.

    Args:
        teacher, student: kdctl CNN detectors.
        **options: the recipe's ``[kd.<method>]`` values (unknown keys are refused); missing ones take the
            published value for the student's architecture (``DEFAULTS``).
    """

    OPTIONS: ClassVar[dict[str, str]] = {}
    """option name -> kind (see :data:`KINDS`); every method also has ``levels``."""
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    """student architecture name -> default option values (published hyper-parameters)."""

    def __init__(self, teacher: Detector, student: Detector, **options: Any) -> None:
        values = self.resolve_options(student, options)
        super().__init__(teacher, student, **values)
        self.options = values
        self.strides = fpn_levels(teacher, student, self.name, values["levels"])
        cs, ct = int(student.fpn_channels), int(teacher.fpn_channels)
        self.channels = (cs, ct)
        self.align = (nn.ModuleDict({level_key(s): nn.Conv2d(cs, ct, 1) for s in self.strides}) if cs != ct
                      else None)

    @classmethod
    def resolve_options(cls, student: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The method's option values: the given ones checked, the others from ``DEFAULTS`` for the student's
        architecture (a student of no known type: Faster R-CNN's, as DRKD)."""
        kinds = {**cls.OPTIONS, "levels": "levels"}
        unknown = sorted(set(options) - set(kinds))
        if unknown:
            raise KdctlError(f"[kd.{cls.name}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(kinds)}")
        arch = architecture_of(str(getattr(student, "architecture", ""))) or ARCHITECTURES[DEFAULT_ARCHITECTURE]
        defaults = cls.DEFAULTS[arch.name]
        return {k: check_option(cls.name, k, options[k] if k in options else defaults[k], kind)
                for k, kind in kinds.items()}

    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """``{"kd_<method>": sum over the distilled levels of the weighted level losses}`` (float32 scalar; float64 for float64 maps)."""
        s_feats, t_feats = student_out.taps["features"], teacher_taps["features"]
        losses = []
        for stride in self.strides:
            s, t = crop_common(s_feats[stride], t_feats[stride])
            losses.append(self.level_loss(level_key(stride), stride, s, t))
        return {f"kd_{self.name}": torch.stack(losses).sum()}

    def aligned(self, key: str, s: Tensor) -> Tensor:
        """Student map [N, Cs, h, w] in the teacher's channels [N, Ct, h, w] (unchanged when the widths match)."""
        return s if self.align is None else self.align[key](s)

    def level_loss(self, key: str, stride: int, s: Tensor, t: Tensor) -> Tensor:
        """Weighted loss of one level: student map s [N, Cs, h, w] (with graph), teacher map t [N, Ct, h, w]
        (no graph) -> float32 scalar."""
        raise NotImplementedError  # pragma: no cover - abstract
