"""The one training loop behind ``kdctl train`` (supervised) and ``kdctl distill`` (student + KD loss).

Per optimiser step (``grad_accum`` micro-batches)::

    batch -> student.forward_train (losses + taps) ─┐
          -> distiller.teacher_taps (no_grad) ──────┴─> distiller terms ─> sum ─> backward ─> clip ─> step

Exact resume: the data order of an epoch is a function of (seed, epoch), each sample's augmentation a function of
its own seed (:mod:`kdctl.engine.sampler`), and the checkpoint holds every RNG state as of the last optimiser
step, so a run stopped after k steps and resumed ends bit for bit where an uninterrupted run ends (on CPU).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdctl.data.batch import Batch
from kdctl.data.dataset import shutdown_workers
from kdctl.engine import distributed as D
from kdctl.engine.build import build_loaders, build_models, build_optimisation, open_data, pad_stride
from kdctl.engine.checkpoint import (
    checkpoint_dir,
    clean_stale_temps,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdctl.engine.config import RunConfig, read_config, save_interval, write_config
from kdctl.engine.ema import evaluated_model
from kdctl.engine.optim import grads_finite
from kdctl.engine.precision import dtype_name, peak_memory_mb
from kdctl.engine.progress import MetricsLog, Reporter, final_rows, percent, plot
from kdctl.engine.runlock import RunLock
from kdctl.engine.samples import eval_images
from kdctl.engine.state import Position, RunResult, resolved_summary
from kdctl.engine.trackers import open_trackers, parse_report_to
from kdctl.errors import KdctlError
from kdctl.io import write_json

MAX_NONFINITE = 5
"""Consecutive non-finite losses after which a run stops."""


class Trainer:
    """Build everything from a RunConfig (or a run directory to resume) and run the loop.

    ``on_step(trainer)`` is called after every optimiser step (tests use it to interrupt a run). ``run_dir``: this
    exact, new directory instead of the auto-numbered ``OUTPUT/TASK/NAME`` (``distill --baseline``'s baseline).
    """

    def __init__(self, cfg: RunConfig | None = None, *, resume: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, on_step: Callable[[Trainer], None] | None = None,
                 reporter: Reporter | None = None, run_dir: str | Path | None = None) -> None:
        self.on_step, self.exact_dir = on_step, run_dir
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
        else:  # the caller's config is input only: the run resolves (recipe, imgsz, batch, epochs) on a copy
            cfg = copy.deepcopy(cfg).absolute_paths()
        self.cfg = cfg
        self.lock: RunLock | None = None
        self._reporter = reporter

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Device and processes, the run lock, data, models, loaders, optimisation, run directory (the builders
        of :mod:`kdctl.engine.build`), then ``config.toml``."""
        from kdctl.engine.rundir import resolve_device

        cfg = self.cfg
        if cfg.model is None:
            raise KdctlError("no model: pass --model SPEC (train) or --student SPEC (distill)")
        if cfg.grad_accum < 1:
            raise KdctlError("--grad-accum must be >= 1")
        parse_report_to(cfg.report_to)  # an unknown tracker is refused before anything is loaded
        device = resolve_device(cfg.device)
        self.dist = D.setup(device)
        if self.dist.enabled and device.startswith("cuda"):
            device = f"cuda:{self.dist.local_rank}"
        self.device = device
        if self.resume_from is not None and self.dist.is_main:  # before anything in the run directory is touched
            self.lock = RunLock(self.resume_from).acquire()
            clean_stale_temps(self.resume_from)
        self.report = self._reporter or Reporter(enabled=self.dist.is_main and not cfg.quiet, rank0=self.dist.is_main)
        torch.manual_seed(cfg.seed)
        data = open_data(cfg, self.report.warn)  # a broken dataset fails before anything heavy is loaded
        self.train_data, self.val_data = data.train, data.val
        last = checkpoint_dir(self.resume_from, "last") if self.resume_from else None
        if self.resume_from is not None and last is None:
            raise KdctlError(f"{self.resume_from}: no last/ checkpoint to resume from")
        m = build_models(cfg, data, device, last, self.report.warn, self.report.print)
        self.teacher, self.student, self.distiller, self.method = m.teacher, m.student, m.distiller, m.method
        self.channels_last, self.trainable = m.channels_last, m.trainable
        lo = build_loaders(cfg, data, self.dist, device, pad_stride(m))
        self.train_set, self.sampler, self.loader = lo.train_set, lo.sampler, lo.loader
        self.val_set, self.val_sampler, self.val_loader = lo.val_set, lo.val_sampler, lo.val_loader
        self.batches_per_epoch, self.steps_per_epoch = lo.batches_per_epoch, lo.steps_per_epoch
        self.total_steps, self.epochs = lo.total_steps, lo.epochs
        self.save_every = save_interval(cfg.save_every_steps, self.steps_per_epoch)
        o = build_optimisation(cfg, m, self.dist, device, self.total_steps)
        self.amp, self.teacher_amp, self.objective, self.model = o.amp, o.teacher_amp, o.objective, o.model
        self.lr, self.optimizer, self.scheduler, self.scaler = o.lr, o.optimizer, o.scheduler, o.scaler
        self.ema = o.ema  # with EMA: evaluation and best/ use its weights, last/ the raw ones and its state
        self.pos, self.best_ap, self.nonfinite = Position(), -1.0, 0
        if last is not None:
            self._load_state(load_trainer_state(last))
        self._open_run_dir(data.names)

    def _open_run_dir(self, names: list[str]) -> None:
        """The run directory (new, or the resumed one) with its metrics log and ``config.toml``."""
        from kdctl.engine.rundir import new_run_dir

        cfg, main = self.cfg, self.dist.is_main
        if self.resume_from is not None:
            self.run_dir = self.resume_from
        elif main:
            self.run_dir = new_run_dir(cfg.output, cfg.task, cfg.name, exact=self.exact_dir)
            self.lock = RunLock(self.run_dir).acquire()
        else:
            self.run_dir = Path(cfg.output) / cfg.task / "_rank"
        if self.dist.enabled:  # every rank learns rank 0's directory
            self.run_dir = Path(D.gather_objects(str(self.run_dir), self.dist)[0])
        trackers = open_trackers(cfg.report_to, self.run_dir, cfg.to_dict(), self.report.warn,
                                 self.pos.step) if main else None  # rank 0 only
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=main, trackers=trackers)
        if self.resume_from is not None:
            self.metrics.truncate_after(self.pos.step)
        if main:
            write_config(self.run_dir / "config.toml", cfg, resolved_summary(self, names))
        if self.teacher is not None:
            self.report.print(f"method: {self.method} (teacher {self.teacher.architecture} -> student "
                              f"{self.student.architecture}); teacher precision {dtype_name(self.teacher_amp)}")

    # ------------------------------------------------------------------ state
    def _state(self, pos: Position, rng: dict[str, Any]) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "distiller": self.distiller.state_dict() if self.distiller is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else {}, "rng": rng,
            "step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
            "best_ap": self.best_ap, "nonfinite": self.nonfinite,
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        if self.distiller is not None and s.get("distiller"):
            self.distiller.load_state_dict(s["distiller"])
        if self.ema is not None and s.get("ema"):
            self.ema.load_state_dict(s["ema"])
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
            for loader in (getattr(self, "loader", None), getattr(self, "val_loader", None)):
                shutdown_workers(loader)
            D.teardown()
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()  # the trackers
            if self.lock is not None:
                self.lock.release()

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
        result = RunResult(run_dir=self.run_dir, method=self.method, config=self.cfg)
        last_eval_step = -1
        window: dict[str, list[Tensor]] = {}
        try:
            while self.pos.step < self.total_steps:
                epoch = self.pos.epoch
                self.sampler.set_epoch(epoch, start=self.pos.batch * self.loader.batch_sampler.batch_size)
                self._epoch_total = self._batches_this_epoch()
                self.report.start_epoch(epoch, self.epochs, self._epoch_total, self.pos.batch)
                self._stale_grads = True
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
            self.report.table(f"kdctl {cfg.task} finished", final_rows(result, self.best_ap, self.device))
        return result

    def _micro_step(self, batch: Batch) -> dict[str, Tensor]:
        """Forward + backward of one micro-batch. No host synchronisation: the loss terms stay on the device
        until logging, and finiteness is checked once per optimiser step (:meth:`_optimizer_step`)."""
        dev_type = torch.device(self.device).type
        with torch.autocast(dev_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            terms = self.model(batch)
        total = sum(terms.values())
        if getattr(self, "_stale_grads", True):  # zeroed here, not after the step: no page faults (#22)
            self.optimizer.zero_grad(set_to_none=True)
        self._stale_grads = False
        self.scaler.scale(total / self.cfg.grad_accum).backward()
        finite = torch.isfinite(total.detach())
        self._finite = finite if getattr(self, "_finite", None) is None else self._finite & finite
        self._pending = getattr(self, "_pending", None) or []
        self._pending.append({"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}})
        return terms

    def _optimizer_step(self, window: dict[str, list[Tensor]]) -> None:
        # the one host sync of a step (as GradScaler's inf check), agreed on by every rank; bf16: gradients too
        ok = self._finite & grads_finite(self.optimizer) if self.amp == torch.bfloat16 else self._finite
        finite = D.all_true(bool(ok.item()), self.dist, torch.device(self.device))
        pending, self._pending, self._finite = self._pending, None, None
        if not finite:
            self.nonfinite += 1
            self._stale_grads = True
            self.report.warn(f"non-finite loss or gradients at step {self.pos.step + 1}; step skipped "
                             f"({self.nonfinite}/{MAX_NONFINITE} in a row)")
            if self.nonfinite >= MAX_NONFINITE:
                raise KdctlError(f"the loss or its gradients were non-finite for {MAX_NONFINITE} steps in a row "
                                 f"(step {self.pos.step + 1}); lower --lr, try --amp off, or check the data. Last "
                                 f"good checkpoint: {self.run_dir}/last")
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
        self._stale_grads = True  # zeroed before the next backward (_micro_step)
        self.scheduler.step()
        if self.ema is not None:  # after each optimiser step, as the official ModelEMA
            self.ema.update(self.student)
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
        """COCO metrics of the student on the validation split (gathered over ranks); rank 0 writes ``eval/``
        and saves ``best/`` when the AP improved and the weights are finite."""
        from kdctl.engine.evaluate import coco_eval, predict_coco

        model = evaluated_model(self.ema, self.student).eval()
        t0 = time.perf_counter()
        results, _ = predict_coco(model, self.val_loader, self.val_data.cat_ids, self.device, amp_dtype=self.amp)
        self.student.train()
        if self.dist.enabled:  # gather on every rank; padding duplicates are dropped by image id below
            results = D.merge_by_image(D.gather_objects(results, self.dist))
        metrics, per_class, _ = coco_eval(self.val_data.pycocotools(), results, self.val_data.names,
                                          self.val_data.cat_ids)
        secs = time.perf_counter() - t0
        row = {"type": "eval", "step": self.pos.step, "epoch": self.pos.epoch + (self.pos.batch > 0), **metrics,
               "per_class": per_class, "eval_seconds": round(secs, 2)}
        self.metrics.write(row)
        if self.dist.is_main:
            self._record_eval(row, results, final)
        return metrics

    def _record_eval(self, row: dict[str, Any], results: list[dict[str, Any]], final: bool) -> None:
        """Rank 0: ``eval/last.json`` (and the final predictions), ``best/`` when the AP improved, the plot."""
        write_json(self.run_dir / "eval" / "last.json", row)
        if final:
            write_json(self.run_dir / "eval" / "predictions.json", results)
        ap = row["AP"]
        finite = all(torch.isfinite(p).all() for p in evaluated_model(self.ema, self.student).parameters())
        if ap > self.best_ap and finite:
            self.best_ap = ap
            save_checkpoint(self.run_dir / "best", evaluated_model(self.ema, self.student), None)
            write_json(self.run_dir / "eval" / "best.json", row)
        elif not finite:
            self.report.warn("non-finite weights: not saved as best")
        self.report.print(f"eval step {self.pos.step}: AP {percent(ap)}  AP50 {percent(row['AP50'])}  "
                          f"AP75 {percent(row['AP75'])}  ({row['eval_seconds']:.1f}s)")
        plot(self.metrics, self.run_dir / "results.png")
        self.metrics.log_images(lambda: eval_images(self.run_dir / "results.png", self.val_set, results,  # trackers
                                                    self.val_data.names, self.val_data.cat_ids), self.pos.step)

    def _batches_this_epoch(self) -> int:
        """Micro-batches this epoch will run: the whole epoch, or fewer when --max-steps ends the run in it."""
        steps_left = self.total_steps - self.pos.step
        return min(self.batches_per_epoch, self.pos.batch + steps_left * self.cfg.grad_accum)


def train(cfg: RunConfig | None = None, *, resume: str | Path | None = None,
          overrides: dict[str, Any] | None = None, **kw: Any) -> RunResult:
    """Run ``kdctl train`` / ``kdctl distill`` from a RunConfig, or resume a run directory."""
    return Trainer(cfg, resume=resume, overrides=overrides, **kw).run()
