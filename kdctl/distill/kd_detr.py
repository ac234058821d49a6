"""KD-DETR: knowledge distillation for DETR-family detectors with consistent distillation points.

Wang et al., "Knowledge Distillation for Detection Transformer with Consistent Distillation Points Sampling"
(CVPR 2024). Reference code (DAB-DETR): GitHub ``Myleswork/KD-DETR``. This is an independent implementation on
top of :class:`kdctl.models.detr.DetrDetector`; see the project design note ``kd-detr.md``.

Idea. The teacher's and the student's predictions are tied to their own learned queries, so their output slots do
not correspond. KD-DETR feeds the SAME extra queries ("distillation points") to both decoders, each over its own
encoder memory, and distils the predictions slot by slot (no Hungarian matching):

* specific points: the teacher's own queries (``teacher_taps["queries"]``: its learned queries, or the per-image
  top-k proposals of a two-stage teacher). The targets are the teacher's normal detection outputs. Deformable DETR
  ("embed2" queries, whose reference points come from each model's own head): the student decodes the teacher's
  query embeddings at the TEACHER's reference points (``teacher_taps["reference_points"]``), so that both models
  decode the same point, the method's premise (the TPRD port does the same). RT-DETR ("proposal" queries: a
  pre-sigmoid box whose content each model builds from its OWN encoder memory): the teacher's top-k proposals per
  image; the student reads their content at the teacher's memory positions when the two memory layouts match (same
  feature sizes), by bilinear sampling at the box centres otherwise (:meth:`KDDETR.memory_index`).
* general points: ``num_general`` random queries drawn fresh every step with :func:`sample_queries` (shared by
  teacher and student, no gradient). The teacher decodes them in :meth:`KDDETR.teacher_taps`. Deformable DETR:
  each model derives the reference points of these random embeddings with its own head (as the TPRD port).
  RT-DETR: random boxes, each model sampling its own memory at their centres. Denoising queries never enter a tap.

Switches (``[kd.kd-detr]``, ablations of the paper): ``specific`` / ``general`` (either group off; not both),
``num_general`` (general points per step, default 300 as the reference), ``general_distribution`` ("normal": N(0, 1)
anchors, the reference code, default; "uniform": boxes uniform in [0, 1], the paper; embedding queries: the
learned queries' mean and std, Gaussian or uniform), ``normalize`` and ``sigmoid_kl`` (below).

Per step the teacher's backbone + encoder run once (``forward_taps``) plus one decoder pass for the general
points; the student's run once (``forward_train``) plus ONE batched decoder call for both groups
(``decode_groups``: each group in its own pass, no attention between groups or with the detection queries). The
groups exist only in training: the student's ``predict`` runs its own queries only.

Loss, per group (specific, general), summed over the groups; i = distillation point (all images x points),
t = teacher's FINAL layer, s = every student decoder layer (final and auxiliary, summed over layers)::

    w_i    = foreground weight of the teacher's prediction (detached)
    L_cls  = sum_i w_i * T^2 * mean_c KL_c(t_i || s_i)            (/ sum_i w_i when normalize = True)
    L_L1   = sum_i w_i * mean_4 |b_s,i - b_t,i| / sum_i w_i       (normalised cx, cy, w, h)
    L_GIoU = sum_i w_i * (1 - GIoU(b_s,i, b_t,i)) / sum_i w_i
    kd_cls = cls * L_cls,  kd_l1 = l1 * L_L1,  kd_giou = giou * L_GIoU      (defaults 1, 5, 2; T = 10)

``box = "distribution"`` (D-FINE / DEIMv2 pairs, whose boxes are edge distributions): the two box terms give way to
``kd_dist = dist * sum_i w_i * mean_4 KL(t'_i || s_i) / sum_i w_i`` (default dist 1.5, D-FINE's DDF weight), t' the
teacher's final-layer edge distributions re-expressed relative to the student's first-layer box
(:mod:`kdctl.distill.fdr`), s every student layer's. ``box = "boxes"`` (default) compares the decoded boxes.

Design choices (where the paper, the reference code and kdctl's model zoo leave room):

* Foreground weight. Sigmoid models: ``w_i = max_c sigmoid(t_ic)`` (reference code). Softmax DETR (C real classes +
  no-object): ``w_i = max_{c < C} softmax(t_i)_c``, the teacher's probability of its best REAL class, i.e. the
  score DETR's own post-processing gives the detection. The no-object class is left out so that a point the teacher
  calls background gets a small weight, which is what the sigmoid max means for the sigmoid models.
* Class term, softmax DETR: KL between the temperature softmaxes over all C + 1 classes (the no-object class is
  part of the distribution the model was trained with), averaged over the C + 1 terms, times T^2 (reference).
* Class term, sigmoid models (DAB, Deformable, Conditional): ``sigmoid_kl = "softmax"`` (default) is the reference
  code's term: KL between the temperature softmaxes over the C sigmoid logits, averaged over the C terms, times T^2,
  summed over points with the weights w_i. ``sigmoid_kl = "binary"`` (option) treats each class as the independent
  Bernoulli variable the focal loss trains, per class KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))), averaged over
  classes, times T^2 and times a per-point scale ``k_i`` (detached) that gives it the reference's gradient magnitude.
  Unscaled, its gradient ``T/C * (sigmoid(s/T) - sigmoid(t/T))`` per logit is about C/4 times the softmax form's
  (measured on focal-like logits, teacher N(-4, 2), student = teacher + N(0, 1), T = 10: 0.9x at C = 3, 4.9x at
  20, 19x at 80, 22x at 91), so with the reference weight ``cls = 1`` it would dominate on a COCO label space.
  Derivation of ``k_i``: near s = t both divergences are ``1/2 d^T F d`` in d = (s - t) / T, with gradient ``F d``;
  ``F = diag(p) - p p^T`` for the softmax form (p = softmax(t/T)) and ``diag(q (1 - q))`` for the binary one
  (q = sigmoid(t/T)). ``k_i = ||F_softmax||_F / ||F_binary||_F`` equalises the RMS gradient for an isotropic
  student error, at any C and any teacher distribution (measured ratio binary / reference 1.00 at C = 3, 1.02 at
  20, 80 and 91; tests/test_kd_detr.py::test_class_term_gradient_scale).
  The softmax form is blind to a shift of all C logits (likely why it passes on less of a sigmoid teacher's "no
  object here"): on the 3-class dab-detr-synth pair the unscaled binary form gained 1.7 AP more (kd_gain.md).
* Normalisation. ``normalize = False`` (default) follows the reference code: L_cls is a weighted SUM over points
  (it grows with the per-device batch size and the number of points; the reference weights 1/5/2 were tuned for it,
  with 8 images x 300 points per GPU). ``normalize = True`` divides L_cls by sum_i w_i as well, like the box terms,
  so that no term grows with batch size or point count (then raise ``cls`` to keep its share of the loss).
* Hidden sizes. DAB-DETR anchors and two-stage proposals ("anchor4") are boxes: any hidden sizes work. For the
  embedding queries of DETR / Conditional ("embed") and Deformable ("embed2") with different hidden sizes, the
  distiller owns a learned :class:`QueryProjection` (one ``Linear`` per concatenated part, initialised to map the
  teacher's query statistics to the student's), trained with the student and saved in the run checkpoint, never
  exported. ``project = False`` refuses such pairs instead.
* Refused pairs (one-line KdctlError at construction): different label spaces (names and order), softmax versus
  sigmoid classification, different query formats (e.g. DETR embeddings versus DAB anchors), non-DETR models.

Gradients never reach the teacher: its taps and decodes run under ``no_grad`` and are detached. No host sync
(``.item()``, boolean indexing) happens in :meth:`KDDETR.forward`; the GIoU is computed elementwise with clamps
for that reason (torchvision's ``generalized_box_iou_loss`` indexes with a boolean mask, and the pairwise
``generalized_box_iou`` would build an M x M matrix to read its diagonal). It matches torchvision's value (tested).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from kdctl.boxes import giou_loss
from kdctl.data.batch import Batch
from kdctl.distill.base import Distiller
from kdctl.distill.fdr import edge_kl, fdr_params, fdr_taps, group_fdr, reexpress
from kdctl.distill.kd_detr_modules import (
    EPS,
    QueryProjection,
    binary_scale,
    box_l1,
    class_divergence,
    foreground_weight,
    query_stats,
    sample_queries,
)
from kdctl.distill.kd_detr_pair import KDDetrModel, check_pair
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput

DEFAULTS: dict[str, Any] = {
    "cls": 1.0, "l1": 5.0, "giou": 2.0, "temperature": 10.0, "num_general": 300, "general_distribution": "normal",
    "specific": True, "general": True, "normalize": False, "sigmoid_kl": "softmax", "project": True,
    "box": "boxes", "dist": 1.5,
}
"""Recipe keys of ``[kd.kd-detr]`` and their defaults."""
GROUPS = ("specific", "general")
__all__ = ["DEFAULTS", "KDDETR", "KDDetrModel", "QueryProjection", "binary_scale", "box_l1", "check_pair",
           "class_divergence", "foreground_weight", "giou_loss", "query_stats", "sample_queries"]


# =========================================================================== the method
class KDDETR(Distiller):
    """KD-DETR between two DETR-family detectors (see the module docstring).

    Args:
        teacher, student: :class:`kdctl.models.detr.DetrDetector` with the same label space and query format.
        cls, l1, giou: weights of the class, L1 and GIoU terms.
        temperature: the KL temperature T (the class term is scaled by T^2).
        num_general: general points per step; general_distribution: "normal" (reference code) or "uniform"
            (paper), see :func:`sample_queries`.
        specific, general: use the teacher's queries / random queries as distillation points.
        normalize: class term as a weighted mean over points instead of a weighted sum (reference).
        sigmoid_kl: class divergence of sigmoid models, "softmax" (reference code, default) or "binary" (per-class
            Bernoulli KL, scaled to the reference's gradient magnitude).
        project: learn a projection for embedding queries of different hidden sizes (else refuse the pair).
    """

    name: ClassVar[str] = "kd-detr"
    same_label_space: ClassVar[bool] = True  # the class term compares logits row by row

    def __init__(
        self, teacher: Detector, student: Detector, *, cls: float = 1.0, l1: float = 5.0, giou: float = 2.0,
        temperature: float = 10.0, num_general: int = 300, general_distribution: str = "normal", specific: bool = True,
        general: bool = True, normalize: bool = False, sigmoid_kl: str = "softmax", project: bool = True,
        box: str = "boxes", dist: float = 1.5, **unknown: Any,
    ) -> None:
        if unknown:
            raise KdctlError(f"[kd.kd-detr]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
        opts = dict(cls=cls, l1=l1, giou=giou, temperature=temperature, num_general=num_general,
                    general_distribution=general_distribution, specific=specific, general=general, normalize=normalize,
                    sigmoid_kl=sigmoid_kl, project=project, box=box, dist=dist)
        super().__init__(teacher, student, **opts)
        object.__setattr__(self, "student", student)  # a reference: the engine owns and optimises the student
        self._read_options(opts)
        check_pair(teacher, student)
        self.projection = self._make_projection(teacher, student, bool(opts["project"]))
        self.fdr = self._fdr_params(teacher, student) if self.box == "distribution" else None

    def _read_options(self, o: dict[str, Any]) -> None:
        try:
            self.w_cls, self.w_l1, self.w_giou = float(o["cls"]), float(o["l1"]), float(o["giou"])
            self.temperature, self.num_general = float(o["temperature"]), int(o["num_general"])
            self.box, self.w_dist = str(o["box"]), float(o["dist"])
        except (TypeError, ValueError) as e:
            raise KdctlError(f"[kd.kd-detr]: weights, temperature and num_general must be numbers ({e})") from e
        self.distribution, self.sigmoid_kl = str(o["general_distribution"]), str(o["sigmoid_kl"])
        self.use_specific, self.use_general, self.normalize = bool(o["specific"]), bool(o["general"]), bool(o["normalize"])
        if min(self.w_cls, self.w_l1, self.w_giou) < 0 or self.temperature <= 0:
            raise KdctlError("[kd.kd-detr]: cls, l1 and giou must be >= 0 and temperature > 0")
        if self.distribution not in ("normal", "uniform"):
            raise KdctlError(f"[kd.kd-detr]: general_distribution {self.distribution!r}: use 'normal' or 'uniform'")
        if self.box not in ("boxes", "distribution") or self.w_dist < 0:
            raise KdctlError(f"[kd.kd-detr]: box {self.box!r}: use 'boxes' or 'distribution' (and dist >= 0)")
        if self.sigmoid_kl not in ("binary", "softmax"):
            raise KdctlError(f"[kd.kd-detr]: sigmoid_kl {self.sigmoid_kl!r}: use 'binary' or 'softmax'")
        if not (self.use_specific or self.use_general):
            raise KdctlError("[kd.kd-detr]: specific and general are both false: no distillation points left")
        if self.use_general and self.num_general < 1:
            raise KdctlError("[kd.kd-detr]: num_general must be >= 1 (or set general = false)")

    @staticmethod
    def _make_projection(teacher: KDDetrModel, student: KDDetrModel, allowed: bool) -> QueryProjection | None:
        if teacher.query_dim == student.query_dim:
            return None
        if not allowed:
            raise KdctlError(
                f"kd-detr: teacher {teacher.architecture} has hidden size {teacher.hidden_size} and student "
                f"{student.architecture} {student.hidden_size}: their {teacher.query_kind} queries cannot be shared "
                "(set project = true in [kd.kd-detr] to learn a projection, or use equal hidden sizes)"
            )
        return QueryProjection(teacher.learned_queries(), student.learned_queries(), teacher.query_parts)

    @staticmethod
    def _fdr_params(teacher: Detector, student: Detector) -> tuple[Any, Any]:
        params = fdr_params(teacher), fdr_params(student)
        if None in params:
            raise KdctlError(f"[kd.kd-detr]: box = 'distribution' needs edge-distribution boxes (D-FINE, DEIMv2) on "
                             f"both sides; teacher {teacher.architecture}, student {student.architecture}: use "
                             "box = 'boxes'")
        return params

    # ------------------------------------------------------------------ set-up
    @classmethod
    def student_setup(cls, teacher: Detector, dataset_names: list[str]) -> tuple[list[str], dict[str, Any]]:
        """The student takes the teacher's label space (a checkpoint labelled otherwise gets a new head, rows of
        shared classes kept). A preset student with learned queries (DETR, Conditional, DAB, one-stage Deformable)
        also takes the teacher's query count, as the reference trains both at 300; one whose queries are its own
        encoder's top-k (RT-DETR, D-FINE, DEIMv2, LW-DETR, RF-DETR, two-stage Deformable) keeps its published count
        (DEIMv2-Atto's 100 queries are part of its speed), since the teacher's points are decoded apart from it."""
        image_dependent = bool(teacher.queries_image_dependent)  # type: ignore[attr-defined]
        over = {} if image_dependent else {"num_queries": int(teacher.num_queries)}  # type: ignore[attr-defined]
        return list(teacher.label_names), over

    # ------------------------------------------------------------------ teacher side
    @torch.no_grad()
    def teacher_taps(self, batch: Batch) -> dict[str, Any]:
        """The teacher's predictions for its own queries and for this step's general points.

        Returns ``{"logits": [L, N, Q, C'], "boxes": [L, N, Q, 4], "queries": [Q, D] or [N, Q, D],
        "reference_points": [N, Q, 2] or None}`` (the teacher's taps) plus, with general points, ``"general_queries"`` [N_g, D] (the points drawn for this step)
        and ``"general_logits"`` / ``"general_boxes"`` [N, N_g, ...] (the teacher's final layer on them).
        """
        taps = self.teacher.forward_taps(batch)
        out = {"logits": taps["logits"], "boxes": taps["boxes"], "queries": taps["queries"],
               "reference_points": taps.get("reference_points"), "query_index": taps.get("query_index"),
               "memory_layout": taps.get("memory_layout"), **fdr_taps(taps, "")}
        if self.use_general:
            memory = taps["memory"]
            q = sample_queries(self.teacher, self.num_general, distribution=self.distribution, device=memory.device)
            dec = self.teacher.decode(taps, q)
            out.update(general_queries=q, general_logits=dec["logits"][-1], general_boxes=dec["boxes"][-1],
                       **fdr_taps(dec, "general_"))
        return out

    # ------------------------------------------------------------------ student side
    def groups(self, teacher_taps: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Distillation groups: name -> (queries in the teacher's format, teacher logits [N, G, C'], boxes)."""
        out = {}
        if self.use_specific:
            out["specific"] = (teacher_taps["queries"], teacher_taps["logits"][-1], teacher_taps["boxes"][-1])
        if self.use_general:
            t = teacher_taps
            out["general"] = (t["general_queries"], t["general_logits"], t["general_boxes"])
        return out

    def fdr_targets(self, teacher_taps: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
        """Per group the teacher's final edge distributions and first-layer boxes (``{"corners", "initial_boxes"}``,
        FDR teachers only: D-FINE, DEIMv2)."""
        prefixes = {"specific": "", "general": "general_"}
        return {n: group_fdr(teacher_taps, prefixes[n]) for n in self.groups(teacher_taps)}

    def reference_points(self, teacher_taps: dict[str, Any]) -> dict[str, Tensor | None]:
        """Per group, where the student decodes it: the teacher's reference points [N, Q, 2] for the specific points
        of a Deformable ("embed2") pair, so that both models decode each point at the same place; None (the
        student's own reference head) for the general points (as the TPRD port) and for every other query kind,
        whose queries are their points (DAB anchors, two-stage proposals) or have none (DETR, Conditional)."""
        out: dict[str, Tensor | None] = {}
        if self.use_specific:
            out["specific"] = teacher_taps.get("reference_points")
        if self.use_general:
            out["general"] = None
        return out

    def memory_index(self, teacher_taps: dict[str, Any], student_taps: dict[str, Any]) -> dict[str, Tensor | None]:
        """Per group, where the student reads the content of "proposal" queries (RT-DETR) from its OWN memory: the
        specific points at the teacher's top-k memory positions when both memory layouts match (same feature sizes),
        else (and for the general points) by bilinear sampling at the box centres."""
        layout = teacher_taps.get("memory_layout")
        same = layout is not None and layout == student_taps.get("memory_layout")
        out: dict[str, Tensor | None] = {}
        if self.use_specific:
            out["specific"] = teacher_taps.get("query_index") if same else None
        if self.use_general:
            out["general"] = None
        return out

    def student_queries(self, queries: Tensor) -> Tensor:
        """Teacher-format queries (detached) -> the student's format (through the projection, if any)."""
        queries = queries.detach()
        return queries if self.projection is None else self.projection(queries)

    def student_outputs(self, student_taps: dict[str, Any], queries: dict[str, Tensor],
                        reference_points: dict[str, Tensor | None] | None = None,
                        memory_index: dict[str, Tensor | None] | None = None) -> dict[str, dict[str, Tensor]]:
        """The student's ``{"logits": [L, N, G, C'], "boxes": [L, N, G, 4]}`` per group, every group in its own
        decoder pass over the student's recorded memory (one batched call when the groups have equal sizes);
        reference_points: per group None (the student's own) or the points to decode at (:meth:`reference_points`)."""
        names = list(queries)
        refs = [(reference_points or {}).get(n) for n in names]
        refs = [None if r is None else r.detach() for r in refs]
        index = [(memory_index or {}).get(n) for n in names]
        outs = self.student.decode_groups(student_taps, [self.student_queries(queries[n]) for n in names], refs,
                                          memory_index=index)
        return dict(zip(names, outs, strict=True))

    # ------------------------------------------------------------------ loss
    def group_terms(self, student: dict[str, Tensor], t_logits: Tensor, t_boxes: Tensor,
                    t_fdr: dict[str, Tensor] | None = None) -> tuple[Tensor, ...]:
        """Unweighted (L_cls, L_L1, L_GIoU) of one group, summed over the student's layers; with ``box =
        "distribution"`` (L_cls, L_dist, 0)."""
        w = foreground_weight(t_logits, self.teacher.logit_kind).detach()  # [N, G]
        w_sum = w.sum().clamp_min(EPS)
        div = class_divergence(student["logits"], t_logits.detach(), self.teacher.logit_kind, self.temperature,
                               self.sigmoid_kl)
        l_cls = (div * w).sum()
        if self.normalize:
            l_cls = l_cls / w_sum
        if t_fdr:  # box = "distribution" (forward passes these only then)
            target = reexpress(t_fdr["corners"], t_fdr["initial_boxes"], self.fdr[0], student["initial_boxes"],
                               self.fdr[1])
            return l_cls, (edge_kl(student["corners"], target) * w).sum() / w_sum, torch.zeros_like(l_cls)
        l_l1 = (box_l1(student["boxes"], t_boxes.detach()) * w).sum() / w_sum
        l_giou = (giou_loss(student["boxes"], t_boxes.detach()) * w).sum() / w_sum
        return l_cls, l_l1, l_giou

    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """Weighted ``{"kd_cls", "kd_l1", "kd_giou"}``, summed over the distillation groups."""
        groups = self.groups(teacher_taps)
        outs = self.student_outputs(student_out.taps, {n: g[0] for n, g in groups.items()},
                                    self.reference_points(teacher_taps),
                                    self.memory_index(teacher_taps, student_out.taps))
        totals = [torch.zeros((), device=batch.device) for _ in range(3)]
        fdr = self.fdr_targets(teacher_taps) if self.fdr is not None else {}
        for name, (_, t_logits, t_boxes) in groups.items():
            for i, term in enumerate(self.group_terms(outs[name], t_logits, t_boxes, fdr.get(name))):
                totals[i] = totals[i] + term
        if self.fdr is not None:
            return {"kd_cls": self.w_cls * totals[0], "kd_dist": self.w_dist * totals[1]}
        return {"kd_cls": self.w_cls * totals[0], "kd_l1": self.w_l1 * totals[1], "kd_giou": self.w_giou * totals[2]}
