"""The Distiller contract and the method choice.

A Distiller is an ``nn.Module`` holding the KD method's own trainable parts (GloRe units, adapters, ...). The
engine optimises them with the student and saves them in the run checkpoint; they are never exported with the
student. The teacher is held by reference (not registered as a submodule): it is frozen, in eval mode, and runs
under ``no_grad`` on the student's device.

Per step the engine calls::

    out = student.forward_train(batch)                  # student losses + taps, one pass
    with torch.no_grad(): t = distiller.teacher_taps(batch)
    kd_terms = distiller(out, t, batch)                 # {"kd_<term>": weighted scalar}, summed into the loss

Adding a method: one file in ``kdctl/distill`` with a Distiller subclass, one line in
``kdctl.models.registry.METHODS``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput


class Distiller(nn.Module):
    """Base class of KD methods.

    Args:
        teacher: the frozen teacher (moved to the student's device, eval mode, no grad).
        student: the student being trained (the distiller may read its structure, e.g. channel counts).
        weights: loss weights from the recipe's ``[kd.<method>]`` table (method-specific keys).
    """

    name: ClassVar[str] = "?"
    same_label_space: ClassVar[bool] = False
    # recipe [optim] values the method's published configuration relies on; a run applies each one its recipe
    # leaves off (0 / unset), and says so (e.g. MGD: gradient clipping at norm 35)
    optim_defaults: ClassVar[dict[str, Any]] = {}
    """True: the student must have exactly the teacher's labels (what :meth:`student_setup` returns); a student
    labelled otherwise gets a new head for them (``--head``, :func:`kdctl.engine.build.fit_head`)."""

    def __init__(self, teacher: Detector, student: Detector, **weights: Any) -> None:
        super().__init__()
        object.__setattr__(self, "teacher", teacher)  # a reference, not a submodule: never saved or optimised
        self.weights = dict(weights)

    @classmethod
    def student_setup(cls, teacher: Detector, dataset_names: list[str]) -> tuple[list[str], dict[str, Any]]:
        """Label names for the student and preset overrides for a student built from a preset (default: the
        dataset's classes, which a student from a checkpoint must cover, else it gets a new head for them).

        KD-DETR, for instance, gives the student the teacher's label space (:attr:`same_label_space`: a student
        labelled otherwise is re-headed to it) and, for a preset student, the teacher's query count.
        """
        return list(dataset_names), {}

    @torch.no_grad()
    def teacher_taps(self, batch: Batch) -> dict[str, Any]:
        """The teacher's KD internals for ``batch`` (no_grad; not inference_mode, whose tensors cannot be saved
        for the backward of the distiller's own trainable modules)."""
        return self.teacher.forward_taps(batch)

    def kd_tables(self) -> dict[str, dict[str, Any]]:
        """The ``[kd.<method>]`` tables as run (the recipe's keys completed with the method's defaults), per method
        name, for the run's ``config.toml``."""
        return {self.name: dict(self.weights)}

    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """Weighted KD terms, each a scalar tensor with a key starting with ``kd_``."""
        raise NotImplementedError  # pragma: no cover - abstract


def choose_method(method: str, teacher_family: str, student_family: str, teacher_arch: str = "",
                  student_arch: str = "") -> str:
    """Resolve ``--method`` (auto|none|a method|methods joined by ``+``, e.g. ``drkd+pred-kd``) for a pair; an
    unsupported pair is one clear KdctlError. In a combination ``auto`` is the pair's own method."""
    from kdctl.models.registry import METHODS, fits, method_for_pair, supported_pairs

    method = method.lower().replace("_", "-")
    if "+" in method:
        parts = [choose_method(p.strip(), teacher_family, student_family, teacher_arch, student_arch)
                 for p in method.split("+")]
        if "none" in parts or len(set(parts)) != len(parts):
            raise KdctlError(f"--method {method}: a combination names different methods, none of them 'none'")
        return "+".join(parts)
    if method == "none":
        return "none"
    if method == "auto":
        chosen = method_for_pair(teacher_family, student_family)
        if chosen is None:
            raise KdctlError(
                f"no KD method for teacher {teacher_arch or teacher_family} ({teacher_family}) and student "
                f"{student_arch or student_family} ({student_family}); supported pairs: {supported_pairs()}"
            )
        return chosen
    if method not in METHODS:
        raise KdctlError(f"unknown --method {method!r}; choose auto, none, one of {', '.join(METHODS)} or a "
                         "combination such as drkd+pred-kd")
    t, s, _ = METHODS[method]
    if not fits(method, teacher_family, student_family):
        raise KdctlError(
            f"--method {method} needs a {t} teacher and a {s} student, got {teacher_arch or teacher_family} "
            f"({teacher_family}) and {student_arch or student_family} ({student_family})"
        )
    return method


def distiller_class(method: str) -> type[Distiller]:
    """The Distiller class of a resolved method (a combination ``a+b``: :data:`kdctl.models.registry.COMBINATION`)."""
    from kdctl.models.registry import COMBINATION, METHODS, import_string

    if "+" in method:
        return import_string(COMBINATION)([distiller_class(m) for m in method.split("+")], method)

    try:
        return import_string(METHODS[method][2])
    except (ImportError, AttributeError) as e:
        raise KdctlError(f"KD method {method!r} is not available in this version of kdctl ({e})") from e


def method_options(kd: dict[str, Any], method: str) -> dict[str, Any]:
    """The keyword options of ``method``'s Distiller from the recipe's ``[kd]`` tables: ``[kd.<method>]``; for a
    combination, each part's own table (``{"parts": {"drkd": {...}, "pred-kd": {...}}}``)."""
    if "+" in method:
        return {"parts": {m: dict(kd.get(m, {})) for m in method.split("+")}}
    return dict(kd.get(method, {}))
