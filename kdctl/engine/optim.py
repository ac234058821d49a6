"""The optimiser a recipe asks for, over the student's and the distiller's trainable parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdctl.errors import KdctlError


def build_optimizer(student: nn.Module, distiller: nn.Module | None, o: dict[str, Any],
                    lr: float) -> torch.optim.Optimizer:
    """The recipe's optimiser (``[optim]``: sgd | adamw) over three parameter groups: the student's non-backbone
    parameters, its backbone (lr x ``backbone_lr_mult``) and the distiller's trainable modules."""
    backbone, other = [], []
    for n, p in student.named_parameters():
        if p.requires_grad:
            (backbone if "backbone" in n and "fpn" not in n else other).append(p)
    groups = [{"params": other, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * float(o.get("backbone_lr_mult", 1.0))})
    if distiller is not None:
        kd_params = [p for p in distiller.parameters() if p.requires_grad]
        if kd_params:
            groups.append({"params": kd_params, "lr": lr})
    name = str(o["optimizer"]).lower()
    if name == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": float(o["momentum"]), "weight_decay": float(o["weight_decay"])}
    elif name == "adamw":
        cls, kw = torch.optim.AdamW, {"weight_decay": float(o["weight_decay"])}
    else:
        raise KdctlError(f"recipe optimizer {name!r}: use sgd or adamw")
    # fused kernels (one pass over all parameters) when every parameter allows them: 2-4x faster steps
    params = [p for g in groups for p in g["params"]]
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(groups, lr=lr, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(groups, lr=lr, **kw)


def grads_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A 0-d bool tensor on the parameters' device: every gradient the optimiser would apply is finite (one norm over
    them, no host sync). Under bf16 autocast nothing else checks it: there is no GradScaler, and torch's CPU bf16
    convolution can return a non-finite weight gradient (2.14.1: a 3x3 stride-2 convolution on a 1x1 map)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    norm = total(grads) if total else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.isfinite(norm)
