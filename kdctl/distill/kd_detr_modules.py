"""KD-DETR's building blocks (see :mod:`kdctl.distill.kd_detr` for the method and its design choices): the
per-point loss terms (foreground weight, class divergence -- softmax or per-class binary KL with the binary form's
gradient scale --, L1 and elementwise GIoU of normalised cxcywh boxes; no host sync, no boolean indexing) and the
learned :class:`QueryProjection` between embedding queries of different hidden sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.errors import KdctlError

EPS = 1e-6


def foreground_weight(logits: Tensor, logit_kind: str) -> Tensor:
    """Teacher logits [..., C'] -> foreground weight [...] in (0, 1) (see the module docstring)."""
    logits = logits.float()
    if logit_kind == "softmax":
        return logits.softmax(-1)[..., :-1].amax(-1)
    return logits.sigmoid().amax(-1)


def class_divergence(student: Tensor, teacher: Tensor, logit_kind: str, temperature: float,
                     sigmoid_kl: str = "softmax") -> Tensor:
    """T^2 * mean over classes of the KL(teacher || student) terms at temperature T.

    student: [L, N, G, C'] logits of every student layer; teacher: [N, G, C'] (broadcast over L).
    Returns [L, N, G]. Softmax models and ``sigmoid_kl = "softmax"``: the reference code's softmax KL over the C'
    logits. ``sigmoid_kl = "binary"``: per-class Bernoulli KL times :func:`binary_scale` (the reference's gradient
    magnitude, see the module docstring).
    """
    s, t = student.float() / temperature, teacher.float() / temperature
    if logit_kind == "softmax" or sigmoid_kl == "softmax":
        log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
        return (log_t.exp() * (log_t - log_s)).mean(-1) * temperature**2
    # independent Bernoulli variables, one per class
    log_s1, log_s0 = F.logsigmoid(s), F.logsigmoid(-s)
    log_t1, log_t0 = F.logsigmoid(t), F.logsigmoid(-t)
    terms = log_t1.exp() * (log_t1 - log_s1) + log_t0.exp() * (log_t0 - log_s0)
    return terms.mean(-1) * temperature**2 * binary_scale(t)


def binary_scale(t: Tensor) -> Tensor:
    """Teacher logits over T, [..., C] -> the binary form's scale [...] (detached): ``||F_s||_F / ||F_b||_F`` with
    the Fisher matrices ``F_s = diag(p) - p p^T`` (p = softmax) and ``F_b = diag(q (1 - q))`` (q = sigmoid).

    ``||F_s||_F^2 = sum p^2 - 2 sum p^3 + (sum p^2)^2`` (the diagonal and off-diagonal entries of ``F_s``).
    """
    t = t.detach()
    p, q = t.softmax(-1), t.sigmoid()
    p2 = (p * p).sum(-1)
    fro_softmax = (p2 - 2 * (p**3).sum(-1) + p2 * p2).clamp_min(0)
    fro_binary = ((q * (1 - q)) ** 2).sum(-1)
    return (fro_softmax / fro_binary.clamp_min(torch.finfo(t.dtype).tiny)).sqrt()


def box_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean absolute difference of the 4 box coordinates: [L, N, G, 4], [N, G, 4] -> [L, N, G]."""
    return (student.float() - teacher.float()).abs().mean(-1)


# =========================================================================== query projection
class QueryProjection(nn.Module):
    """Teacher embedding queries [..., parts * D_t] -> student queries [..., parts * D_s], one Linear per part.

    Initialised so that queries with the teacher's statistics come out with the student's (per part: weights
    ~ N(0, (std_s / std_t)^2 / D_t), bias centring the teacher's mean on the student's), then trained with the
    student through the KD loss.
    """

    def __init__(self, teacher_queries: Tensor, student_queries: Tensor, parts: int) -> None:
        super().__init__()
        self.num_parts = parts
        t_chunks = teacher_queries.detach().float().cpu().chunk(parts, dim=-1)
        s_chunks = student_queries.detach().float().cpu().chunk(parts, dim=-1)
        self.parts = nn.ModuleList(self._init_part(t, s) for t, s in zip(t_chunks, s_chunks, strict=True))

    @staticmethod
    def _init_part(t: Tensor, s: Tensor) -> nn.Linear:
        lin = nn.Linear(t.shape[-1], s.shape[-1])
        gain = float(s.std().clamp_min(EPS) / t.std().clamp_min(EPS))
        with torch.no_grad():
            lin.weight.normal_(0.0, gain / t.shape[-1] ** 0.5)
            lin.bias.copy_(s.mean() - lin.weight.sum(1) * t.mean())
        return lin

    def forward(self, q: Tensor) -> Tensor:
        return torch.cat([lin(c) for lin, c in zip(self.parts, q.chunk(self.num_parts, dim=-1), strict=True)], -1)


# =========================================================================== general distillation points
def sample_queries(model: Any, n: int, *, generator: torch.Generator | None = None,
                   distribution: str = "normal", device: torch.device | str | None = None) -> Tensor:
    """[n, D] random "general distillation points" in ``model``'s query format.

    anchor4: "normal" draws pre-sigmoid anchors from N(0, 1) (the KD-DETR reference code); "uniform" draws
    boxes uniformly in [0, 1] after sigmoid (the paper) and returns their logits. embed / embed2: each part
    ([position] or [position | content]) is drawn with the mean and standard deviation of the model's own
    learned queries ("normal": Gaussian, "uniform": uniform with the same mean and variance).
    """
    if distribution not in ("normal", "uniform"):
        raise KdctlError(f"unknown query distribution {distribution!r}; use 'normal' or 'uniform'")
    draw_on = generator.device if generator is not None else torch.device(device or "cpu")
    shape = (int(n), model.query_dim)
    if distribution == "normal":
        z = torch.randn(shape, generator=generator, device=draw_on)
    else:
        z = torch.rand(shape, generator=generator, device=draw_on)
    if model.query_kind in ("anchor4", "proposal"):  # boxes before the sigmoid
        out = z if distribution == "normal" else torch.logit(z.clamp(1e-4, 1 - 1e-4))
    elif model.query_kind == "box":  # plain normalised boxes (LW-DETR, RF-DETR): the same boxes after the sigmoid
        out = z.sigmoid() if distribution == "normal" else z
    else:
        if distribution == "uniform":
            z = (z - 0.5) * math.sqrt(12.0)  # zero mean, unit variance
        mean, std = query_stats(model)
        out = z * std.to(draw_on) + mean.to(draw_on)
    return out.to(device or draw_on)


@torch.no_grad()
def query_stats(model: Any) -> tuple[Tensor, Tensor]:
    """Mean and std [D] of the learned queries: one value per concatenated part, repeated over its dims."""
    q = model.learned_queries().detach().float()
    chunks = q.chunk(model.query_parts, dim=-1)
    mean = torch.cat([c.mean().expand(c.shape[-1]) for c in chunks])
    std = torch.cat([c.std().clamp_min(1e-6).expand(c.shape[-1]) for c in chunks])
    return mean, std  # on the model's device: no host sync
