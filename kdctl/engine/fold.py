"""Fold a frozen teacher's BatchNorms into the convolutions that feed them (issue #22).

A frozen BatchNorm (torchvision's / transformers' ``FrozenBatchNorm2d``, or an ``nn.BatchNorm2d`` in eval mode) is
an affine map per channel, ``y = x * s + t``; after a convolution it folds into the convolution's weight and bias
(``W' = W * s``, ``b' = b * s + t``) and the norm becomes an identity. That is exact up to float rounding, and
saves one full pass over every backbone activation of the teacher's forward.

Only the teacher is folded (in place: it is frozen, in eval mode, never optimised nor saved). Pairs are found by
running the model once on a probe input and watching which norm receives which convolution's output: a norm is
folded only when every call of it takes, as its input, the output of one and the same convolution, which that
convolution produces for it alone (no other module receives that output). A norm's forward hooks (the activations
:func:`kdctl.models.detr.backbone.restore_backbone_activations` re-attaches) move to the identity that replaces it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def is_frozen_norm(module: nn.Module) -> bool:
    """A BatchNorm2d computing a fixed affine map: torchvision's / transformers' frozen ones, or a plain (not a
    subclass: timm's ``BatchNormAct2d`` carries an activation) ``nn.BatchNorm2d`` in eval mode."""
    if type(module).__name__.endswith("FrozenBatchNorm2d"):
        return all(hasattr(module, k) for k in ("weight", "bias", "running_mean", "running_var"))
    return type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats


def find_pairs(model: nn.Module, probe: Callable[[], Any]) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, norm) pairs where the norm only ever normalises that convolution's output (one probe forward)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = {m for m in model.modules() if is_frozen_norm(m)}
    produced: dict[int, nn.Conv2d] = {}
    alive: list[Tensor] = []  # keeps the outputs alive, so that their ids stay unique during the probe
    uses: Counter[int] = Counter()
    fed: dict[nn.Module, set[Any]] = defaultdict(set)
    calls: Counter[nn.Module] = Counter()

    def on_conv(module: nn.Module, args: tuple, output: Tensor) -> None:
        alive.append(output)
        produced[id(output)] = module
        calls[module] += 1

    def on_input(module: nn.Module, args: tuple) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is not None and id(x) in produced:
            uses[id(x)] += 1
        if module in norms:
            calls[module] += 1
            fed[module].add(id(x) if x is not None and id(x) in produced else None)

    handles = [c.register_forward_hook(on_conv) for c in convs]
    handles += [m.register_forward_pre_hook(on_input) for m in model.modules()]
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for norm in norms:
        sources = fed.get(norm, set())
        if not sources or None in sources or any(uses[i] != 1 for i in sources):
            continue
        conv = {produced[i] for i in sources}
        if len(conv) == 1 and calls[next(iter(conv))] == calls[norm]:
            pairs.append((next(iter(conv)), norm))
    return pairs


@torch.no_grad()
def fold_into(conv: nn.Conv2d, norm: nn.Module) -> None:
    """``conv`` <- ``norm(conv(x))`` (computed in float64, stored in the conv's dtype)."""
    eps = float(getattr(norm, "eps", 1e-5))
    w = conv.weight.double()
    scale = norm.weight.double() * (norm.running_var.double() + eps).rsqrt()
    shift = norm.bias.double() - norm.running_mean.double() * scale
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)


def fold_frozen_norms(model: nn.Module, probe: Callable[[], Any]) -> int:
    """Fold every foldable frozen norm of ``model`` into its convolution, in place; returns how many.

    ``probe()`` runs the model once (any input: only the data flow is watched). Call it on a frozen model only.
    """
    pairs = find_pairs(model, probe)
    folded = {id(norm): conv for conv, norm in pairs}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            conv = folded.get(id(child))
            if conv is None:
                continue
            fold_into(conv, child)
            identity = nn.Identity()
            identity._forward_hooks.update(child._forward_hooks)  # e.g. a restored timm activation
            setattr(parent, name, identity)
            count += 1
    return count


def fold_teacher(teacher: nn.Module, device: str | torch.device, side: int = 128) -> int:
    """Fold a kdctl teacher's frozen norms (a :class:`~kdctl.models.base.Detector` in eval mode), probing with one
    random ``side`` x ``side`` image through its KD forward (``forward_taps``)."""
    from kdctl.data.batch import Batch

    gen = torch.Generator().manual_seed(0)  # the global RNG is left alone (exact resume)
    side = max(side, int(getattr(teacher, "min_side", 1)))  # LW-DETR / RF-DETR: enough positions for the top-k
    images = torch.rand((1, 3, side, side), generator=gen).to(device)
    batch = Batch(images=images, sizes=[(side, side)], orig_sizes=[(side, side)],
                  targets=[{"boxes": torch.zeros((0, 4), device=device),
                            "labels": torch.zeros((0,), dtype=torch.long, device=device)}], image_ids=[-1])
    return fold_frozen_norms(teacher, lambda: teacher.forward_taps(batch))
