"""What KD-DETR needs from a DETR (:class:`KDDetrModel`) and which teacher/student pairs it refuses
(:func:`check_pair`); the method itself is :mod:`kdctl.distill.kd_detr`."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from kdctl.data.batch import Batch
from kdctl.errors import KdctlError
from kdctl.models.base import Detector


# =========================================================================== what KD-DETR needs from a DETR
@runtime_checkable
class KDDetrModel(Protocol):
    """A DETR-family detector KD-DETR can distil from or into (:class:`kdctl.models.detr.DetrDetector`).

    Taps and decoded outputs are as :mod:`kdctl.models.detr.adapter` describes them: logits [L, N, G, C'], boxes
    [L, N, G, 4] normalised cxcywh, every decoder layer (last = final).
    """

    family: ClassVar[str]
    architecture: str
    label_names: list[str]

    @property
    def logit_kind(self) -> str:
        """"softmax" (C' = classes + no-object) or "sigmoid" (C' = classes)."""
        ...

    @property
    def query_kind(self) -> str:
        """"embed", "embed2" or "anchor4": the format of the queries :meth:`decode_groups` takes."""
        ...

    @property
    def query_dim(self) -> int: ...

    @property
    def query_parts(self) -> int:
        """How many independent embeddings one query concatenates ("embed2": position | content = 2)."""
        ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def num_queries(self) -> int: ...

    def learned_queries(self) -> Tensor:
        """The model's own queries [Q, D]."""
        ...

    def check_decodable(self) -> None:
        """One KdctlError line when the model cannot decode custom queries."""
        ...

    def forward_taps(self, batch: Batch) -> dict[str, Any]:
        """Taps of a normal forward: logits, boxes, queries, reference_points, memory, decoder_kwargs."""
        ...

    def decode(self, taps: dict[str, Any], queries: Tensor, memory_index: Tensor | None = None
               ) -> dict[str, Tensor]: ...

    def decode_groups(self, taps: dict[str, Any], groups: list[Tensor],
                      reference_points: list[Tensor | None] | None = None,
                      memory_index: list[Tensor | None] | None = None) -> list[dict[str, Tensor]]:
        """Each query group in its own decoder pass over the taps' memory; optional reference points per group;
        "proposal" queries: optional memory positions per group to read the content at (else the box centres)."""
        ...


# =========================================================================== compatibility
def check_pair(teacher: Detector, student: Detector) -> None:
    """Refuse, with one line, a teacher/student pair KD-DETR cannot distil."""
    for role, det in (("teacher", teacher), ("student", student)):
        if det.family != "detr" or not isinstance(det, KDDetrModel):
            raise KdctlError(f"kd-detr needs DETR-family models; the {role} is a {det.architecture} ({det.family})")
        det.check_decodable()
    t, s = teacher, student
    if list(t.label_names) != list(s.label_names):
        raise KdctlError(
            f"kd-detr: teacher and student label spaces differ (teacher {len(t.label_names)} labels "
            f"{_short(t.label_names)}, student {len(s.label_names)} {_short(s.label_names)}); they must have the same "
            "names in the same order (build the student from a preset to inherit the teacher's labels)"
        )
    if t.logit_kind != s.logit_kind:
        raise KdctlError(
            f"kd-detr: teacher {t.architecture} classifies with {t.logit_kind} and student {s.architecture} with "
            f"{s.logit_kind}; their class outputs cannot be distilled (pick a student of the same kind)"
        )
    if t.query_kind != s.query_kind:
        raise KdctlError(
            f"kd-detr: teacher {t.architecture} uses {t.query_kind} queries and student {s.architecture} "
            f"{s.query_kind} queries; distillation points cannot be shared (pick a student with the same query kind)"
        )


def _short(names: list[str], n: int = 4) -> str:
    return "[" + ", ".join(names[:n]) + (", ...]" if len(names) > n else "]")
