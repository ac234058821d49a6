"""CWD: channel-wise distillation (Shu, Liu, Gao, Yan, Shen, ICCV 2021, arXiv 2011.13256).

Each channel of an FPN map is turned into a distribution over the map's locations (a softmax over h*w at
temperature ``tau``); the student's distributions imitate the teacher's by KL divergence, on every shared level::

    L_cwd = loss_weight * sum_l  tau^2 / (N C) * sum_{n,c} KL( softmax(T_nc / tau) || softmax(f_l(S)_nc / tau) )

``f_l`` is the 1x1 ``align`` adapter where the FPN widths differ (none where they match). This is mmrazor's
``ChannelWiseDivergence`` per level, summed over levels as mmrazor's configs sum one loss per FPN output.

Normalisation (the rule of issue #9, see ``drkd.md``): the published formula already gives each level the same
magnitude per image whatever the batch and the resolution -- it is a mean over images and channels of a divergence
between two distributions over the map; the same images repeated give the same value, and a map upsampled by
repeating each cell gives exactly the same KL (every probability is split evenly over the copies). So no rescaling
is needed and none is applied.

Defaults (:attr:`CWD.DEFAULTS`): mmrazor ``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py``
(Faster R-CNN) and ``cwd_fpn_retina_r101_retina_r50_1x_coco.py`` (RetinaNet, which inherits the former's losses):
``tau = 1``, ``loss_weight = 10`` on each of the 5 FPN outputs (``data_idx`` 0-4: every level). FCOS students have
no published configuration: they take the RetinaNet values (a one-stage detector on the same P3-P7 levels).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdctl.distill.feature import FeatureDistiller, wide

MMRAZOR_CWD = {"tau": 1.0, "loss_weight": 10.0, "levels": 0}  # mmrazor cwd_fpn_*_1x_coco.py: tau=1, loss_weight=10,
#                                                                 all 5 FPN outputs


class CWD(FeatureDistiller):
    """Channel-wise distillation on the shared FPN levels.

    Options (``[kd.cwd]``): ``tau`` (temperature), ``loss_weight`` (per level), ``levels`` (the finest N shared
    levels; 0: all).
    """

    name: ClassVar[str] = "cwd"
    OPTIONS: ClassVar[dict[str, str]] = {"tau": "positive", "loss_weight": "weight"}
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "fasterrcnn": MMRAZOR_CWD,  # cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py
        "retinanet": MMRAZOR_CWD,  # cwd_fpn_retina_r101_retina_r50_1x_coco.py (losses of the frcnn config)
        "fcos": MMRAZOR_CWD,  # no published FCOS config: the RetinaNet values
    }

    def level_loss(self, key: str, stride: int, s: Tensor, t: Tensor) -> Tensor:
        """``loss_weight * tau^2 / (N C) * sum KL`` of the spatial softmaxes; s [N, Cs, h, w], t [N, Ct, h, w]."""
        tau, weight = self.options["tau"], self.options["loss_weight"]
        n, c = t.shape[:2]
        log_s = F.log_softmax(wide(self.aligned(key, s)).flatten(2) / tau, dim=-1)  # [N, C, hw]
        log_t = F.log_softmax(wide(t).flatten(2) / tau, dim=-1)
        kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)  # sum p_t (log p_t - log p_s)
        return kl * (weight * tau**2 / (n * c))
