"""DRKD: dual relation knowledge distillation for CNN detectors (Ni et al., IJCAI 2023, arXiv 2302.05637).

Three terms on the FPN levels that teacher and student share (matched by stride)::

    L_pixel    = sum_l        || f_l(G^s_l(S_l)) - G^t_l(T_l) ||_2            every shared level
    L_relation = sum_l sum_b  || f^r_l(R^s_l(x^s_b)) - R^t_l(x^t_b) ||_2      two finest shared levels
    L_instance = sum_l sum_b  || f^i_l(x^s_b) - x^t_b ||_2                    two finest shared levels

``G`` is a GloRe unit (:class:`GloReUnit`), ``f`` 1x1 convolutions from student to teacher channels, ``x_b`` the
``[K_b, C, 3, 3]`` RoIAligned ground-truth boxes of image ``b`` and ``R`` a non-local relation block over the
instances of one image (:class:`RelationBlock`). Every module (both GloRe sides, both relation sides, the adapters)
is a trainable part of the distiller; the teacher itself only provides features computed under ``no_grad``.

Design choices (see also the project design note ``drkd.md``):

* RoIAlign: every GT box of every image in ONE ``roi_align`` call per level and side, with the image's own batch
  index in the first roi column (the official code pools every image's boxes from image 0). ``spatial_scale =
  1/stride``, output 3x3, ``sampling_ratio=-1`` (adaptive: ``ceil(box side / stride / 3)`` samples per bin side,
  the official code's default) and ``aligned=True``: the boxes are continuous pixel coordinates (``x1 = 0`` is the
  left edge of the image), so the half-pixel shift that maps them onto feature-cell centres is the correct one
  (``aligned=False``, the official default, samples half a cell too far right and down). Box coordinates stay
  float32 under autocast.
* Relation filter (``relation_filter``, :mod:`kdctl.distill.drkd_modules`): the official code draws a fresh random
  ``Linear(C*9, K)`` at every step. The default ``"learned"`` (:class:`PairFilter`) is a small learned MLP on each
  PAIR of instances, ``s_ij = w . relu(U x_i + V x_j + b)`` (the MLP on ``concat(x_i, x_j)``, factorised so that it
  costs ``O(K^2 h)``), row-softmaxed into ``M``. A per-pair function gives a ``K x K`` matrix for any ``K``, is
  equivariant to the order of the boxes (a ``Linear(C*9, K)`` is not: its j-th output unit has nothing to do with
  instance j), is checkpointed with the distiller, and -- unlike a bilinear form, which would duplicate the
  ``theta . phi`` similarity it multiplies -- it can score non-similarity relations (context, "j is next to /
  larger than i"). ``A = softmax_row(L * M)``, ``z = x + W(A g(x))`` as in the note. Ablations: ``"random"``
  (:class:`RandomFilter`: the official untrained ``Linear(C*9, K)``, drawn once per run from the run's seed and
  checkpointed, instead of at every step) and ``"none"`` (no filter, ``A = softmax_row(L)``).
* Relation width (``relation_dim``): ``theta/phi/g`` map ``C*9`` to ``C*9 // 2`` (``relation_dim = 0``, default,
  the official width) or to ``min(relation_dim, C*9 // 2)``. With 256-channel FPNs the official 1152 puts 44 M
  parameters in the four relation blocks (more than a ResNet-50 student; ~0.5 GB with gradients and momentum) for a
  relation among ~7 boxes per image; ``relation_dim = 256`` needs 11 M (the whole distiller: 16 M). 256 was
  kdctl's default until its training quality could be compared with the official width; it has not been yet, so
  the default is the official one and 256 is the option for memory-bound runs.
* GloRe widths: ``mid = 64`` on the two finest shared levels and ``256`` on the others for a 256-channel FPN (the
  official values); a narrower FPN scales them with its width, ``mid = max(1, round(base * C / 256))`` (e.g. 32/128
  at C=128, 4/16 at C=16), which keeps the reference ratio ``mid / C`` and the unit's cost proportional to the
  FPN's; a wider FPN keeps 64/256. The node features are averaged over pixels (``glore_normalize = True``, default:
  ``V = state proj^T / (h*w)``, GloRe's own ``normalize`` option for inputs of varying size, as detection's are):
  the official sum (``glore_normalize = False``, the DRKD code's setting) grows with the image area and overflows
  fp16 on stride-4 maps. The BatchNorm after ``extend`` removes most of the difference (``relu`` and the linear maps
  are scale-equivariant; only the node-mixing bias and the BatchNorm's epsilon see the scale).
* Cost: the GloRe units and the pixel term are computed in an equal but cheaper order (:meth:`GloReUnit.factors`,
  :meth:`DRKD.pixel_difference`): the BatchNorm is folded into node space, so neither GloRe output, nor any
  ``2 * mid``-channel map, nor a full-resolution BatchNorm is built; per pixel this is about half the
  multiply-adds of the direct form, and the only full-resolution tensors are the student adapter's output and the
  difference. RoIAlign runs once per level and side for the whole batch; the relation blocks run on all images
  at once (instances padded per image and masked). No host synchronisation.
* Normalisation (``normalize``): the official loss sums unsquared L2 distances over the per-device batch, so the
  published weights hold for 2 images per device at about 800x1333 (the pixel term grows with
  ``sqrt(images * pixels)``, the instance terms with the number of images). ``normalize = True`` (default) replaces
  each distance by its root-mean-square over elements (pixel: per level; instance / relation: over all GT boxes of
  the batch) times the square root of the element count of that reference batch (2 images of 800x1333; 7.3 boxes
  per image, the COCO mean): at the reference shape it equals the official loss, and a batch of any size or
  resolution gets each term at the reference magnitude per image (the same two images repeated to a batch of 8 give
  the terms of the batch of 2). Scaling the summed loss by ``2 / images per device`` instead would fix the instance
  terms but not the pixel term, one norm over the whole batch, which would fall as ``2 / sqrt(images)``, nor any
  term's dependence on the image size (measured: ``benchmarks/term_magnitudes.py``). ``normalize = False`` is the
  raw official loss, for runs at the reference shape.
Weights: ``[kd.drkd]`` of the recipe (``pixel``, ``relation``, ``instance``); when not given, the official values
for the student's architecture, declared with it (``drkd_weights`` in :mod:`kdctl.models.cnn.architectures`: Faster
R-CNN 1e-3 / 4e-3 / 2.4e-3; RetinaNet and FCOS 4e-3 / 5e-3 / 6e-3).

Supported pairs: any two kdctl CNN detectors (Faster R-CNN, RetinaNet, FCOS; any backbone, any FPN width) that
share at least one FPN stride, e.g. a Faster R-CNN teacher (P2-P6) and a RetinaNet student (P3-P7) are distilled on
strides 8-64. Pairs without a common stride are refused.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import roi_align

from kdctl.data.batch import Batch
from kdctl.distill.base import Distiller
from kdctl.distill.drkd_modules import RELATION_FILTERS, GloReUnit, RelationBlock, conv1x1
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.cnn.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, architecture_of

GLORE_MID = (64, 256)  # GloRe node count for the two finest levels / the others, at REFERENCE_CHANNELS
REFERENCE_CHANNELS = 256
INSTANCE_LEVELS = 2  # instance / relation terms on this many finest shared levels
REFERENCE_IMAGES = 2  # the official weights assume 2 images per device ...
REFERENCE_AREA = 800 * 1333  # ... of about 800x1333 pixels ...
REFERENCE_BOXES = 7.3  # ... with the COCO mean of 7.3 GT boxes per image


# =========================================================================== geometry helpers
def shared_strides(teacher: Any, student: Any) -> list[int]:
    """FPN strides both models have, fine to coarse; a pair without any is refused (KdctlError)."""
    t, s = _strides(teacher, "teacher"), _strides(student, "student")
    shared = sorted(set(t) & set(s))
    if not shared:
        raise KdctlError(f"drkd: teacher FPN strides {t} and student FPN strides {s} share none; "
                         "DRKD needs at least one common FPN level")
    return shared


def _strides(model: Any, role: str) -> list[int]:
    strides = getattr(model, "fpn_strides", None)
    if not strides or not getattr(model, "fpn_channels", None):
        raise KdctlError(f"drkd: the {role} ({getattr(model, 'architecture', type(model).__name__)}) exposes no FPN "
                         "levels; DRKD needs a CNN detector with an FPN")
    return [int(x) for x in strides]


def glore_mid(channels: int, fine: bool) -> int:
    """GloRe node count: 64 (fine levels) / 256 (others) at 256 channels, scaled down with a narrower FPN."""
    base = GLORE_MID[0] if fine else GLORE_MID[1]
    return max(1, round(base * min(channels, REFERENCE_CHANNELS) / REFERENCE_CHANNELS))


def instance_rois(boxes: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-image GT boxes [K_b, 4] -> rois [R, 5] = (image index b, x1, y1, x2, y2), R = sum K_b (no host sync)."""
    rois = [torch.cat([torch.full((b.shape[0], 1), i, dtype=dtype, device=device), b.to(device, dtype)], dim=1)
            for i, b in enumerate(boxes)]
    return torch.cat(rois) if rois else torch.zeros((0, 5), dtype=dtype, device=device)


def pool_instances(feature: Tensor, rois: Tensor, stride: int, size: int = 3, sampling_ratio: int = -1) -> Tensor:
    """RoIAlign every roi from ITS image: feature [N, C, h, w], rois [R, 5] -> [R, C, size, size].

    The rois keep their float32 coordinates (bf16 would move a box at x = 1000 by up to 4 px): under autocast
    torchvision pools in float32 itself; outside it both inputs are promoted to a common dtype.
    """
    if not torch.is_autocast_enabled(feature.device.type) and feature.dtype != rois.dtype:
        dtype = torch.promote_types(feature.dtype, rois.dtype)
        feature, rois = feature.to(dtype), rois.to(dtype)
    return roi_align(feature, rois, output_size=size, spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio,
                     aligned=True)


def pad_instances(x: Tensor, counts: list[int]) -> Tensor:
    """Instances of all images x [R, ...] (image-major) -> zero-padded per image [B, max K_b, ...]."""
    return pad_sequence(list(torch.split(x, counts)), batch_first=True)


def instance_mask(counts: list[int], device: torch.device) -> Tensor:
    """bool [B, max K_b]: True on the real instances of each image."""
    return pad_sequence([torch.ones(k, dtype=torch.bool, device=device) for k in counts], batch_first=True)


def crop_common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two maps [N, *, h, w] of one stride cropped to their common top-left region (padding may differ)."""
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    return a[..., :h, :w], b[..., :h, :w]


# =========================================================================== the method
class DRKD(Distiller):
    """Dual relation KD (pixel-wise GloRe relation, instance-wise relation, instance features) for CNN detectors.

    Args:
        teacher, student: kdctl CNN detectors (``fpn_strides``, ``fpn_channels``, taps ``features`` / ``boxes``).
        pixel, relation, instance: loss weights (default: the official values for the student's architecture).
        normalize: RMS distances rescaled to the reference batch (default; see the module docstring) instead of the
            official summed unsquared L2 distances (False).
        roi_size: RoIAlign output side (3).
        sampling_ratio: RoIAlign samples per bin side (-1: adaptive, as the official code).
        relation_dim: width of the relation blocks' theta / phi / g (0: D // 2, the official width, default; else
            capped at D // 2).
        relation_filter: "learned" (default), "random" (the official untrained filter, fixed per run) or "none".
        filter_hidden: width of the learned relation filter's pair MLP.
        glore_normalize: GloRe node states averaged over pixels (default) or summed (False, the official code).
    """

    name: ClassVar[str] = "drkd"
    OPTIONS: ClassVar[tuple[str, ...]] = ("pixel", "relation", "instance", "normalize", "roi_size", "sampling_ratio",
                                          "relation_dim", "relation_filter", "filter_hidden", "glore_normalize")

    def __init__(
        self, teacher: Detector, student: Detector, *, pixel: float | None = None, relation: float | None = None,
        instance: float | None = None, normalize: bool = True, roi_size: int = 3, sampling_ratio: int = -1,
        relation_dim: int = 0, relation_filter: str = "learned", filter_hidden: int = 64, glore_normalize: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise KdctlError(f"[kd.drkd]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(self.OPTIONS)}")
        if relation_filter not in RELATION_FILTERS:
            raise KdctlError(f"[kd.drkd] relation_filter {relation_filter!r}: use one of {', '.join(RELATION_FILTERS)}")
        weights = resolve_weights(student, pixel, relation, instance)
        super().__init__(teacher, student, **weights, normalize=bool(normalize), roi_size=int(roi_size),
                         sampling_ratio=int(sampling_ratio), relation_dim=int(relation_dim),
                         relation_filter=relation_filter, filter_hidden=int(filter_hidden),
                         glore_normalize=bool(glore_normalize))
        self.w_pixel, self.w_relation, self.w_instance = weights["pixel"], weights["relation"], weights["instance"]
        self.normalize, self.roi_size, self.sampling_ratio = bool(normalize), int(roi_size), int(sampling_ratio)
        self.strides = shared_strides(teacher, student)
        self.instance_strides = self.strides[:INSTANCE_LEVELS]
        cs, ct = int(student.fpn_channels), int(teacher.fpn_channels)
        self.channels = (cs, ct)
        fine, gn = set(self.instance_strides), bool(glore_normalize)
        self.glore_student = nn.ModuleDict({_key(s): GloReUnit(cs, glore_mid(cs, s in fine), gn) for s in self.strides})
        self.glore_teacher = nn.ModuleDict({_key(s): GloReUnit(ct, glore_mid(ct, s in fine), gn) for s in self.strides})
        self.pixel_adapt = nn.ModuleDict({_key(s): nn.Conv2d(cs, ct, 1) for s in self.strides})
        area = self.roi_size**2

        def relation_blocks(dim: int) -> nn.ModuleDict:
            return nn.ModuleDict({_key(s): RelationBlock(dim, _inter(dim, relation_dim), filter_hidden, relation_filter)
                                  for s in self.instance_strides})

        self.relation_student, self.relation_teacher = relation_blocks(cs * area), relation_blocks(ct * area)
        self.relation_adapt = nn.ModuleDict({_key(s): nn.Conv2d(cs, ct, 1) for s in self.instance_strides})
        self.instance_adapt = nn.ModuleDict({_key(s): nn.Conv2d(cs, ct, 1) for s in self.instance_strides})

    # ------------------------------------------------------------------ forward
    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """Weighted terms ``{"kd_pixel", "kd_relation", "kd_instance"}``, scalar tensors."""
        s_feats, t_feats = student_out.taps["features"], teacher_taps["features"]
        boxes = student_out.taps.get("boxes")
        if boxes is None:
            boxes = [t["boxes"].reshape(-1, 4) for t in batch.targets]
        relation, instance = self.instance_losses(s_feats, t_feats, list(boxes))
        return {
            "kd_pixel": self.w_pixel * self.pixel_loss(s_feats, t_feats),
            "kd_relation": self.w_relation * relation,
            "kd_instance": self.w_instance * instance,
        }

    def pixel_loss(self, s_feats: dict[int, Tensor], t_feats: dict[int, Tensor]) -> Tensor:
        """Unweighted L_pixel over the shared levels (features {stride: [N, C, h, w]}) -> scalar."""
        total = []
        for stride in self.strides:
            s, t = crop_common(s_feats[stride], t_feats[stride])
            diff = self.pixel_difference(_key(stride), s, t)  # [N, Ct, h*w]
            dist = torch.linalg.vector_norm(diff, dtype=torch.float32)  # no fp16 overflow
            if self.normalize:  # RMS * sqrt(element count of the reference batch at this stride)
                n, _, h, w = t.shape
                dist = dist * math.sqrt(REFERENCE_IMAGES * REFERENCE_AREA / (n * h * w * stride * stride))
            total.append(dist)
        return torch.stack(total).sum()

    def pixel_difference(self, k: str, s: Tensor, t: Tensor) -> Tensor:
        """``f(G^s(S)) - G^t(T)`` for student S [N, Cs, h, w] and teacher T [N, Ct, h, w] -> [N, Ct, h*w].

        With ``G(X) = X + E' proj + shift`` (:meth:`GloReUnit.factors`) and ``f(X) = W X + b``:
        ``W S + b + W shift_s - T - shift_t + (W E'_s) proj_s - E'_t proj_t``. Neither GloRe output is built:
        the only full-resolution tensors are the adapter's output and the difference itself.
        """
        es, ps, shift_s = self.glore_student[k].factors(s)
        et, pt, shift_t = self.glore_teacher[k].factors(t)
        adapt = self.pixel_adapt[k]
        w = adapt.weight.flatten(1)  # [Ct, Cs]
        bias = adapt.bias + w @ shift_s - shift_t  # [Ct]
        base = (conv1x1(s, adapt.weight, bias) - t).flatten(2)  # [N, Ct, hw]
        if not base.is_contiguous() and base.transpose(1, 2).is_contiguous():  # channels-last: pixel-major GEMMs
            diff = torch.baddbmm(base.transpose(1, 2), ps.transpose(1, 2), (w @ es).transpose(1, 2))
            return torch.baddbmm(diff, pt.transpose(1, 2), et.transpose(1, 2), alpha=-1).transpose(1, 2)
        return torch.baddbmm(torch.baddbmm(base, w @ es, ps), et, pt, alpha=-1)

    def instance_losses(
        self, s_feats: dict[int, Tensor], t_feats: dict[int, Tensor], boxes: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Unweighted (L_relation, L_instance) on the finest shared levels; boxes: per image [K_b, 4] xyxy."""
        ref = s_feats[self.strides[0]]
        counts = [int(b.shape[0]) for b in boxes]
        n_inst = sum(counts)
        if n_inst == 0:
            zero = ref.new_zeros((), dtype=torch.float32)
            return zero, zero
        rois = instance_rois(boxes, torch.float32, ref.device)  # [R, 5]
        valid = instance_mask(counts, ref.device)  # [B, K]
        relation, instance = [], []
        for stride in self.instance_strides:
            k = _key(stride)
            xs = self.pool(s_feats[stride], rois, stride)  # [R, Cs, r, r]
            xt = self.pool(t_feats[stride], rois, stride)  # [R, Ct, r, r]
            pt = pad_instances(xt.flatten(1), counts)  # [B, K, Dt]
            instance.append(self._distance(pad_instances(self.instance_adapt[k](xs).flatten(1), counts), pt, valid,
                                           n_inst))
            zs, _ = self.relation_student[k](pad_instances(xs.flatten(1), counts), valid)  # [B, K, Ds]
            zt, _ = self.relation_teacher[k](pt, valid)  # [B, K, Dt]
            zs = self._adapt_padded(self.relation_adapt[k], zs, xs.shape[1])
            relation.append(self._distance(zs, zt, valid, n_inst))
        return torch.stack(relation).sum(), torch.stack(instance).sum()

    def pool(self, feature: Tensor, rois: Tensor, stride: int) -> Tensor:
        """RoIAlign of every GT box from its own image: feature [N, C, h, w], rois [R, 5] -> [R, C, r, r]."""
        return pool_instances(feature, rois, stride, self.roi_size, self.sampling_ratio)

    def _adapt_padded(self, adapt: nn.Module, z: Tensor, channels: int) -> Tensor:
        """1x1 adapter on padded instance features z [B, K, Cs*r*r] -> [B, K, Ct*r*r]."""
        b, k, _ = z.shape
        r = self.roi_size
        return adapt(z.reshape(b * k, channels, r, r)).reshape(b, k, -1)

    def _distance(self, a: Tensor, b: Tensor, valid: Tensor, n_inst: int) -> Tensor:
        """Sum over images of the unsquared L2 distance between the ``n_inst`` real instances of a and b [B, K, D]
        (normalising: their RMS over all real instances, rescaled to the reference batch)."""
        diff = (a.float() - b.float()) * valid[..., None]
        if self.normalize:  # RMS * sqrt(reference element count) = ||diff|| * 2 * sqrt(7.3 / n_inst)
            return torch.linalg.vector_norm(diff) * REFERENCE_IMAGES * math.sqrt(REFERENCE_BOXES / n_inst)
        return torch.linalg.vector_norm(diff, dim=(1, 2)).sum()


def _key(stride: int) -> str:
    return f"s{stride}"


def _inter(dim: int, relation_dim: int) -> int:
    half = max(1, dim // 2)
    return half if relation_dim <= 0 else min(int(relation_dim), half)


def resolve_weights(student: Any, pixel: float | None, relation: float | None,
                     instance: float | None) -> dict[str, float]:
    """Recipe weights, missing ones from the official values for the student's architecture."""
    arch = architecture_of(str(getattr(student, "architecture", ""))) or ARCHITECTURES[DEFAULT_ARCHITECTURE]
    defaults = dict(zip(("pixel", "relation", "instance"), arch.drkd_weights, strict=True))
    out = {}
    for key, value in (("pixel", pixel), ("relation", relation), ("instance", instance)):
        try:
            out[key] = float(defaults[key] if value is None else value)
        except (TypeError, ValueError) as e:
            raise KdctlError(f"[kd.drkd] {key} must be a number, got {value!r}") from e
        if not math.isfinite(out[key]) or out[key] < 0:
            raise KdctlError(f"[kd.drkd] {key} must be a finite number >= 0, got {value!r}")
    return out
