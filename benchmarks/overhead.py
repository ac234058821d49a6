"""Distillation overhead: time and memory of a KD step against student training + teacher inference (issue #7).

Per method (DRKD on a CNN pair, KD-DETR on a DETR pair) three configurations are measured on the same batches:

    (a) student   student.forward_train + backward + optimiser step        (the engine's Objective(student))
    (b) teacher   teacher.forward_taps under no_grad, eval mode            (what a separate teacher pass costs)
    (c) distill   Objective(student, distiller) + backward + optimiser step (student + teacher taps + KD loss)

and the ratios ``c / (a + b)`` for time and memory (targets: <= 1.10 and <= 1.15).

Time: one process builds every model; the three step kinds are interleaved (a, b, c, a, b, c, ...) so that drift of
a shared machine hits them equally; medians over ``--steps`` rounds after ``--warmup`` rounds
(``torch.cuda.synchronize()`` around each timer on CUDA).

Memory: one fresh subprocess per configuration, which builds only the models that configuration needs. CUDA: peak
``torch.cuda.max_memory_allocated`` minus the bytes allocated before the models were built. CPU: peak resident set
size (``VmHWM``, reset through ``/proc/self/clear_refs`` before the models are built) minus the resident set size at
that moment. Both therefore count weights, gradients, optimiser state, activations and (CPU) allocator slack of that
configuration, not the interpreter, torch or the data.

    python benchmarks/overhead.py                     # both methods, CPU (and CUDA when present), full configs
    python benchmarks/overhead.py --small             # tiny models and images: a smoke test in about a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _results import cpu_model, machine_line, write_results  # benchmarks/_results.py (run as python benchmarks/X.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bccd"
KINDS = ("student", "teacher", "distill")
TARGET_TIME, TARGET_MEMORY = 1.10, 1.15
PAIRS = {  # method -> (teacher, student, teacher overrides, student overrides)
    "drkd": ("fasterrcnn-r50-fpn", "fasterrcnn-r18-fpn", {}, {}),
    "kd-detr": ("detr-r50", "detr-r18", {}, {}),
}
SMALL_PAIRS = {
    "drkd": ("fcos-mobilenet-v2", "fcos-mobilenet-v2-0.5", {}, {}),
    "kd-detr": ("detr-r18", "detr-r18", {"encoder_layers": 2, "decoder_layers": 2},
                {"encoder_layers": 1, "decoder_layers": 2}),
}


# =========================================================================== machine
def machine_info(devices: list[str], threads: int) -> dict[str, Any]:
    """CPU model and count, library versions, thread count, device name and load average."""
    import torch

    cpu = cpu_model()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "devices": devices, "load_average": list(os.getloadavg())}
    for mod in ("torchvision", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    gpus = [d for d in devices if d.startswith("cuda")]
    if gpus:
        info["gpu"] = torch.cuda.get_device_name(torch.device(gpus[0]))
        info["cuda"] = torch.version.cuda
    return info


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can be set once per process)
        pass


CHANNELS_LAST = {"auto": None, "on": True, "off": False}  # --channels-last -> RunConfig.channels_last


# =========================================================================== set-up
@dataclass
class Setup:
    """Everything one method's measurements need; ``teacher`` / ``student`` may be None in memory workers."""

    method: str
    device: str
    batches: list
    amp: Any = None
    teacher_amp: Any = None
    channels_last: bool = False
    clip: float = 0.0
    teacher: Any = None
    student: Any = None
    distiller: Any = None
    optimizer: Any = None
    objectives: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, Any] = field(default_factory=dict)


def load_batches(imgsz: int, batch_size: int, count: int, device: str) -> tuple[list, list[str]]:
    """``count`` training batches of BCCD train (augmentation seeded per sample) -> (batches on device, names)."""
    from kdctl.data.batch import collate
    from kdctl.data.coco import load_coco
    from kdctl.data.dataset import CocoDetection

    cd = load_coco(DATA / "train.json", DATA / "images")
    ds = CocoDetection(cd, imgsz, train=True)
    batches = []
    for b in range(count):
        samples = [ds[(b * batch_size + i, 1000 + b * batch_size + i)] for i in range(batch_size)]
        batches.append(collate(samples).to(device))
    return batches, list(cd.names)


def recipe_for(student_spec: str, method: str, batch_size: int):
    """The engine's RunConfig with the student's default recipe applied (optimiser + KD weights)."""
    from kdctl.engine.config import RunConfig, apply_recipe, default_recipe_name, load_recipe
    from kdctl.specs import resolve

    r = resolve(student_spec)
    cfg = RunConfig(task="distill", model=student_spec, method=method, batch_size=batch_size)
    apply_recipe(cfg, load_recipe(default_recipe_name(r.architecture or r.spec, r.family)))
    return cfg


def build(method: str, args: argparse.Namespace, device: str, need: tuple[str, ...] = KINDS,
          on_models: Callable[[], None] | None = None) -> Setup:
    """Models, distiller and optimiser as :class:`kdctl.engine.trainer.Trainer` builds them.

    ``need``: the configurations that will run (a memory worker builds only what its configuration uses).
    ``on_models`` is called after the data is loaded and before the models are built (memory baseline).
    """
    import torch

    from kdctl.distill.base import distiller_class
    from kdctl.engine.config import effective_lr
    from kdctl.engine.objective import Objective
    from kdctl.engine.precision import amp_dtype, teacher_amp_dtype, to_channels_last, use_channels_last
    from kdctl.specs import load_detector

    t_spec, s_spec, t_over, s_over = (SMALL_PAIRS if args.small else PAIRS)[method]
    t_spec, s_spec = args.teacher or t_spec, args.student or s_spec
    batches, names = load_batches(args.imgsz, args.batch_size, 2, device)
    cfg = recipe_for(s_spec, method, args.batch_size)
    amp = amp_dtype(args.amp, device)
    st = Setup(method=method, device=device, batches=batches, amp=amp, teacher_amp=teacher_amp_dtype(
               args.teacher_amp, device, amp),
               clip=float(cfg.optim.get("clip_grad") or 0.0))
    st.specs = {"teacher": t_spec, "student": s_spec, "teacher_overrides": t_over, "student_overrides": s_over}
    torch.manual_seed(0)
    dist_cls = distiller_class(method)

    def make_teacher():
        t = load_detector(t_spec, label_names=names, pretrained_backbone=False, overrides=t_over)
        t.set_classes(names)
        return t.eval().requires_grad_(False)

    if "teacher" not in need and "distill" not in need:  # the student's set-up (KD-DETR: label space, queries)
        student_names, over = dist_cls.student_setup(make_teacher(), names)  # needs a teacher: build and free it
        release_memory()
        if on_models is not None:
            on_models()
    else:
        if on_models is not None:
            on_models()
        st.teacher = make_teacher().to(device)
        student_names, over = dist_cls.student_setup(st.teacher, names)
    if "student" in need or "distill" in need:
        student = load_detector(s_spec, label_names=student_names, pretrained_backbone=False,
                                overrides={**over, **s_over})
        student.set_classes(names)
        st.student = student.to(device).train()
    if "distill" in need:
        st.distiller = dist_cls(st.teacher, st.student, **cfg.kd.get(method, {})).to(device)
    st.channels_last = use_channels_last(CHANNELS_LAST[args.channels_last])
    if st.channels_last:
        to_channels_last(st.teacher, st.student, st.distiller)
    if st.student is not None:
        st.optimizer = make_optimizer(st.student, st.distiller, cfg, effective_lr(cfg))
        st.objectives = {"student": Objective(st.student),
                         "distill": Objective(st.student, st.distiller, teacher_amp=st.teacher_amp)}
    return st


def make_optimizer(student, distiller, cfg, lr: float):
    """The Trainer's optimiser (:func:`kdctl.engine.optim.build_optimizer`: its parameter groups, fused kernels),
    at the lr of the first warm-up step."""
    from kdctl.engine.optim import build_optimizer

    o = cfg.optim
    lr = lr * float(o.get("warmup_factor", 1.0)) if int(o.get("warmup_steps", 0)) > 0 else lr
    return build_optimizer(student, distiller, o, lr)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that RSS reflects live memory."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# =========================================================================== steps
def autocast(st: Setup):
    import torch

    return torch.autocast(torch.device(st.device).type, dtype=st.amp or torch.float32, enabled=st.amp is not None)


def train_step(st: Setup, kind: str, batch) -> bool:
    """One optimiser step of Objective(student[, distiller]) as the engine does it. Returns whether it was finite.

    Like ``Trainer._micro_step`` / ``_optimizer_step`` (grad_accum 1): autocast forward, sum of the terms, one host
    read of ``isfinite(total)``, backward, gradient clipping when the recipe clips, step, zero_grad.
    """
    import torch

    with autocast(st):
        terms = st.objectives[kind](batch)
    total = sum(terms.values())
    finite = bool(torch.isfinite(total).item())
    if finite:
        total.backward()
        if st.clip > 0:
            params = [p for g in st.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, st.clip)
        st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    return finite


def teacher_step(st: Setup, batch) -> bool:
    """(b): the teacher's KD internals without grad, eval mode (``forward_taps``), in the teacher's precision."""
    import torch

    dev = torch.device(st.device).type
    with torch.no_grad(), torch.autocast(dev, dtype=st.teacher_amp or torch.float32, enabled=st.teacher_amp is not None):
        st.teacher.forward_taps(batch)
    return True


def teacher_kd_step(st: Setup, batch) -> bool:
    """The teacher work the method itself asks for (``distiller.teacher_taps``: KD-DETR adds a decoder pass), as
    the engine runs it (``Objective.teacher_taps``: the teacher's precision, taps cast back to the step's)."""
    with autocast(st):
        st.objectives["distill"].teacher_taps(batch)
    return True


def run_kind(st: Setup, kind: str, batch) -> bool:
    if kind == "teacher":
        return teacher_step(st, batch)
    if kind == "teacher_kd":
        return teacher_kd_step(st, batch)
    return train_step(st, kind, batch)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def timed(st: Setup, kind: str, batch) -> tuple[float, float, bool]:
    """(wall seconds, process CPU seconds, finite) of one ``kind`` step, synchronised on both sides."""
    sync(st.device)
    t0, c0 = time.perf_counter(), time.process_time()
    ok = run_kind(st, kind, batch)
    sync(st.device)
    return time.perf_counter() - t0, time.process_time() - c0, ok


def wall_basis(st: Setup) -> bool:
    """Whether times are wall clock (CUDA, or several CPU threads) rather than process CPU time (1 CPU thread)."""
    import torch

    return st.device.startswith("cuda") or torch.get_num_threads() > 1


def time_interleaved(st: Setup, kinds: tuple[str, ...], warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """Rounds of (kind_1, kind_2, ...) on alternating batches.

    Per kind: ``median_s`` (the basis of the ratios: process CPU time on CPU, wall time on CUDA), the wall and CPU
    medians, min / max of the basis and every sample. With one torch thread, CPU time is what the step costs even
    when other processes compete for the cores (wall time then also counts the time the process waited to run).
    """
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    finite = dict.fromkeys(kinds, True)
    for r in range(warmup + steps):
        batch = st.batches[r % len(st.batches)]
        for k in kinds:
            dt, ct, ok = timed(st, k, batch)
            finite[k] = finite[k] and ok
            if r >= warmup:
                wall[k].append(dt)
                cpu[k].append(ct)
    out = {}
    for k in kinds:
        basis = wall[k] if wall_basis(st) else cpu[k]
        out[k] = {"median_s": statistics.median(basis), "min_s": min(basis), "max_s": max(basis),
                  "wall_median_s": statistics.median(wall[k]), "cpu_median_s": statistics.median(cpu[k]),
                  "wall_samples_s": [round(x, 4) for x in wall[k]], "cpu_samples_s": [round(x, 4) for x in cpu[k]],
                  "all_finite": finite[k]}
    return out


# =========================================================================== phases and profile
def distill_phases(st: Setup, batch) -> dict[str, float]:
    """One distillation step split into phases (each synchronised), the same work as Objective + step.

    Seconds of process CPU time on CPU, wall time on CUDA (as the step medians)."""
    import torch

    now = time.perf_counter if wall_basis(st) else time.process_time

    out: dict[str, float] = {}
    with autocast(st):
        t0 = now()
        s_out = st.student.forward_train(batch)
        sync(st.device)
        out["student_forward_train"] = now() - t0
        t0 = now()
        taps = st.objectives["distill"].teacher_taps(batch)
        sync(st.device)
        out["teacher_taps"] = now() - t0
        t0 = now()
        kd = st.distiller(s_out, taps, batch)
        sync(st.device)
        out["distiller_forward"] = now() - t0
    total = sum(s_out.losses.values()) + sum(kd.values())
    t0 = now()
    if torch.isfinite(total).item():
        total.backward()
    sync(st.device)
    out["backward"] = now() - t0
    t0 = now()
    if st.clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in st.optimizer.param_groups for p in g["params"]], st.clip)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    sync(st.device)
    out["optimizer"] = now() - t0
    return out


def phase_medians(st: Setup, rounds: int) -> dict[str, float]:
    rows = [distill_phases(st, st.batches[r % len(st.batches)]) for r in range(rounds + 1)][1:]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def profile_distill(st: Setup, steps: int, top: int = 20) -> dict[str, Any]:
    """torch.profiler over ``steps`` distillation steps: the top ops by self CPU time (and self CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if st.device.startswith("cuda") else [])
    train_step(st, "distill", st.batches[0])
    with profile(activities=acts, record_shapes=False) as prof:
        for r in range(steps):
            train_step(st, "distill", st.batches[r % len(st.batches)])
    sync(st.device)
    ev = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ev) or 1.0

    def row(e) -> dict[str, Any]:
        d = {"op": e.key, "calls_per_step": round(e.count / steps, 1),
             "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
             "self_cpu_share": round(e.self_cpu_time_total / total_self, 4),
             "cpu_total_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 2)}
        dev_self = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        if st.device.startswith("cuda"):
            d["self_cuda_ms_per_step"] = round(dev_self / 1e3 / steps, 2)
        return d

    by_cpu = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out = {"steps": steps, "top_self_cpu": [row(e) for e in by_cpu]}
    if st.device.startswith("cuda"):
        key = "self_device_time_total" if hasattr(by_cpu[0], "self_device_time_total") else "self_cuda_time_total"
        out["top_self_cuda"] = [row(e) for e in sorted(ev, key=lambda e: getattr(e, key), reverse=True)[:top]]
    return out


# =========================================================================== memory worker
def _proc_kib(field_name: str) -> int:
    m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build only what configuration ``args.worker_kind`` needs, run it, return its peak."""
    import torch

    set_threads(args.threads)
    device, kind = args.device, args.worker_kind
    base: dict[str, float] = {}
    cuda = device.startswith("cuda")

    def mark() -> None:
        release_memory()
        if cuda:
            sync(device)
            torch.cuda.reset_peak_memory_stats(torch.device(device))
            base["bytes"] = torch.cuda.memory_allocated(torch.device(device))
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            base["bytes"] = _proc_kib("VmRSS") * 1024

    need = ("teacher",) if kind == "teacher" else ("student",) if kind == "student" else KINDS
    st = build(args.worker_method, args, device, need=need, on_models=mark)
    finite = True
    for r in range(args.mem_steps):
        finite = run_kind(st, kind, st.batches[r % len(st.batches)]) and finite
    sync(device)
    if cuda:
        peak = torch.cuda.max_memory_allocated(torch.device(device))
    else:
        peak = _proc_kib("VmHWM") * 1024
    return {"peak_mb": (peak - base["bytes"]) / 2**20, "baseline_mb": base["bytes"] / 2**20,
            "absolute_peak_mb": peak / 2**20, "steps": args.mem_steps, "all_finite": finite}


def measure_memory(method: str, kind: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Run :func:`memory_worker` for (method, kind) in a subprocess with the same options."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-method", method, "--worker-kind", kind,
           "--device", device, "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--amp", args.amp, "--teacher-amp", args.teacher_amp,
           "--channels-last", args.channels_last,
           "--mem-steps", str(args.mem_steps)]
    cmd += ["--small"] if args.small else []
    cmd += ["--teacher", args.teacher] if args.teacher else []
    cmd += ["--student", args.student] if args.student else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {method}/{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# =========================================================================== one method on one device
def bench_method(method: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    print(f"[{method} on {device}] building models", flush=True)
    st = build(method, args, device)
    kinds = KINDS + (("teacher_kd",) if method == "kd-detr" else ())
    print(f"[{method} on {device}] timing {args.warmup} + {args.steps} interleaved rounds of {kinds}", flush=True)
    times = time_interleaved(st, kinds, args.warmup, args.steps)
    a, b, c = (times[k]["median_s"] for k in KINDS)
    res: dict[str, Any] = {
        "method": method, "device": device, **st.specs, "imgsz": args.imgsz, "batch_size": args.batch_size,
        "amp": str(st.amp).removeprefix("torch.") if st.amp else "off",
        "teacher_amp": str(st.teacher_amp).removeprefix("torch.") if st.teacher_amp else "off",
        "channels_last": st.channels_last, "optimizer": type(st.optimizer).__name__, "clip_grad": st.clip,
        "params_m": {"teacher": st.teacher.num_parameters() / 1e6, "student": st.student.num_parameters() / 1e6,
                     "distiller": sum(p.numel() for p in st.distiller.parameters()) / 1e6},
            "time_basis": "wall" if wall_basis(st) else "process CPU time",
        "time": times, "time_ratio": c / (a + b),
        "time_ratio_wall": times["distill"]["wall_median_s"] / (times["student"]["wall_median_s"]
                                                                + times["teacher"]["wall_median_s"]),
    }
    print(f"[{method} on {device}] a {a:.3f}s  b {b:.3f}s  c {c:.3f}s  ratio {c / (a + b):.3f}", flush=True)
    res["distill_phases_s"] = phase_medians(st, max(2, min(args.steps, 5)))
    mem_ok = True
    if not args.no_memory:
        del st
        release_memory()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        mem = {k: measure_memory(method, k, args, device) for k in KINDS}
        ma, mb, mc = (mem[k]["peak_mb"] for k in KINDS)
        res["memory"] = mem
        res["memory_ratio"] = mc / (ma + mb)
        mem_ok = res["memory_ratio"] <= TARGET_MEMORY
        print(f"[{method} on {device}] memory a {ma:.0f}  b {mb:.0f}  c {mc:.0f} MB  ratio {res['memory_ratio']:.3f}",
              flush=True)
        st = None
    res["targets_met"] = {"time": res["time_ratio"] <= TARGET_TIME, "memory": mem_ok if not args.no_memory else None}
    if not args.no_profile and not (res["time_ratio"] <= TARGET_TIME and mem_ok):
        print(f"[{method} on {device}] target missed: profiling the distillation step", flush=True)
        st = st or build(method, args, device)
        res["profile"] = profile_distill(st, args.profile_steps)
    return res


# =========================================================================== report
def fmt_s(x: float) -> str:
    return f"{1000 * x:.0f} ms" if x >= 0.01 else f"{1000 * x:.1f} ms"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Distillation overhead", "",
        f"Command: `{report['command']}`  ",
        machine_line(m),
        f"Steps: {report['warmup']} warm-up + {report['steps']} measured rounds, interleaved a, b, c; medians of process "
        "CPU time on CPU (1 thread: unaffected by other processes waiting for the cores), wall time on CUDA. "
        f"Memory: fresh process per configuration, {report['mem_steps']} steps; " + report["memory_definition"], "",
        "| method | device | teacher -> student | imgsz x batch | NHWC, teacher precision | (a) student step | (b) teacher taps | (c) KD step "
        "| time c/(a+b) | mem a / b / c | mem c/(a+b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        t = r["time"]
        mem = r.get("memory")
        mem_s = " / ".join(f"{mem[k]['peak_mb']:.0f}" for k in KINDS) + " MB" if mem else "-"
        ratio_m = f"{r['memory_ratio']:.2f}" + (" ✓" if r["memory_ratio"] <= TARGET_MEMORY else " ✗") if mem else "-"
        ratio_t = f"{r['time_ratio']:.2f}" + (" ✓" if r["time_ratio"] <= TARGET_TIME else " ✗")
        if r["time_basis"] != "wall":
            ratio_t += f" (wall {r['time_ratio_wall']:.2f})"
        lines.append(f"| {r['method']} | {r['device']} | {r['teacher']} -> {r['student']} | {r['imgsz']} x "
                     f"{r['batch_size']} | {'on' if r.get('channels_last') else 'off'}, {r.get('teacher_amp', 'off')} | {fmt_s(t['student']['median_s'])} | {fmt_s(t['teacher']['median_s'])} | "
                     f"{fmt_s(t['distill']['median_s'])} | {ratio_t} | {mem_s} | {ratio_m} |")
    lines += ["", f"Targets: time ratio <= {TARGET_TIME}, memory ratio <= {TARGET_MEMORY}.", ""]
    for r in report["results"]:
        lines += [f"## {r['method']} on {r['device']}", ""]
        if "teacher_kd" in r["time"]:
            lines.append(f"Teacher work the method itself runs (`distiller.teacher_taps`, incl. extra decoder pass): "
                         f"{fmt_s(r['time']['teacher_kd']['median_s'])}.  ")
        ph = r["distill_phases_s"]
        lines.append("Distillation step by phase (medians, synchronised): "
                     + ", ".join(f"{k} {fmt_s(v)}" for k, v in ph.items()) + ".  ")
        lines.append(f"Parameters (M): teacher {r['params_m']['teacher']:.1f}, student {r['params_m']['student']:.1f}, "
                     f"distiller {r['params_m']['distiller']:.1f}; optimiser {r['optimizer']}, amp {r['amp']}, "
                     f"teacher precision {r.get('teacher_amp', 'off')}, "
                     f"channels-last {'on' if r.get('channels_last') else 'off'}.")
        if not all(r["time"][k]["all_finite"] for k in KINDS):
            lines.append("Warning: some steps had a non-finite loss (their backward/step was skipped).")
        if "profile" in r:
            lines += ["", f"Top ops of the distillation step by self CPU time (torch.profiler, "
                          f"{r['profile']['steps']} steps, per step):", "",
                      "| op | calls | self CPU ms | share | CPU total ms |", "|---|---|---|---|---|"]
            for p in r["profile"]["top_self_cpu"][:15]:
                lines.append(f"| `{p['op']}` | {p['calls_per_step']} | {p['self_cpu_ms_per_step']} | "
                             f"{100 * p['self_cpu_share']:.1f}% | {p['cpu_total_ms_per_step']} |")
        lines.append("")
    return "\n".join(lines)


MEMORY_DEFINITION = {
    "cpu": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS just before the configuration's models "
           "were built: weights, gradients, optimiser state, activations and allocator slack.",
    "cuda": "torch.cuda.max_memory_allocated minus the bytes allocated before the configuration's models were built.",
}


# =========================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="all", choices=["drkd", "kd-detr", "all"])
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], or auto (CPU, and CUDA when present)")
    p.add_argument("--imgsz", type=int, default=None, help="default: 320 on CPU, 640 on CUDA (128 with --small)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="measured rounds (default 10; 3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; 1 with --small)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machines)")
    p.add_argument("--amp", default="auto", help="engine --amp: auto (bf16 on CUDA, off on CPU), bf16, fp16, off")
    p.add_argument("--teacher-amp", default="auto", help="engine --teacher-amp: auto, bf16, fp16, off")
    p.add_argument("--channels-last", default="auto", choices=sorted(CHANNELS_LAST),
                   help="engine --channels-last / --no-channels-last (auto: the engine's default)")
    p.add_argument("--teacher", default=None, help="override the method's teacher spec")
    p.add_argument("--student", default=None, help="override the method's student spec")
    p.add_argument("--mem-steps", type=int, default=3, help="steps run by each memory subprocess")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--small", action="store_true", help="tiny models and images (smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    p.add_argument("--worker-kind", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def devices(arg: str) -> list[str]:
    import torch

    if arg != "auto":
        return [arg]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.worker_kind:
        args.imgsz = args.imgsz or 128
        print(json.dumps(memory_worker(args)), flush=True)
        return
    set_threads(args.threads)
    args.steps = args.steps or (3 if args.small else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 2)
    methods = ["drkd", "kd-detr"] if args.method == "all" else [args.method]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    results, devs = [], devices(args.device)
    machine = machine_info(devs, args.threads)
    for device in devs:
        dev_args = argparse.Namespace(**vars(args))
        dev_args.imgsz = args.imgsz or (128 if args.small else 640 if device.startswith("cuda") else 320)
        for method in methods:
            results.append(bench_method(method, dev_args, device))
    report = {"command": command, "machine": machine, "warmup": args.warmup, "steps": args.steps,
              "mem_steps": args.mem_steps, "threads": args.threads,
              "memory_definition": " / ".join(f"{k}: {v}" for k, v in MEMORY_DEFINITION.items()),
              "targets": {"time_ratio": TARGET_TIME, "memory_ratio": TARGET_MEMORY}, "results": results}
    write_results(args.out, "overhead-small" if args.small else "overhead", report, markdown)


if __name__ == "__main__":
    main()
