"""The one training loop behind ``kdctl train`` (supervised) and ``kdctl distill`` (student + KD loss).

Per optimiser step (``grad_accum`` micro-batches)::

    batch -> student.forward_train (losses + taps) ─┐
          -> distiller.teacher_taps (no_grad) ──────┴─> distiller terms ─> sum ─> backward ─> clip ─> step

Exact resume: the data order of an epoch is a function of (seed, epoch), each sample's augmentation a function of
its own seed (:mod:`kdctl.engine.sampler`), and the checkpoint holds every RNG state as of the last optimiser
step, so a run stopped after k steps and resumed ends bit for bit where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.engine import distributed as D
from kdctl.engine.checkpoint import (
    checkpoint_dir,
    clean_stale_temps,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdctl.engine.config import (
    RunConfig,
    apply_recipe,
    default_recipe_name,
    effective_lr,
    load_recipe,
    lr_lambda,
    read_config,
    save_interval,
    write_config,
)
from kdctl.engine.progress import MetricsLog, Reporter, percent, plot
from kdctl.engine.runlock import RunLock
from kdctl.errors import BackboneWeightsUnavailable, KdctlError

MAX_NONFINITE = 5
"""Consecutive non-finite losses after which a run stops."""


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
        out = self.student.forward_train(batch)
        terms = dict(out.losses)
        if self.distiller is not None:
            terms.update(self.distiller(out, self.teacher_taps(batch), batch))
        return terms


def to_float32(tree: Any) -> Any:
    """Every floating-point tensor of a nested dict / list / tuple as float32 (other leaves unchanged)."""
    if isinstance(tree, Tensor):
        return tree.float() if tree.is_floating_point() and tree.dtype != torch.float32 else tree
    if isinstance(tree, dict):
        return {k: to_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float32(v) for v in tree)
    return tree


@dataclass
class Position:
    """Where the loop is: optimiser steps done, epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best_ap: float = -1.0
    steps: int = 0
    seconds: float = 0.0
    step_time: float = 0.0
    peak_memory_mb: float = 0.0
    interrupted: bool = False
    method: str = "none"


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """--amp auto|bf16|fp16|off -> autocast dtype (None = full precision). auto: bf16 on CUDA if supported."""
    amp = amp.lower()
    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if not device.startswith("cuda"):
            raise KdctlError("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
        return torch.float16
    raise KdctlError(f"--amp {amp!r}: use auto, bf16, fp16 or off")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 (Ampere or newer), or a CPU with AMX or
    AVX512-BF16 (oneDNN then runs bf16 convolutions and matmuls 2-3x faster than float32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def teacher_amp_dtype(setting: str, device: str, student_amp: torch.dtype | None) -> torch.dtype | None:
    """--teacher-amp auto|bf16|fp16|off -> the autocast dtype of the teacher's forward (None = float32).

    auto: the student's --amp dtype when it has one; otherwise bfloat16 where the device computes it natively
    (:func:`native_bf16`), else float32. The teacher only runs inference, so its precision costs the student
    nothing in optimisation; its taps come back as float32 when the student's step is float32.
    """
    setting = setting.lower()
    if setting == "auto":
        if student_amp is not None:
            return student_amp
        return torch.bfloat16 if native_bf16(device) else None
    try:
        return amp_dtype(setting, device)
    except KdctlError as e:
        raise KdctlError(str(e).replace("--amp", "--teacher-amp")) from None


def use_channels_last(setting: bool | None) -> bool:
    """--channels-last / --no-channels-last; auto (None): on.

    Channels-last (NHWC) is the layout in which oneDNN's AMX kernels (CPU) and cuDNN's tensor cores (CUDA) run
    bf16 / fp16 convolutions. On a 2-core Xeon with AMX (1 thread, 2 x 320 px), a ResNet-50 FPN forward under bf16
    autocast takes 442 ms in NCHW and 201 ms in NHWC (480 ms in float32); in float32 the layout is about neutral
    (within 5 % per training step, ``benchmarks/overhead.py``). Only 4-d parameters, buffers and activations change layout; values and checkpoints do not.
    """
    return True if setting is None else bool(setting)


def to_channels_last(*modules: nn.Module | None) -> None:
    """Move the 4-d parameters and buffers of ``modules`` to channels-last, in place (teacher, student,
    distiller). Convolutions then produce channels-last activations from any input layout."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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


class Trainer:
    """Build everything from a RunConfig (or a run directory to resume) and run the loop.

    ``on_step(trainer)`` is called after every optimiser step (tests use it to interrupt a run).
    """

    def __init__(self, cfg: RunConfig | None = None, *, resume: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, on_step: Callable[[Trainer], None] | None = None,
                 reporter: Reporter | None = None) -> None:
        self.on_step = on_step
        self.resume_from: Path | None = None
        if resume is not None:
            run = Path(resume).expanduser()
            cfg, _ = read_config(run / "config.toml")
            given = RunConfig(**{k: v for k, v in (overrides or {}).items()}).absolute_paths()
            for k in overrides or {}:
                setattr(cfg, k, getattr(given, k))
            self.resume_from = run
        elif cfg is None:
            raise ValueError("a RunConfig or a run directory to resume is needed")
        else:
            cfg.absolute_paths()
        self.cfg = cfg
        self.lock: RunLock | None = None
        self._reporter = reporter

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from kdctl.commands import open_split, warn
        from kdctl.data.coco import check_same_classes, load_label_map
        from kdctl.data.dataset import CocoDetection, make_loader
        from kdctl.distill.base import choose_method, distiller_class
        from kdctl.engine.rundir import new_run_dir, resolve_device
        from kdctl.engine.sampler import ResumableSampler
        from kdctl.specs import load_detector, resolve

        cfg = self.cfg
        if cfg.model is None:
            raise KdctlError("no model: pass --model SPEC (train) or --student SPEC (distill)")
        if cfg.grad_accum < 1:
            raise KdctlError("--grad-accum must be >= 1")
        device = resolve_device(cfg.device)
        self.dist = D.setup(device)
        if self.dist.enabled and device.startswith("cuda"):
            device = f"cuda:{self.dist.local_rank}"
        self.device = device
        main = self.dist.is_main
        if self.resume_from is not None and main:  # before anything in the run directory is read or written
            self.lock = RunLock(self.resume_from).acquire()
            clean_stale_temps(self.resume_from)
        self.report = self._reporter or Reporter(enabled=main and not cfg.quiet)
        torch.manual_seed(cfg.seed)

        # data first: a broken dataset fails before anything heavy is loaded
        train_split = "train"
        self.train_data = open_split(cfg.data, train_split, ann=cfg.train_ann, images=cfg.images)
        if not any(not a.get("iscrowd", 0) for a in self.train_data.coco["annotations"]):
            raise KdctlError(f"{self.train_data.ann_path}: the training split has no boxes (no annotations, or only "
                             "crowd ones); there is nothing to learn from")
        self.val_data = open_split(cfg.data, "val", ann=cfg.val_ann, images=cfg.images)
        check_same_classes(self.train_data, self.val_data)
        names = self.train_data.names
        label_map = load_label_map(cfg.label_map)

        # method choice before loading weights: an unsupported pair is refused at once
        student_r = resolve(cfg.model)
        self.method = "none"
        teacher_r = None
        if cfg.task == "distill":
            if cfg.teacher is None:
                raise KdctlError("distill needs --teacher SPEC")
            teacher_r = resolve(cfg.teacher)
            self.method = choose_method(cfg.method, teacher_r.family, student_r.family, teacher_r.architecture or
                                        teacher_r.spec, student_r.architecture or student_r.spec)
        self.teacher = None
        dist_cls = None
        student_names, student_over = list(names), {}
        if teacher_r is not None:
            self.teacher = load_detector(teacher_r, pretrained_backbone=False, trust_remote_code=cfg.trust_remote_code)
            self.teacher.set_classes(names, label_map)
            self.teacher.eval().requires_grad_(False).to(device)
            if self.method != "none":
                dist_cls = distiller_class(self.method)
                student_names, student_over = dist_cls.student_setup(self.teacher, names)

        # recipe (per student detector type), then the student
        recipe_name = cfg.recipe or default_recipe_name(student_r.architecture or student_r.spec, student_r.family)
        apply_recipe(cfg, load_recipe(recipe_name))
        cfg.recipe = recipe_name
        last = checkpoint_dir(self.resume_from, "last") if self.resume_from else None
        if self.resume_from is not None and last is None:
            raise KdctlError(f"{self.resume_from}: no last/ checkpoint to resume from")
        student_src = str(last) if last is not None else student_r
        # the method's overrides (e.g. KD-DETR: the teacher's query count) shape only students built from presets
        fresh = last is None and student_r.kind == "preset"

        over = dict(student_over) if fresh else {}
        if cfg.backbone_weights and fresh:
            over["backbone_weights"] = str(Path(cfg.backbone_weights).expanduser().resolve())
        elif cfg.backbone_weights and last is None:
            raise KdctlError(f"--backbone-weights applies to a model built from a preset; {student_r.spec} already "
                             "has its weights")

        def build_student(pretrained: bool):
            return load_detector(student_src, label_names=student_names, pretrained_backbone=pretrained,
                                 trust_remote_code=cfg.trust_remote_code, overrides=over)

        # the student's random init depends on --seed only, not on what was built before it (the teacher): a
        # distillation run starts from exactly the student its `kdctl train` baseline with the same seed starts from
        torch.manual_seed(cfg.seed)
        try:
            self.student = build_student(cfg.pretrained_backbone)
        except BackboneWeightsUnavailable as e:  # offline, or none exist: say so in one line, train from scratch
            warn(f"{str(e).split('; pass')[0]}; training the backbone from scratch (--no-pretrained-backbone "
                 "says so up front)")
            cfg.pretrained_backbone = False
            self.student = build_student(False)
        self.student.set_classes(names, label_map)
        self.student.to(device).train()
        cfg.imgsz = cfg.imgsz or self.student.imgsz
        self.student.imgsz = int(cfg.imgsz)  # saved with the model: eval, inspect and export use the trained size
        cfg.batch_size = cfg.batch_size or 8
        if cfg.batch_size % self.dist.world:
            raise KdctlError(f"--batch-size {cfg.batch_size} is not divisible by the {self.dist.world} processes")
        self.distiller = None
        if dist_cls is not None:
            self.distiller = dist_cls(self.teacher, self.student, **cfg.kd.get(self.method, {})).to(device)
        self.channels_last = use_channels_last(cfg.channels_last)
        if self.channels_last:
            to_channels_last(self.teacher, self.student, self.distiller)

        # data loaders: a per-rank share of the global batch; augmentation seeded per sample
        per_rank = cfg.batch_size // self.dist.world
        self.train_set = CocoDetection(self.train_data, cfg.imgsz, train=True, hflip=cfg.hflip)
        self.sampler = ResumableSampler(len(self.train_set), seed=cfg.seed, rank=self.dist.rank, world=self.dist.world)
        pin = device.startswith("cuda")
        # the loaders get their own generators: creating an iterator must not consume the global RNG (exact resume)
        self.loader = make_loader(self.train_set, per_rank, shuffle=False, sampler=self.sampler, workers=cfg.workers,
                                  pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed))
        self.val_set = CocoDetection(self.val_data, cfg.imgsz, train=False)
        self.val_sampler = ResumableSampler(len(self.val_set), shuffle=False, rank=self.dist.rank,
                                            world=self.dist.world)
        self.val_loader = make_loader(self.val_set, per_rank, shuffle=False, sampler=self.val_sampler,
                                      workers=cfg.workers, pin_memory=pin, generator=torch.Generator().manual_seed(0))
        self.batches_per_epoch = math.ceil(self.sampler.per_rank() / per_rank)
        self.steps_per_epoch = max(1, self.batches_per_epoch // cfg.grad_accum)
        if cfg.max_steps is None and cfg.epochs is None:
            cfg.epochs = 12
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.save_every = save_interval(cfg.save_every_steps, self.steps_per_epoch)

        # model, optimiser, schedule, AMP
        self.amp = amp_dtype(cfg.amp, device)
        self.teacher_amp = teacher_amp_dtype(cfg.teacher_amp, device, self.amp) if self.teacher is not None else None
        self.objective = Objective(self.student, self.distiller, teacher_amp=self.teacher_amp)
        self.model: nn.Module = self.objective
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [torch.device(device).index] if device.startswith("cuda") else None
            self.model = DDP(self.objective, device_ids=ids, find_unused_parameters=True)
        self.lr = effective_lr(cfg)
        self.optimizer = self._optimizer()
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, o["warmup_steps"], o["warmup_factor"], o["milestones"],
                                      o["gamma"]))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)

        # run directory
        self.pos = Position()
        self.best_ap = -1.0
        self.nonfinite = 0
        if self.resume_from is not None:
            self.run_dir = self.resume_from
            self._load_state(load_trainer_state(last))
        elif main:
            self.run_dir = new_run_dir(cfg.output, cfg.task, cfg.name)
            self.lock = RunLock(self.run_dir).acquire()
        else:
            self.run_dir = Path(cfg.output) / cfg.task / "_rank"
        if self.dist.enabled:  # every rank learns rank 0's directory
            self.run_dir = Path(D.gather_objects(str(self.run_dir), self.dist)[0])
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=main)
        if self.resume_from is not None:
            self.metrics.truncate_after(self.pos.step)
        if main:
            write_config(self.run_dir / "config.toml", cfg, {
                "method": self.method, "lr": self.lr, "device": device, "world_size": self.dist.world,
                "amp": str(self.amp).removeprefix("torch.") if self.amp else "off",
                "teacher_amp": str(self.teacher_amp).removeprefix("torch.") if self.teacher_amp else "off",
                "channels_last": self.channels_last,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "save_every_steps": self.save_every,
                "student": self.student.architecture, "teacher": self.teacher.architecture if self.teacher else "",
                "classes": list(names),
            })
        if self.teacher is not None:
            self.report.print(f"method: {self.method} (teacher {self.teacher.architecture} -> student "
                              f"{self.student.architecture}); teacher precision "
                              f"{str(self.teacher_amp).removeprefix('torch.') if self.teacher_amp else 'float32'}")

    def _optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.student, self.distiller, self.cfg.optim, self.lr)

    # ------------------------------------------------------------------ state
    def _state(self, pos: Position, rng: dict[str, Any]) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "distiller": self.distiller.state_dict() if self.distiller is not None else {},
            "rng": rng,
            "step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
            "best_ap": self.best_ap, "nonfinite": self.nonfinite,
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        if self.distiller is not None and s.get("distiller"):
            self.distiller.load_state_dict(s["distiller"])
        self.pos = Position(step=int(s["step"]), epoch=int(s["epoch"]), batch=int(s["batch"]))
        self.best_ap = float(s.get("best_ap", -1.0))
        self.nonfinite = int(s.get("nonfinite", 0))
        self._resume_rng = s["rng"]

    def save_last(self) -> None:
        """Checkpoint the state as of the last completed optimiser step (rank 0)."""
        if self.dist.is_main:
            save_checkpoint(self.run_dir / "last", self.student, self._state(self._boundary, self._boundary_rng))

    # ------------------------------------------------------------------ loop
    def run(self) -> RunResult:
        try:
            self.setup()
            return self._run()
        finally:
            self._close_loaders()
            D.teardown()
            if self.lock is not None:
                self.lock.release()

    def _close_loaders(self) -> None:
        """Stop persistent loader workers now, in this process (not at garbage collection, possibly in a fork)."""
        for name in ("loader", "val_loader"):
            it = getattr(getattr(self, name, None), "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
                getattr(self, name)._iterator = None

    def _run(self) -> RunResult:
        cfg, main = self.cfg, self.dist.is_main
        if self.resume_from is not None:
            set_rng_state(self._resume_rng)
            self.report.print(f"resuming {self.run_dir} at step {self.pos.step} (epoch {self.pos.epoch + 1})")
        if self.pos.step >= self.total_steps:
            raise KdctlError(f"{self.run_dir} already reached step {self.pos.step} of {self.total_steps}; "
                             "pass a larger --max-steps or --epochs to continue")
        self._boundary, self._boundary_rng = Position(**vars(self.pos)), rng_state()
        if self.save_every:
            self.report.print(f"checkpoint last/ every {self.save_every} steps and at every epoch end")
        self.report.print(
            f"{cfg.task}: {self.student.architecture} ({self.student.num_parameters() / 1e6:.1f} M params) on "
            f"{self.device}, {len(self.train_set)} train / {len(self.val_set)} val images, imgsz {cfg.imgsz}, "
            f"batch {cfg.batch_size}, {self.total_steps} steps, lr {self.lr:.3g}, run dir {self.run_dir}")
        t_start = time.perf_counter()
        step_times: list[float] = []
        result = RunResult(run_dir=self.run_dir, method=self.method)
        last_eval_step = -1
        window: dict[str, list[Tensor]] = {}
        try:
            while self.pos.step < self.total_steps:
                epoch = self.pos.epoch
                self.sampler.set_epoch(epoch, start=self.pos.batch * self.loader.batch_size)
                self._epoch_total = self._batches_this_epoch()
                self.report.start_epoch(epoch, self.epochs, self._epoch_total, self.pos.batch)
                self.optimizer.zero_grad(set_to_none=True)
                micro = 0
                t0 = time.perf_counter()
                for batch in self.loader:
                    batch = batch.to(self.device, non_blocking=True)
                    self._micro_step(batch)
                    micro += 1
                    self.pos.batch += 1
                    last_in_epoch = self.pos.batch >= self.batches_per_epoch
                    if micro < cfg.grad_accum and not last_in_epoch:
                        continue
                    micro = 0
                    self._optimizer_step(window)
                    if last_in_epoch:
                        self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0
                    self._boundary, self._boundary_rng = Position(**vars(self.pos)), rng_state()
                    dt = time.perf_counter() - t0
                    step_times.append(dt)
                    t0 = time.perf_counter()
                    if self.pos.step % cfg.log_every == 0 or self.pos.step == self.total_steps or last_in_epoch:
                        self._log(window, dt, epoch)
                        window = {}
                    if self.on_step is not None:
                        self.on_step(self)
                    if self.pos.step >= self.total_steps or last_in_epoch:
                        break
                    if self.save_every and self.pos.step % self.save_every == 0:
                        self.save_last()  # mid-epoch: a preemption loses at most save_every steps
                self.report.end_epoch()
                epoch_done = self.pos.batch == 0
                if self.pos.step >= self.total_steps or (epoch_done and (self.pos.epoch % max(1, cfg.eval_every) == 0)):
                    result.metrics = self._evaluate(final=self.pos.step >= self.total_steps)
                    last_eval_step = self.pos.step
                self.save_last()
        except KeyboardInterrupt:
            self.report.end_epoch()
            self.save_last()
            result.interrupted = True
            if main:
                self.report.console.print(
                    f"interrupted at step {self._boundary.step}; checkpoint saved to {self.run_dir}/last\n"
                    f"resume with: kdctl {cfg.task} --resume {self.run_dir}", soft_wrap=True)
            raise
        if last_eval_step != self.pos.step:
            result.metrics = self._evaluate(final=True)
            self.save_last()
        result.steps = self.pos.step
        result.seconds = time.perf_counter() - t_start
        result.step_time = float(torch.tensor(step_times[1:] or step_times or [0.0]).median())
        result.peak_memory_mb = peak_memory_mb(self.device)
        result.best_ap = self.best_ap
        if main:
            plot(self.metrics, self.run_dir / "results.png")
            self._final_table(result)
        return result

    def _micro_step(self, batch: Batch) -> dict[str, Tensor]:
        """Forward + backward of one micro-batch. No host synchronisation: the loss terms stay on the device
        until logging, and finiteness is checked once per optimiser step (:meth:`_optimizer_step`)."""
        dev_type = torch.device(self.device).type
        with torch.autocast(dev_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            terms = self.model(batch)
        total = sum(terms.values())
        self.scaler.scale(total / self.cfg.grad_accum).backward()
        finite = torch.isfinite(total.detach())
        self._finite = finite if getattr(self, "_finite", None) is None else self._finite & finite
        pending = getattr(self, "_pending", None)
        if pending is None:
            pending = self._pending = []
        pending.append({"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}})
        return terms

    def _optimizer_step(self, window: dict[str, list[Tensor]]) -> None:
        # the one host sync of a step (as GradScaler's own inf check), agreed on by every rank
        finite = D.all_true(bool(self._finite.item()), self.dist, torch.device(self.device))
        pending, self._pending, self._finite = self._pending, None, None
        if not finite:
            self.nonfinite += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.report.print(f"[yellow]warning:[/] non-finite loss at step {self.pos.step + 1}; step skipped "
                              f"({self.nonfinite}/{MAX_NONFINITE} in a row)")
            if self.nonfinite >= MAX_NONFINITE:
                raise KdctlError(
                    f"the loss was non-finite for {MAX_NONFINITE} steps in a row (step {self.pos.step + 1}); "
                    f"lower --lr, try --amp off, or check the data. Last good checkpoint: {self.run_dir}/last")
            self.pos.step += 1
            self.scheduler.step()
            return
        for row in pending:
            for k, v in row.items():
                window.setdefault(k, []).append(v)
        self.nonfinite = 0
        clip = float(self.cfg.optim.get("clip_grad") or 0)
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pos.step += 1

    def _log(self, window: dict[str, list[Tensor]], dt: float, epoch: int) -> None:
        keys = [k for k in window if window[k]]
        means = torch.stack([torch.stack(window[k]).float().mean() for k in keys]).tolist() if keys else []
        avg = dict(zip(keys, means, strict=True))  # one host sync per logging step
        if self.dist.enabled:  # the logged losses are averaged over ranks
            keys = sorted(avg)
            t = D.all_reduce_mean(torch.tensor([avg[k] for k in keys], device=self.device, dtype=torch.float64),
                                  self.dist)
            avg = dict(zip(keys, t.tolist(), strict=True))
        row: dict[str, Any] = {"type": "train", "step": self.pos.step, "epoch": epoch + 1,
                               "lr": self.optimizer.param_groups[0]["lr"], "time_per_step": round(dt, 4)}
        row.update({k: round(v, 6) for k, v in sorted(avg.items(), key=lambda kv: kv[0] != "loss")})
        extra = ""
        if self.device.startswith("cuda"):
            mem = torch.cuda.max_memory_allocated(torch.device(self.device)) / 2**30
            row["gpu_mem_gb"] = round(mem, 3)
            extra = f"mem {mem:.2f}G"
        self.metrics.write(row)
        meta = {"type", "step", "epoch", "lr", "time_per_step", "gpu_mem_gb"}
        shown = {k: v for k, v in row.items() if k not in meta}
        total = getattr(self, "_epoch_total", self.batches_per_epoch)
        self.report.update(self.pos.batch or total, total, epoch, self.epochs,
                           self.pos.step, 1.0 / dt if dt > 0 else 0.0, shown, extra)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, final: bool = False) -> dict[str, float]:
        from kdctl.engine.evaluate import coco_eval, detections_to_coco

        self.student.eval()
        results: list[dict] = []
        dev_type = torch.device(self.device).type
        t0 = time.perf_counter()
        seen: set[int] = set()
        with torch.no_grad():
            for batch in self.val_loader:
                batch = batch.to(self.device, non_blocking=True)
                with torch.autocast(dev_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    dets = self.student.predict(batch)
                results += detections_to_coco(dets, batch.image_ids, self.val_data.cat_ids)
        self.student.train()
        if self.dist.enabled:  # gather on every rank; padding duplicates are dropped by image id below
            parts = D.gather_objects(results, self.dist)
            results = []
            for rank_results in parts:
                ids = {r["image_id"] for r in rank_results}
                results += [r for r in rank_results if r["image_id"] not in seen]
                seen |= ids
        metrics, per_class, _ = coco_eval(self.val_data.pycocotools(), results, self.val_data.names,
                                          self.val_data.cat_ids)
        secs = time.perf_counter() - t0
        row = {"type": "eval", "step": self.pos.step, "epoch": self.pos.epoch + (self.pos.batch > 0), **metrics,
               "per_class": per_class, "eval_seconds": round(secs, 2)}
        self.metrics.write(row)
        ap = metrics["AP"]
        if self.dist.is_main:
            from kdctl.commands import _write_json

            _write_json(self.run_dir / "eval" / "last.json", row)
            if final:
                _write_json(self.run_dir / "eval" / "predictions.json", results)
            finite = all(torch.isfinite(p).all() for p in self.student.parameters())
            if ap > self.best_ap and finite:
                self.best_ap = ap
                save_checkpoint(self.run_dir / "best", self.student, None)
                _write_json(self.run_dir / "eval" / "best.json", row)
            elif not finite:
                self.report.print("[yellow]warning:[/] non-finite weights: not saved as best")
            self.report.print(f"eval step {self.pos.step}: AP {percent(ap)}  AP50 {percent(metrics['AP50'])}  "
                              f"AP75 {percent(metrics['AP75'])}  ({secs:.1f}s)")
            plot(self.metrics, self.run_dir / "results.png")
        return metrics

    def _final_table(self, r: RunResult) -> None:
        m = r.metrics
        rows = [("run", str(self.run_dir)), ("method", self.method), ("steps", str(r.steps)),
                ("time", f"{r.seconds:.1f}s ({r.step_time:.3f}s/step median)"),
                ("peak memory", f"{r.peak_memory_mb:.0f} MB ({'GPU' if self.device.startswith('cuda') else 'RSS'})")]
        if m:
            rows += [("AP / AP50 / AP75", f"{percent(m['AP'])} / {percent(m['AP50'])} / {percent(m['AP75'])}"),
                     ("best AP", percent(self.best_ap))]
        weights = [str(d) for d in (self.run_dir / "best", self.run_dir / "last") if d.is_dir()]
        rows += [(what, ", ".join(paths)) for what, paths in (
            ("weights", weights), ("metrics", [str(self.run_dir / "metrics.jsonl")]),
            ("plot", [str(self.run_dir / "results.png")])) if paths and all(Path(x).exists() for x in paths)]
        self.report.table(f"kdctl {self.cfg.task} finished", rows)

    def _batches_this_epoch(self) -> int:
        """Micro-batches this epoch will run: the whole epoch, or fewer when --max-steps ends the run in it."""
        steps_left = self.total_steps - self.pos.step
        return min(self.batches_per_epoch, self.pos.batch + steps_left * self.cfg.grad_accum)


def train(cfg: RunConfig | None = None, *, resume: str | Path | None = None,
          overrides: dict[str, Any] | None = None, **kw: Any) -> RunResult:
    """Run ``kdctl train`` / ``kdctl distill`` from a RunConfig, or resume a run directory."""
    return Trainer(cfg, resume=resume, overrides=overrides, **kw).run()
