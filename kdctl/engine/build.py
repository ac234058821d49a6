"""What a run is made of, built from a :class:`RunConfig` in small steps that benchmarks and notebooks reuse.

    open_data(cfg)                        -> Data        validated splits (before anything heavy is loaded)
    build_models(cfg, data, device, ...)  -> Models      method, teacher, recipe, student, distiller
    build_loaders(cfg, data, dist, ...)   -> Loaders     per-rank loaders, steps per epoch, total steps
    build_optimisation(cfg, models, ...)  -> Optimisation  autocast dtypes, objective (DDP), optimiser, schedule

Each step fills the options the user left unset (recipe values, image size, batch size, epochs) into ``cfg``,
which :class:`kdctl.engine.trainer.Trainer` then writes to the run's ``config.toml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdctl.engine.config import RunConfig, apply_recipe, default_recipe_name, effective_lr, load_recipe, lr_lambda
from kdctl.engine.ema import ModelEMA, build_ema
from kdctl.engine.objective import Objective
from kdctl.engine.optim import build_optimizer
from kdctl.engine.precision import (
    amp_dtype,
    prepare_device,
    teacher_amp_dtype,
    to_channels_last,
    use_channels_last,
)
from kdctl.errors import BackboneWeightsUnavailable, KdctlError

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.data.coco import CocoData
    from kdctl.engine.distributed import DistInfo
    from kdctl.models.base import Detector

Warn = Callable[[str], None]


@dataclass
class Data:
    """The validated training and validation splits, their class names and the ``--label-map``."""

    train: CocoData
    val: CocoData
    names: list[str]
    label_map: dict[str, str] | None


@dataclass
class Models:
    """Teacher (None for ``train``), student, distiller (None without KD), the method and the recipe's name."""

    teacher: Detector | None
    student: Detector
    distiller: nn.Module | None
    method: str
    recipe: str
    channels_last: bool
    trainable: dict[str, Any] | None = None  # which student parameters train (:func:`trainable_summary`)


@dataclass
class Loaders:
    """Per-rank loaders over the splits and the schedule's length in micro-batches and optimiser steps."""

    train_set: Any
    sampler: Any
    loader: Any
    val_set: Any
    val_sampler: Any
    val_loader: Any
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


@dataclass
class Optimisation:
    """Autocast dtypes, the differentiated module (DDP-wrapped when distributed), optimiser, schedule, scaler."""

    amp: torch.dtype | None
    teacher_amp: torch.dtype | None
    objective: Objective
    model: nn.Module
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None = None  # the student's weight average (``[train] ema``), updated after each step


def open_data(cfg: RunConfig, warn: Warn) -> Data:
    """Read and validate the training and validation splits (fatal problems raise KdctlError; warnings go to
    ``warn``). An empty training split is fatal; both splits must share their categories."""
    from kdctl.data.coco import check_same_classes, load_label_map, open_split

    train = open_split(cfg.data, "train", ann=cfg.train_ann, images=cfg.images, format=cfg.format)
    for w in train.warnings:
        warn(w)
    if not any(not a.get("iscrowd", 0) for a in train.coco["annotations"]):
        raise KdctlError(f"{train.ann_path}: the training split has no boxes (no annotations, or only crowd ones); "
                         "there is nothing to learn from")
    val = open_split(cfg.data, "val", ann=cfg.val_ann, images=cfg.images, format=cfg.format)
    for w in val.warnings:
        warn(w)
    check_same_classes(train, val)
    return Data(train=train, val=val, names=list(train.names), label_map=load_label_map(cfg.label_map))


def build_teacher(cfg: RunConfig, teacher_r: Any, data: Data, device: str) -> Detector:
    """The teacher, on ``device``, frozen, in eval mode, its frozen BatchNorms folded into its convolutions
    (:mod:`kdctl.engine.fold`), its labels mapped to the data's classes. A teacher that
    lacks one of them is refused with the ``kdctl train`` command that fine-tunes it on the data first."""
    from kdctl.models.labels import match_classes
    from kdctl.specs import load_detector

    teacher = load_detector(teacher_r, pretrained_backbone=False, trust_remote_code=cfg.trust_remote_code)
    rows = match_classes(data.names, teacher.label_names, data.label_map)
    missing = [n for n, r in zip(data.names, rows, strict=True) if r is None]
    if missing:
        have = ", ".join(teacher.label_names[:12]) + (", ..." if len(teacher.label_names) > 12 else "")
        raise KdctlError(
            f"the teacher has no label for dataset class(es) {', '.join(repr(m) for m in missing)} (teacher labels: "
            f"{have}); a teacher must know the data's classes: fine-tune it on the data first with "
            f"`{teacher_command(cfg)}` and pass that run as --teacher")
    teacher.set_classes(data.names, data.label_map)
    teacher.eval().requires_grad_(False).to(device)
    if cfg.fold_teacher_norms:
        from kdctl.engine.fold import fold_teacher

        fold_teacher(teacher, device)  # its frozen BatchNorms into its convolutions: same outputs, faster (#22)
    return teacher


def teacher_command(cfg: RunConfig) -> str:
    """The ``kdctl train`` command that fine-tunes ``cfg.teacher`` on ``cfg.data`` (a new head for its classes)."""
    import shlex

    name = f"{cfg.name}-teacher" if cfg.name else "teacher"
    parts = ["kdctl", "train", "--model", str(cfg.teacher), "--data", str(cfg.data)]
    for opt, value in (("--format", cfg.format), ("--train-ann", cfg.train_ann),
                       ("--val-ann", cfg.val_ann), ("--images", cfg.images), ("--label-map", cfg.label_map),
                       ("--output", None if Path(cfg.output).absolute() == Path("runs").absolute() else cfg.output)):
        if value and not (opt == "--format" and value == "auto"):
            parts += [opt, str(value)]
    return shlex.join([*parts, "--name", name])


def fit_head(cfg: RunConfig, student: Detector, names: list[str], label_map: dict[str, str] | None, exact: bool,
             say: Warn) -> None:
    """``--head`` applied to a student built from a checkpoint (:mod:`kdctl.models.labels`): a new head for
    ``names`` when it lacks one of them (``exact``: when its labels are not exactly ``names``, KD-DETR's pairing
    rule), or always with ``--head new``; says so in one line."""
    from kdctl.models.labels import plan_head

    plan = plan_head(names, student.label_names, label_map, cfg.head, exact=exact)
    if plan is None:
        return
    student.replace_head(list(plan.names), plan.keep, keep_background=not plan.fresh)
    say(plan.message())


def build_student(cfg: RunConfig, source: Any, names: list[str], overrides: dict[str, Any], warn: Warn) -> Detector:
    """The student from ``source`` (a spec, or the last checkpoint on resume). Its random init depends on
    ``--seed`` only, not on what was built before it (the teacher): a distillation run starts from exactly the
    student its ``kdctl train`` baseline with the same seed starts from. Without ImageNet weights (offline, or
    none exist) it says so in one line and trains the backbone from scratch."""
    from kdctl.specs import load_detector

    def build(pretrained: bool) -> Detector:
        return load_detector(source, label_names=names, pretrained_backbone=pretrained,
                             trust_remote_code=cfg.trust_remote_code, overrides=overrides)

    torch.manual_seed(cfg.seed)
    try:
        return build(cfg.pretrained_backbone)
    except BackboneWeightsUnavailable as e:
        warn(f"{str(e).split('; pass')[0]}; training the backbone from scratch (--no-pretrained-backbone says so "
             "up front)")
        cfg.pretrained_backbone = False
        return build(False)


def student_overrides(cfg: RunConfig, student_r: Any, last: Path | None, method_over: dict[str, Any]) -> dict[str, Any]:
    """Preset values the student is built with: the method's (e.g. KD-DETR with learned queries: the teacher's
    query count) and ``--backbone-weights``, for students built from presets only."""
    fresh = last is None and student_r.kind == "preset"
    over = dict(method_over) if fresh else {}
    if cfg.backbone_weights and fresh:
        over["backbone_weights"] = str(Path(cfg.backbone_weights).expanduser().resolve())
    elif cfg.backbone_weights and last is None:
        raise KdctlError(f"--backbone-weights applies to a model built from a preset; {student_r.spec} already "
                         "has its weights")
    return over


def build_models(cfg: RunConfig, data: Data, device: str, last: Path | None, warn: Warn,
                 info: Warn | None = None) -> Models:
    """Method choice (before any weights load: an unsupported pair is refused at once), teacher, the student's
    recipe, student and distiller, on ``device`` (channels-last when on). ``last``: the checkpoint a resumed run
    continues from."""
    from kdctl.distill.base import choose_method, distiller_class, method_options
    from kdctl.models.labels import check_head_mode
    from kdctl.specs import resolve

    cfg.head = check_head_mode(cfg.head)
    prepare_device(device)  # CUDA: this run's own peak memory, cudnn.benchmark
    student_r = resolve(cfg.model)
    method, teacher_r = "none", None
    if cfg.task == "distill":
        if cfg.teacher is None:
            raise KdctlError("distill needs --teacher SPEC")
        teacher_r = resolve(cfg.teacher)
        method = choose_method(cfg.method, teacher_r.family, student_r.family, teacher_r.architecture or
                               teacher_r.spec, student_r.architecture or student_r.spec)
    teacher = build_teacher(cfg, teacher_r, data, device) if teacher_r is not None else None
    dist_cls = distiller_class(method) if teacher is not None and method != "none" else None
    student_names, method_over = (dist_cls.student_setup(teacher, data.names) if dist_cls is not None
                                  else (list(data.names), {}))
    exact = dist_cls is not None and dist_cls.same_label_space
    if cfg.task == "train" and cfg.student_setup:  # a baseline paired with a distillation: the same student
        s = cfg.student_setup
        student_names, method_over, exact = list(s["labels"]), dict(s.get("overrides", {})), bool(s.get("exact"))
    elif cfg.task == "distill":
        cfg.student_setup = {"labels": list(student_names), "overrides": dict(method_over), "exact": exact}
    recipe = cfg.recipe or default_recipe_name(student_r.architecture or student_r.spec, student_r.family)
    apply_recipe(cfg, load_recipe(recipe))
    cfg.recipe = str(Path(recipe).expanduser().resolve()) if recipe.endswith(".toml") else recipe  # resumable anywhere
    for key, value in (dist_cls.optim_defaults if dist_cls is not None else {}).items():
        if not cfg.optim.get(key):  # what the method's published configuration relies on (MGD: clip_grad 35)
            cfg.optim[key] = value
            (info or warn)(f"{method}: [optim] {key} = {value}, as the method's published configuration has it")
    over = student_overrides(cfg, student_r, last, method_over)
    student = build_student(cfg, str(last) if last is not None else student_r, student_names, over, warn)
    if last is None:  # a resumed run's last/ already has its head
        fit_head(cfg, student, student_names, data.label_map, exact, info or warn)
    student.set_classes(data.names, data.label_map, hint="; or give the model a head for the data's classes with "
                        "--head auto" if cfg.head == "keep" else "")
    if student.family == "detr" and cfg.freeze_backbone_stages:
        from kdctl.models.detr import freeze_backbone_stages

        freeze_backbone_stages(student.model, int(cfg.freeze_backbone_stages))
    student.to(device).train()
    cfg.imgsz = cfg.imgsz or student.imgsz
    student.imgsz = int(cfg.imgsz)  # saved with the model: eval, inspect and export use the trained size
    distiller = None
    if dist_cls is not None:
        distiller = dist_cls(teacher, student, **method_options(cfg.kd, method)).to(device)
    channels_last = use_channels_last(cfg.channels_last)
    if channels_last:
        to_channels_last(teacher, student, distiller)
    return Models(teacher=teacher, student=student, distiller=distiller, method=method, recipe=recipe,
                  channels_last=channels_last, trainable=trainable_summary(student))


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Which parameters train, for ``config.toml``: counts, and the frozen ones as the outermost modules whose
    parameters are all frozen."""
    params = dict(model.named_parameters())
    frozen: list[str] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters()]
        if not own or any(p.requires_grad for p in own) or any(name.startswith(f + ".") for f in frozen):
            continue
        frozen.append(name)
    return {"parameters": sum(p.numel() for p in params.values() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params.values()),
            "tensors": sum(p.requires_grad for p in params.values()), "frozen": frozen}


def pad_stride(models: Models) -> int:
    """The multiple a batch is padded to: the largest any of the run's models needs (1: none)."""
    return max(int(getattr(m, "pad_stride", 32)) for m in (models.student, models.teacher) if m is not None)


def build_loaders(cfg: RunConfig, data: Data, dist: DistInfo, device: str, stride: int = 32) -> Loaders:
    """Loaders of a per-rank share of the global batch, augmentation seeded per sample (exact resume); fills
    ``cfg.batch_size`` (8) and ``cfg.epochs`` (12) when neither they nor --max-steps are set. ``stride``: the
    multiple batches are padded to (:func:`pad_stride` of the run's models)."""
    import functools

    from kdctl.data.augment import AugmentBatchSampler, AugmentPipeline, parse_augment, resolve_stop_epoch
    from kdctl.data.batch import collate
    from kdctl.data.dataset import CocoDetection, make_loader
    from kdctl.engine.sampler import ResumableSampler

    cfg.batch_size = cfg.batch_size or 8
    if cfg.batch_size % dist.world:
        raise KdctlError(f"--batch-size {cfg.batch_size} is not divisible by the {dist.world} processes")
    per_rank = cfg.batch_size // dist.world
    pin = device.startswith("cuda")
    plan = parse_augment(cfg.augment)  # None without an [augment] table: the plain pipeline, as before
    aug = AugmentPipeline(plan, cfg.imgsz, cfg.hflip) if plan is not None else None
    train_set = CocoDetection(data.train, cfg.imgsz, train=True, hflip=cfg.hflip, augment=aug)
    sampler = ResumableSampler(len(train_set), seed=cfg.seed, rank=dist.rank, world=dist.world)
    batches = math.ceil(sampler.per_rank() / per_rank)
    steps = max(1, batches // cfg.grad_accum)
    if cfg.max_steps is None and cfg.epochs is None:
        cfg.epochs = 12
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps
    epochs = math.ceil(total / steps)
    # per-batch augmentation (multi-scale size, stop epoch) is drawn by the batch sampler (kdctl.data.augment)
    batch_sampler = None if plan is None else AugmentBatchSampler(
        sampler, per_rank, plan.sizes(cfg.imgsz), resolve_stop_epoch(plan.stop_epoch, epochs))
    # the loaders get their own generators: creating an iterator must not consume the global RNG (exact resume)
    loader = make_loader(train_set, per_rank, shuffle=False, sampler=sampler, workers=cfg.workers, pin_memory=pin,
                         generator=torch.Generator().manual_seed(cfg.seed), batch_sampler=batch_sampler)
    val_set = CocoDetection(data.val, cfg.imgsz, train=False)
    val_sampler = ResumableSampler(len(val_set), shuffle=False, rank=dist.rank, world=dist.world)
    val_loader = make_loader(val_set, per_rank, shuffle=False, sampler=val_sampler, workers=cfg.workers,
                             pin_memory=pin, generator=torch.Generator().manual_seed(0))
    for dl in (loader, val_loader):  # padding only where a model needs it (#22)
        dl.collate_fn = functools.partial(collate, stride=stride)
    return Loaders(train_set=train_set, sampler=sampler, loader=loader, val_set=val_set, val_sampler=val_sampler,
                   val_loader=val_loader, batches_per_epoch=batches, steps_per_epoch=steps, total_steps=total,
                   epochs=epochs)


def build_optimisation(cfg: RunConfig, models: Models, dist: DistInfo, device: str,
                       total_steps: int) -> Optimisation:
    """Autocast dtypes (student ``--amp``, teacher ``--teacher-amp``), the objective (wrapped in DDP when
    distributed), the recipe's optimiser with its lr (scaled as the recipe says), warm-up + step schedule and the
    fp16 gradient scaler, and the EMA of the student when ``cfg.ema`` asks for one."""
    amp = amp_dtype(cfg.amp, device)
    teacher_amp = teacher_amp_dtype(cfg.teacher_amp, device, amp) if models.teacher is not None else None
    objective = Objective(models.student, models.distiller, teacher_amp=teacher_amp)
    model: nn.Module = objective
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = DDP(objective, device_ids=ids, find_unused_parameters=True)
    lr = effective_lr(cfg)
    optimizer = build_optimizer(models.student, models.distiller, cfg.optim, lr)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, o["warmup_steps"], o["warmup_factor"], o["milestones"], o["gamma"]))
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return Optimisation(amp=amp, teacher_amp=teacher_amp, objective=objective, model=model, lr=lr,
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=build_ema(cfg.ema, models.student))
