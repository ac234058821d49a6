"""DRKD's trainable modules: the GloRe unit (pixel-wise relation) and the instance relation block with its filters.

See :mod:`kdctl.distill.drkd` for the method and the design note ``drkd.md``. Shapes: N images, C channels, h x w
pixels, Nn graph nodes, B images with K (padded) instances of D = C * r^2 features each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RELATION_FILTERS = ("learned", "none", "random")


# =========================================================================== GloRe
class GloReUnit(nn.Module):
    """Graph-based global reasoning unit (Chen et al., CVPR 2019), residual: ``G(X) = X + BN(extend(Y))``.

    ``state = conv_state(X)``, ``proj = conv_proj(X)``, ``V = state proj^T / hw`` (pixels -> nodes; without
    ``/ hw`` when ``normalize`` is False),
    ``H = V + node_mix(V)``, ``Z = state_update(relu(H))``, ``Y = Z proj`` (nodes -> pixels), ``BN`` a
    BatchNorm2d (batch statistics in training, running statistics in eval mode, both kept up to date).

    Computed in another, equal order (:meth:`factors`): everything after ``proj`` is linear in ``proj`` per image,
    so ``BN(extend(Y)) = E' proj + shift`` with a small ``E' [N, C, Nn]``, and the BatchNorm statistics of
    ``E proj`` follow from ``E``, the per-image mean and the Gram matrix of ``proj``. No map wider than ``Nn``
    channels is built at full resolution: ``3 C Nn + Nn^2`` multiply-adds per pixel instead of about
    ``3 C Nn + 4 Nn^2 + 2 C Nn`` plus a BatchNorm, and nothing of ``C`` channels is kept for the backward.

    Args:
        channels: C, the feature's channel count (in = out).
        mid: node count ``Nn``; the state width is ``Cs = 2 * mid``.
        normalize: ``V = state proj^T / hw`` (True, GloRe's own ``normalize`` option for inputs of varying size) or
            the plain sum ``state proj^T`` (False, the DRKD code's setting; it grows with the image area and can
            overflow fp16 on stride-4 maps).
    """

    def __init__(self, channels: int, mid: int, normalize: bool = True) -> None:
        super().__init__()
        self.nodes, self.states, self.normalize = mid, 2 * mid, bool(normalize)
        self.conv_state = nn.Conv2d(channels, self.states, 1)
        self.conv_proj = nn.Conv2d(channels, self.nodes, 1)
        self.node_mix = nn.Linear(self.nodes, self.nodes)  # the adjacency "A" of H = (I + A) V, over nodes
        self.state_update = nn.Linear(self.states, self.states, bias=False)  # W of Z = W relu(H)
        self.conv_extend = nn.Conv2d(self.states, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels, eps=1e-4)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, h, w] -> G(x) [N, C, h, w]."""
        weight, proj, shift = self.factors(x)
        return x + (weight @ proj + shift[:, None]).view_as(x)

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, C, h, w] -> (E' [N, C, Nn], proj [N, Nn, hw], shift [C]) with ``G(x) = x + E' proj + shift``."""
        hw = x.shape[-2] * x.shape[-1]
        flat = x.flatten(2)  # [N, C, hw]
        proj = conv1x1(x, self.conv_proj.weight, self.conv_proj.bias).flatten(2)  # [N, Nn, hw]
        pbar = proj.mean(-1, dtype=wide_dtype(proj.dtype))  # [N, Nn]: per-image mean of proj
        scale = 1.0 / hw if self.normalize else 1.0
        # X proj^T / hw, scaled inside the GEMM (no fp16 overflow, no scaled copy of proj)
        pooled = torch.baddbmm(flat.new_zeros(()), flat, proj.transpose(1, 2), beta=0, alpha=scale)  # [N, C, Nn]
        bias = self.conv_state.bias[:, None] * (pbar * (hw * scale))[:, None, :]  # b 1^T proj^T (/ hw)
        v = self.conv_state.weight.flatten(1) @ pooled + bias
        hid = v + self.node_mix(v)  # [N, Cs, Nn]
        z = self.state_update(F.relu(hid).transpose(1, 2)).transpose(1, 2)  # [N, Cs, Nn]
        e = self.conv_extend.weight.flatten(1) @ z  # [N, C, Nn]: extend(Y) = e proj
        mean, var = self._statistics(e, proj, pbar)
        bn = self.norm
        scale = bn.weight * torch.rsqrt(var + bn.eps)  # [C]
        return e * scale[:, None], proj, bn.bias - mean * scale

    def _statistics(self, e: Tensor, proj: Tensor, pbar: Tensor) -> tuple[Tensor, Tensor]:
        """BatchNorm mean / variance [C] of ``y = e proj`` over (N, hw), from small tensors (float32).

        Training: batch statistics (biased variance, as BatchNorm) and a running-statistics update; eval: running.
        """
        bn = self.norm
        if not (self.training or bn.running_mean is None):
            return bn.running_mean, bn.running_var
        with torch.autocast(e.device.type, enabled=False):
            ef, pf = e.to(pbar.dtype), proj.to(pbar.dtype)
            means = (ef @ pbar[..., None]).squeeze(-1)  # [N, C]: per-image channel means
            gram = pf @ pf.transpose(1, 2) / pf.shape[-1]  # [N, Nn, Nn]
            cov = gram - pbar[:, :, None] * pbar[:, None, :]  # per-image covariance of proj
            within = ((ef @ cov) * ef).sum(-1)  # [N, C]: per-image variance of y
            mean = means.mean(0)
            var = (within + (means - mean) ** 2).mean(0).clamp_min(0)
        if self.training and bn.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), proj.shape[0] * proj.shape[-1])
        return mean, var

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        """BatchNorm's running statistics update (unbiased variance), momentum ``norm.momentum``."""
        bn = self.norm
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean, alpha=m)
        bn.running_var.mul_(1 - m).add_(var * (count / max(count - 1, 1)), alpha=m)


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel, x [N, C, h, w] -> [N, O, h, w], in the input's layout.

    Channels-last input: one GEMM ``x W^T`` over the [N, h, w, C] view, output channels-last, no layout conversion
    (a 1x1 convolution of a small batch runs on CPU as an im2col GEMM that converts to NCHW and back).
    """
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(x, weight, bias)
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (statistics are never computed in 16 bits)."""
    return torch.promote_types(dtype, torch.float32)


# =========================================================================== instance relation
class PairFilter(nn.Module):
    """Learned relation filter: a small MLP on every pair of instances, ``s_ij = w . relu(U x_i + V x_j + b)``.

    Args:
        dim: D, the instance feature size.
        hidden: h, the MLP width.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.left = nn.Linear(dim, hidden)
        self.right = nn.Linear(dim, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)  # a constant would cancel in the row softmax

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, K, D] -> pair scores [B, K, K] (row i: instance i's scores for every instance j)."""
        hid = F.relu(self.left(x)[:, :, None] + self.right(x)[:, None, :])  # [B, K, K, h]
        return self.score(hid).squeeze(-1)


class RandomFilter(nn.Module):
    """The DRKD code's relation filter, an untrained ``Linear(D, K)`` (K = the image's instance count), fixed per run.

    The official code draws a fresh ``nn.Linear(D, K)`` at every step; here its weight and bias are drawn ONCE per run
    with ``nn.Linear``'s default initialisation (uniform in +-1/sqrt(D)) from a seed taken from torch's global RNG at
    construction (so the run's seed fixes it) and saved in the checkpoint. An image with K instances uses the first
    K output units (the rows are drawn in order, so they do not depend on the largest K seen). Like the official
    filter, its j-th output unit has nothing to do with instance j: the filter depends on the order of the boxes.

    Args:
        dim: D, the instance feature size.
        seed: the filter's seed (default: drawn from torch's global RNG).
    """

    def __init__(self, dim: int, seed: int | None = None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.cache: tuple[Tensor, Tensor] | None = None  # (weight [K_max, D], bias [K_max]) on the last device

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, K, D] -> scores [B, K, K] = x W_K^T + b_K (W_K, b_K: the first K rows)."""
        weight, bias = self.linear(x.shape[1], x.device)
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))

    def linear(self, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The first k rows: weight [k, D], bias [k] (float32, on ``device``)."""
        if self.cache is None or self.cache[0].shape[0] < k or self.cache[0].device != device:
            rows = max(k, 0 if self.cache is None else self.cache[0].shape[0])
            bound = 1.0 / math.sqrt(self.dim)
            draws = []
            for offset, shape in ((0, (rows, self.dim)), (1, (rows,))):
                g = torch.Generator().manual_seed(self.seed + offset)
                draws.append(((torch.rand(shape, generator=g) * 2 - 1) * bound).to(device))
            self.cache = (draws[0], draws[1])
        return self.cache[0][:k], self.cache[1][:k]

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed, self.cache = int(state["seed"]), None


class RelationBlock(nn.Module):
    """Non-local relation among the instances of each image, gated by a relation filter.

    ``L = theta(x) phi(x)^T``, ``M = softmax_row(filter(x))``, ``A = softmax_row(L * M)``, ``z = x + W(A g(x))``;
    padded instances (``valid`` False) are never attended to and attend only to themselves.

    Args:
        dim: D = C * roi_size^2, the flattened RoI feature size.
        inter: width of theta / phi / g (the DRKD code: D // 2).
        filter_hidden: width of the learned pair filter's MLP.
        filter_kind: "learned" (:class:`PairFilter`, default), "random" (:class:`RandomFilter`, the official code's
            untrained filter, fixed per run) or "none" (no filter: ``A = softmax_row(L)``, a plain non-local block).
    """

    def __init__(self, dim: int, inter: int, filter_hidden: int = 64, filter_kind: str = "learned") -> None:
        super().__init__()
        if filter_kind not in RELATION_FILTERS:
            raise ValueError(f"relation filter {filter_kind!r}: use one of {', '.join(RELATION_FILTERS)}")
        self.theta = nn.Linear(dim, inter)
        self.phi = nn.Linear(dim, inter)
        self.g = nn.Linear(dim, inter)
        self.W = nn.Linear(inter, dim)
        self.filter_kind = filter_kind
        self.filter: nn.Module | None = None
        if filter_kind == "learned":
            self.filter = PairFilter(dim, filter_hidden)
        elif filter_kind == "random":
            self.filter = RandomFilter(dim)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, K, D], valid: bool [B, K] -> z [B, K, D] (relation-enhanced), A [B, K, K] (filtered relation)."""
        k = x.shape[1]
        allowed = valid[:, None, :] | torch.eye(k, dtype=torch.bool, device=x.device)  # [B, K, K]
        sim = self.theta(x) @ self.phi(x).transpose(1, 2)  # [B, K, K]
        if self.filter is not None:
            sim = sim * self.filter(x).masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = sim.masked_fill(~allowed, float("-inf")).softmax(-1)
        return x + self.W(attn @ self.g(x)), attn
