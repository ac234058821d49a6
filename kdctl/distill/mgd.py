"""MGD: masked generative distillation (Yang, Li, Shu, Li, Yuan, ECCV 2022, arXiv 2205.01529).

On each distilled FPN level a random spatial mask drops a fraction ``lambda_mgd`` of the student's locations (the
same locations in every channel); a small generator (3x3 conv, ReLU, 3x3 conv, teacher width) must rebuild the
teacher's whole map from what is left::

    M ~ Bernoulli(1 - lambda_mgd)  [N, 1, h, w]        (0 = dropped; a fresh mask per level and step)
    L_l   = alpha_mgd * sum_{n,c,h,w} (G_l(f_l(S) * M) - T)^2 / N          (the authors' loss)
    L_mgd = sum_l L_l

``f_l`` is the 1x1 ``align`` adapter where the FPN widths differ (none where they match) and ``G_l`` the level's
generator (mmrazor's ``MGDConncetor`` + ``MGDLoss``). Both are trainable parts of the distiller: saved with the
run, never exported.

Normalisation (the rule of issue #9, see ``drkd.md``; ``normalize = true``, default): the authors' loss is per image
(``/ N``) but a SUM over the locations, so it grows with the image area: the published ``alpha_mgd`` holds for
images of about 800x1333. The default replaces that sum by the mean over locations times the location count of an
800x1333 image at the level's stride (``800 * 1333 / stride^2``, DRKD's reference): at the reference size it equals
the authors' loss, and at any batch size or resolution each level keeps the reference magnitude per image. The
channel sum is kept (as DRKD keeps it). ``normalize = false`` is the authors' loss, for runs at the reference size.

Defaults (:attr:`MGD.DEFAULTS`): RetinaNet students ``alpha_mgd = 2e-5``, ``lambda_mgd = 0.65`` on all 5 FPN outputs
(mmrazor ``configs/distill/mmdet/mgd/mgd_fpn_retina_x101_retina_r50_2x_coco.py``, the same as the authors'
``yzd-v/MGD`` ``det/configs/distillers/mgd/retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``). mmrazor records
no Faster R-CNN MGD config; Faster R-CNN students take the authors' (``yzd-v/MGD``
``cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py``): ``alpha_mgd = 5e-7``,
``lambda_mgd = 0.45`` on ``fpn_convs`` 0-3 (P2-P5: the 4 finest levels). FCOS students have no published
configuration: they take the RetinaNet values. (Those configs also initialise the student's neck and head from the
teacher and clip gradients at norm 35. kdctl keeps the student's own init but applies the clipping
(:attr:`MGD.optim_defaults`) when the recipe has none: without it, on the quickstart's FCOS pair at 160 px, the MGD
term reached ~170x the detection loss and the loss went non-finite at step 95 of 280 (seed 0); with it the same run
trained to 28.7 AP against 17.9 without KD. See benchmarks/results/kd_methods.md.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.distill.drkd import REFERENCE_AREA
from kdctl.distill.feature import FeatureDistiller, level_key, wide
from kdctl.models.base import Detector

RETINANET_MGD = {"alpha_mgd": 2e-5, "lambda_mgd": 0.65, "levels": 0, "normalize": True}  # mmrazor
#   mgd_fpn_retina_x101_retina_r50_2x_coco.py: MGDLoss alpha_mgd=0.00002, MGDConncetor lambda_mgd=0.65, fpn0-fpn4


def generator(channels: int) -> nn.Sequential:
    """The authors' generator: 3x3 conv, ReLU, 3x3 conv, ``channels`` wide, [N, C, h, w] -> [N, C, h, w]."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


class MGD(FeatureDistiller):
    """Masked generative distillation on the shared FPN levels.

    Options (``[kd.mgd]``): ``alpha_mgd`` (loss weight), ``lambda_mgd`` (fraction of locations masked),
    ``normalize`` (per-image reference magnitude, default; false: the authors' sum), ``levels`` (the finest N
    shared levels; 0: all).
    """

    name: ClassVar[str] = "mgd"
    # the published configurations' optim_wrapper clip_grad max_norm 35 (mmrazor
    # mgd_fpn_retina_x101_retina_r50_2x_coco.py; yzd-v/MGD's det configs)
    optim_defaults: ClassVar[dict[str, Any]] = {"clip_grad": 35.0}
    OPTIONS: ClassVar[dict[str, str]] = {"alpha_mgd": "weight", "lambda_mgd": "fraction", "normalize": "bool"}
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "fasterrcnn": {"alpha_mgd": 5e-7, "lambda_mgd": 0.45, "levels": 4, "normalize": True},  # yzd-v/MGD
        #   cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py (mmrazor has no Faster R-CNN MGD)
        "retinanet": RETINANET_MGD,
        "fcos": RETINANET_MGD,  # no published FCOS config: the RetinaNet values
    }

    def __init__(self, teacher: Detector, student: Detector, **options: Any) -> None:
        super().__init__(teacher, student, **options)
        ct = self.channels[1]
        self.generation = nn.ModuleDict({level_key(s): generator(ct) for s in self.strides})

    def draw_mask(self, n: int, h: int, w: int, like: Tensor) -> Tensor:
        """[N, 1, h, w] of 0 (a dropped location, probability ``lambda_mgd``) and 1, in ``like``'s dtype/device,
        from torch's global RNG (the run's seed; saved for resume with the other RNG states)."""
        keep = torch.rand((n, 1, h, w), device=like.device) <= 1 - self.options["lambda_mgd"]
        return keep.to(like.dtype)

    def level_loss(self, key: str, stride: int, s: Tensor, t: Tensor) -> Tensor:
        """``alpha * sum (G(f(S) * M) - T)^2 / N`` (normalised: ``/ (N h w) * 800*1333 / stride^2``)."""
        x = self.aligned(key, s)
        n, _, h, w = x.shape
        rebuilt = self.generation[key](x * self.draw_mask(n, h, w, x))
        sq = (wide(rebuilt) - wide(t)).square().sum()
        scale = REFERENCE_AREA / (stride * stride * h * w) if self.options["normalize"] else 1.0
        return sq * (self.options["alpha_mgd"] * scale / n)
