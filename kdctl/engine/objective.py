"""Student (+ distiller) as one module: what one training step differentiates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.engine.precision import to_float32


class Objective(nn.Module):
    """Student (+ distiller) as one module, so DDP sees every trainable parameter.

    ``forward(batch)`` -> dict of scalar loss terms (detection terms, then ``kd_*`` terms).

    ``teacher_amp``: the autocast dtype the teacher's work (:meth:`teacher_taps`) runs in, whatever the step's own
    autocast (None: float32). When the step itself runs in float32, the teacher's floating-point taps are cast
    back to float32, so the KD loss is computed in the student's precision.
    """

    def __init__(self, student: nn.Module, distiller: nn.Module | None = None,
                 teacher_amp: torch.dtype | None = None) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller
        self.teacher_amp = teacher_amp

    def teacher_taps(self, batch: Batch) -> dict[str, Any]:
        dev = batch.images.device.type
        outer = torch.is_autocast_enabled(dev)
        with torch.autocast(dev, dtype=self.teacher_amp or torch.float32, enabled=self.teacher_amp is not None):
            taps = self.distiller.teacher_taps(batch)
        return taps if outer or self.teacher_amp is None else to_float32(taps)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = self.student.forward_train(batch, taps=self.distiller is not None)  # no KD taps in plain training
        terms = dict(out.losses)
        if self.distiller is not None:
            terms.update(self.distiller(out, self.teacher_taps(batch), batch))
        return terms
