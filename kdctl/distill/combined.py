"""Method combinations: ``--method drkd+pred-kd`` (any methods joined by ``+``) as one Distiller.

Each part is the method's own Distiller, built with its own ``[kd.<method>]`` recipe table; the combination holds
them in an ``nn.ModuleDict`` (so every part's trainable modules are optimised and checkpointed, under
``parts.<method>.``). Per step each part gets its own teacher taps and returns its own ``kd_*`` terms; the terms
are logged separately (``metrics.jsonl``), so two parts must not return the same key (refused at the first step).

The student's label space: the part that needs the teacher's (:attr:`Distiller.same_label_space`, KD-DETR) sets it
for all, else the first part's :meth:`Distiller.student_setup`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.distill.base import Distiller
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput


class Combined(Distiller):
    """Several KD methods at once (see the module docstring); subclasses made by :func:`combined_class` bind
    ``part_classes``.

    Args:
        parts: per method name, its keyword options (the ``[kd.<method>]`` table).
    """

    name: ClassVar[str] = "combined"
    part_classes: ClassVar[tuple[type[Distiller], ...]] = ()

    def __init__(self, teacher: Detector, student: Detector, *, parts: dict[str, dict[str, Any]] | None = None,
                 **unknown: Any) -> None:
        if unknown:
            raise KdctlError(f"{self.name}: options go in each method's own [kd.<method>] table, not "
                             f"{', '.join(sorted(unknown))}")
        super().__init__(teacher, student)
        options = parts or {}
        self.parts = nn.ModuleDict({cls.name: cls(teacher, student, **options.get(cls.name, {}))
                                    for cls in self.part_classes})

    @classmethod
    def student_setup(cls, teacher: Detector, dataset_names: list[str]) -> tuple[list[str], dict[str, Any]]:
        lead = next((c for c in cls.part_classes if c.same_label_space), cls.part_classes[0])
        return lead.student_setup(teacher, dataset_names)

    def kd_tables(self) -> dict[str, dict[str, Any]]:
        """Every part's ``[kd.<method>]`` table as run."""
        return {k: v for part in self.parts.values() for k, v in part.kd_tables().items()}

    def teacher_taps(self, batch: Batch) -> dict[str, Any]:
        """Per part, its own teacher taps: ``{method: taps}``."""
        return {name: part.teacher_taps(batch) for name, part in self.parts.items()}

    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """Every part's ``kd_*`` terms, side by side."""
        terms: dict[str, Tensor] = {}
        for name, part in self.parts.items():
            out = part(student_out, teacher_taps[name], batch)
            clash = sorted(set(out) & set(terms))
            if clash:
                raise KdctlError(f"{self.name}: {name} returns the term(s) {', '.join(clash)} another part returns")
            terms.update(out)
        return terms


def combined_class(classes: list[type[Distiller]], name: str) -> type[Combined]:
    """A :class:`Combined` subclass over ``classes`` (at least two), named ``name`` (e.g. ``"drkd+pred-kd"``)."""
    if len(classes) < 2:
        raise KdctlError(f"a combination needs two or more methods, got {name!r}")
    optim: dict[str, Any] = {}
    for c in classes:  # every part's requirements (the tightest clipping where two ask for one)
        for key, value in c.optim_defaults.items():
            optim[key] = min(optim[key], value) if key in optim else value
    return type("Combined", (Combined,), {"name": name, "part_classes": tuple(classes), "optim_defaults": optim,
                                          "same_label_space": any(c.same_label_space for c in classes)})
