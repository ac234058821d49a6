"""An exponential moving average of the student's weights (``[train] ema`` of a recipe).

The formula of the official RT-DETRv2 ``ModelEMA`` (rtdetrv2_pytorch/src/optim/ema.py, after
pytorch-image-models): after each optimiser step, ``updates += 1``, ``d = decay * (1 - exp(-updates / warmups))``
and every floating-point parameter and buffer (a tied tensor once) becomes ``ema * d + (1 - d) * raw``;
integer buffers keep the values of the copy. With EMA on, evaluation, ``best/`` and exports use the EMA weights;
``last/`` holds the raw weights and, in ``trainer.pt``, the EMA state (:meth:`ModelEMA.state_dict`), so a resumed
run continues both exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

DEFAULTS: dict[str, Any] = {"decay": 0.9999, "warmups": 2000}
"""The official RT-DETRv2 values (configs/runtime.yml, configs/rtdetrv2/include/optimizer.yml)."""


def ema_settings(value: Any) -> dict[str, Any]:
    """A recipe's ``[train] ema`` (true, false, or ``{decay, warmups}``) as ``{"decay", "warmups"}``;
    decay 0 = off."""
    if isinstance(value, dict):
        out = {**DEFAULTS, **value}
    elif value is True:
        out = dict(DEFAULTS)
    else:
        out = {**DEFAULTS, "decay": 0.0}
    return {"decay": float(out["decay"]), "warmups": int(out["warmups"])}


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``model`` by name, each tensor once."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class ModelEMA:
    """An EMA copy (``module``, eval mode, no gradients) of ``model``, updated with :meth:`update`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmups = float(decay), max(1, int(warmups))
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1-based): ``decay * (1 - exp(-updates / warmups))``."""
        return self.decay * (1 - math.exp(-updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        # named_parameters/buffers list a tied tensor once (a state dict lists it under each name: averaged twice)
        avg, raw = tensors(self.module), tensors(model)
        keys = [k for k, v in avg.items() if v.dtype.is_floating_point]
        if keys:  # one multi-tensor kernel per operation on GPUs instead of one per tensor
            torch._foreach_mul_([avg[k] for k in keys], d)
            torch._foreach_add_([avg[k] for k in keys], [raw[k].detach().to(avg[k].dtype) for k in keys], alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and an int (``torch.load(weights_only=True)`` reads it back)."""
        return {"module": dict(self.module.state_dict()), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def build_ema(settings: dict[str, Any] | None, student: nn.Module) -> ModelEMA | None:
    """The EMA of ``student`` the run's ``cfg.ema`` asks for, or None (off: decay 0 or no setting)."""
    s = ema_settings(settings) if settings else None
    if not s or s["decay"] <= 0:
        return None
    return ModelEMA(student, s["decay"], s["warmups"])


def evaluated_model(ema: ModelEMA | None, student: nn.Module) -> nn.Module:
    """The weights a run evaluates, saves as ``best/`` and so exports: the EMA's when on, else the student's."""
    return ema.module if ema is not None else student
