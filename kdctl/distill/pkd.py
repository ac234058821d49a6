"""PKD: feature imitation by Pearson correlation (Cao, Zhang, Gu, Zeng, Zhang, Wang, NeurIPS 2022, arXiv 2207.02039).

Each channel of an FPN map is standardised over the batch and the locations (zero mean, unit variance); the
student imitates the teacher's standardised maps by MSE, on the finest shared levels::

    z(X)_c = (X_c - mean_{n,h,w} X_c) / (std_{n,h,w} X_c + 1e-6)          (std: unbiased, as torch.std)
    L_pkd  = loss_weight * sum_l  mean_{n,c,h,w} (z(f_l(S)) - z(T))^2 / 2

which is ``1 - r`` per channel, r the Pearson correlation of the two maps: the teacher's feature magnitudes do not
matter, which is what lets PKD distil across detector types (the paper's FCOS -> RetinaNet and Faster R-CNN ->
RetinaNet pairs). ``f_l`` is the 1x1 ``align`` adapter where the FPN widths differ (none where they match). This is
mmrazor's ``PKDLoss`` per level; levels are matched by stride, so no resizing is needed.

Normalisation (the rule of issue #9, see ``drkd.md``): the published formula is a mean over all elements of
standardised maps, so each level has the same magnitude per image whatever the batch size and resolution (the same
images repeated change it only through the unbiased variance's ``M / (M - 1)``, M = N h w); no rescaling is needed
and none is applied.

Defaults (:attr:`PKD.DEFAULTS`), mmrazor ``configs/distill/mmdet/pkd``: Faster R-CNN students
``loss_weight = 6`` (``pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py``), RetinaNet students ``loss_weight = 10``
(``pkd_fpn_retina_x101_retina_r50_2x_coco.py``; also the FCOS -> RetinaNet config
``pkd_fpn_fcos_x101_retina_r50_1x_coco.py``), both on the 4 finest FPN outputs (``data_idx`` 0-3). FCOS students
have no published configuration: they take the RetinaNet values (a one-stage detector on the same P3-P7 levels).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from kdctl.distill.feature import FeatureDistiller, wide

EPS = 1e-6  # added to the standard deviation, as mmrazor's PKDLoss.norm


def standardise(x: Tensor) -> Tensor:
    """Per channel over (N, h, w): x [N, C, h, w] -> (x - mean) / (unbiased std + 1e-6), float32."""
    x = wide(x)
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + EPS)


class PKD(FeatureDistiller):
    """Pearson-correlation feature imitation on the finest shared FPN levels.

    Options (``[kd.pkd]``): ``loss_weight`` (per level), ``levels`` (the finest N shared levels; 0: all).
    """

    name: ClassVar[str] = "pkd"
    OPTIONS: ClassVar[dict[str, str]] = {"loss_weight": "weight"}
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "fasterrcnn": {"loss_weight": 6.0, "levels": 4},  # pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py: PKDLoss
        #                                                    loss_weight=6 on fpn outputs 0-3
        "retinanet": {"loss_weight": 10.0, "levels": 4},  # pkd_fpn_retina_x101_retina_r50_2x_coco.py (and
        #                                                    pkd_fpn_fcos_x101_retina_r50_1x_coco.py): 10, outputs 0-3
        "fcos": {"loss_weight": 10.0, "levels": 4},  # no published FCOS-student config: the RetinaNet values
    }

    def level_loss(self, key: str, stride: int, s: Tensor, t: Tensor) -> Tensor:
        """``loss_weight * mean (z(f(S)) - z(T))^2 / 2``; s [N, Cs, h, w], t [N, Ct, h, w]."""
        diff = standardise(self.aligned(key, s)) - standardise(t)
        return diff.square().mean() * (self.options["loss_weight"] / 2)
