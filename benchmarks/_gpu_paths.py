"""The CUDA-path section of ``gpu_suite.py``: every supported architecture (tiny configs) trained and distilled
for a few steps under each ``--amp``, ``eval``, ONNX export of a device-trained run with onnxruntime parity, a
``torchrun --nproc-per-node 1`` run (nccl on CUDA, gloo on CPU) and exact resume. One line per check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_CNN = {"fpn_channels": 64, "trainable_layers": 5, "topk_candidates": 50, "detections_per_img": 20}
CNN_PRESETS = {"fasterrcnn": "fasterrcnn-r18-fpn", "fcos": "fcos-r18-fpn", "retinanet": "retinanet-r18-fpn"}
DETR_PRESETS = {  # presets of the DETR variants the tiny builders do not cover (their own option names)
    "conditional-detr": ("conditional-detr-r18", {"encoder_layers": 1, "decoder_layers": 2, "num_queries": 20}),
    "deformable-detr": ("deformable-detr-r18", {"encoder_layers": 1, "decoder_layers": 2, "num_queries": 20}),
    "dab-detr": ("dab-detr-r18", {"encoder_layers": 1, "decoder_layers": 2, "num_queries": 20}),
}
SMOKE_ARCHS = ("fcos", "detr")
RESUME_RTOL = 1e-4  # resume without deterministic kernels: max |a - b| <= RTOL * max |a| per tensor


class Checks:
    """Check lines, printed as they finish and kept for the JSON report."""

    def __init__(self, say: Callable[[str], None], left: Callable[[], float]) -> None:
        self.rows: list[dict[str, Any]] = []
        self.say, self.left = say, left

    def run(self, name: str, fn: Callable[[], str], need: float = 1.0) -> Any:
        if self.left() < need:
            self.rows.append({"check": name, "status": "skipped", "detail": "section budget spent"})
            self.say(f"  SKIP {name}: section budget spent")
            return None
        t0 = time.perf_counter()
        try:
            detail, status = fn(), "pass"
        except Exception as e:  # noqa: BLE001 - one line per failed check, the suite goes on
            detail, status = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}", "fail"
        secs = time.perf_counter() - t0
        self.rows.append({"check": name, "status": status, "detail": detail, "seconds": round(secs, 2)})
        self.say(f"  {status.upper()} {name} ({secs:.1f}s): {detail}")
        return status == "pass"

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"check": name, "status": "skipped", "detail": why})
        self.say(f"  SKIP {name}: {why}")


def tiny_models(work: Path, names: list[str], archs: tuple[str, ...], imgsz: int) -> dict[str, tuple[str, str]]:
    """arch -> (student dir, teacher dir): tiny randomly initialised models saved under ``work/models``."""
    import torch
    from _gpu_tiny import ARCHS as HF_ARCHS
    from _gpu_tiny import build as build_hf

    from kdctl.specs import load_detector

    out: dict[str, tuple[str, str]] = {}
    for arch in archs:
        dirs = []
        for role, seed in (("student", 0), ("teacher", 1)):
            d = work / "models" / f"{arch}-{role}"
            if not d.exists():
                torch.manual_seed(seed)
                if arch in HF_ARCHS:
                    build_hf(arch, names, role == "student").save_pretrained(d)
                else:
                    preset, over = (CNN_PRESETS[arch], TINY_CNN) if arch in CNN_PRESETS else DETR_PRESETS[arch]
                    det = load_detector(preset, label_names=names, pretrained_backbone=False, overrides=over)
                    det.imgsz = imgsz
                    det.save(d)
            dirs.append(str(d))
        out[arch] = (dirs[0], dirs[1])
    return out


def run_config(ctx: Any, **kw: Any):
    from kdctl.engine.config import RunConfig

    base = dict(data=str(ctx.paths_data), max_steps=ctx.paths_steps, batch_size=ctx.paths_batch, imgsz=ctx.paths_imgsz,
                device=ctx.device, workers=ctx.workers, output=str(ctx.work / "runs"), quiet=True, log_every=1,
                seed=0, channels_last=True, eval_every=100)
    base.update(kw)
    return RunConfig(**base)


def one_run(ctx: Any, task: str, arch: str, amp: str, models: dict[str, tuple[str, str]]) -> str:
    from kdctl.engine.trainer import train

    student, teacher = models[arch]
    kw = {"teacher": teacher} if task == "distill" else {}
    r = train(run_config(ctx, task=task, model=student, amp=amp, name=f"{task}-{arch}-{amp}", **kw))
    losses = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in losses if x["type"] == "train"][-1]
    if not all(isinstance(v, float) and v == v for k, v in last.items() if k == "loss"):
        raise RuntimeError(f"non-finite loss {last.get('loss')}")
    from safetensors.torch import load_file

    bad = [k for k, v in load_file(str(r.run_dir / "last" / "model.safetensors")).items()
           if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RuntimeError(f"non-finite weights after {r.steps} steps: {bad[:3]}")
    ctx.trained[(task, arch, amp)] = r.run_dir
    return (f"{r.steps} steps, loss {last['loss']:.3f}, method {r.method}, AP {r.metrics.get('AP', -1):.3f}, "
            f"peak {r.peak_memory_mb:.0f} MB")


def eval_check(ctx: Any, run_dir: Path) -> str:
    from kdctl.data.coco import open_split
    from kdctl.engine.evaluate import evaluate_detector
    from kdctl.engine.precision import amp_dtype, to_channels_last
    from kdctl.specs import load_detector

    cd = open_split(str(ctx.paths_data), "val")
    det = load_detector(str(run_dir), label_names=cd.names, pretrained_backbone=False)
    det.set_classes(cd.names)
    det.to(ctx.device).eval()
    to_channels_last(det)
    res = evaluate_detector(det, cd, batch_size=ctx.paths_batch, device=ctx.device,
                            amp_dtype=amp_dtype("auto", ctx.device))
    return f"{res.num_images} images, {res.images_per_second:.1f} img/s, AP {res.metrics['AP']:.3f}"


def export_check(run_dir: Path, out: Path) -> str:
    from kdctl.export import export_model

    res = export_model(str(run_dir), "onnx", out, force=True, check=True)
    parity = (res.onnx or {}).get("parity", {})
    diffs = parity.get("max_abs_diff", {})
    worst = max(diffs.values()) if diffs else float("nan")
    if parity.get("warning"):
        return f"parity checked, warning: {parity['warning']}"
    return f"onnxruntime parity: max abs diff {worst:.2e} ({parity.get('compared', 'detections')})"


def torchrun_check(ctx: Any, model: str, timeout: float) -> str:
    backend = "nccl" if ctx.device.startswith("cuda") else "gloo"
    out = ctx.work / "runs-torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "kdctl",
           "train", "--model", model, "--data", str(ctx.paths_data), "--max-steps", "2", "--batch-size",
           str(ctx.paths_batch), "--imgsz", str(ctx.paths_imgsz), "--device", "cuda" if backend == "nccl" else "cpu",
           "--workers", "0", "--output", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(5.0, timeout))
    if p.returncode:
        lines = (p.stderr + p.stdout).splitlines()
        errs = [ln for ln in lines if "Error" in ln or ln.startswith("error:")] or lines[-1:] or ["?"]
        raise RuntimeError(f"exit {p.returncode}: {errs[-1].strip()[:300]}")
    runs = sorted((out / "train").glob("*/config.toml"), key=lambda q: q.stat().st_mtime)
    world = "?"
    if runs:
        world = next((ln.split("=")[1].strip() for ln in runs[-1].read_text().splitlines()
                      if ln.startswith("world_size")), "?")
    return f"{backend}, world size {world}, exit 0"


def resume_check(ctx: Any, model: str) -> str:
    """A run stopped after 2 of 4 steps and resumed ends where an uninterrupted run ends."""
    import torch
    from safetensors.torch import load_file

    from kdctl.engine.trainer import Trainer, train

    cuda = ctx.device.startswith("cuda")
    if cuda:  # deterministic cuDNN (the engine then leaves cudnn.benchmark off)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        full = train(run_config(ctx, model=model, max_steps=4, name="resume-full", amp="off"))

        def stop(t: Trainer) -> None:
            if t.pos.step == 2:
                raise KeyboardInterrupt

        try:
            Trainer(run_config(ctx, model=model, max_steps=4, name="resume-cut", amp="off"), on_step=stop).run()
        except KeyboardInterrupt:
            pass
        cut = ctx.work / "runs" / "train" / "resume-cut"
        train(resume=cut)
    finally:
        if cuda:
            torch.backends.cudnn.deterministic = False
    a, b = (load_file(str(d / "last" / "model.safetensors")) for d in (full.run_dir, cut))
    if a.keys() != b.keys():
        raise RuntimeError("the resumed run's weights have other tensors")
    if all(torch.equal(a[k], b[k]) for k in a):
        return "bitwise identical weights after 4 steps (stopped at 2, resumed)"
    worst = max(float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-12)) for k in a)
    if worst <= RESUME_RTOL:
        return f"within tolerance: max |diff| / max |w| = {worst:.1e} <= {RESUME_RTOL:g} (not bitwise)"
    raise RuntimeError(f"resumed weights differ: max |diff| / max |w| = {worst:.1e} > {RESUME_RTOL:g}")


def cuda_paths(ctx: Any, say: Callable[[str], None], left: Callable[[], float]) -> dict[str, Any]:
    """Run the section; returns its report (rows of checks)."""
    from _gpu_tiny import ARCHS as HF_ARCHS

    from kdctl.data.synth import synthesize

    c = Checks(say, left)
    ctx.trained = {}
    if not (ctx.paths_data / "val.json").exists():
        synthesize(ctx.paths_data, ctx.paths_images, seed=3, size=(ctx.paths_imgsz, ctx.paths_imgsz + 32))
    names = [x["name"] for x in json.loads((ctx.paths_data / "train.json").read_text())["categories"]]
    archs = SMOKE_ARCHS if ctx.smoke else (*CNN_PRESETS, *HF_ARCHS, *DETR_PRESETS)
    models = tiny_models(ctx.work, names, archs, ctx.paths_imgsz)
    amps = ("bf16", "fp16", "off") if ctx.device.startswith("cuda") else ("bf16", "off")
    if "fp16" not in amps:
        c.skip("fp16 (GradScaler)", "needs CUDA; the smoke run checks bf16 and off")
    # the unique checks first: exact resume, torchrun, eval and export of a device-trained run
    c.run("resume = uninterrupted (fcos)", lambda: resume_check(ctx, models["fcos"][0]), need=10)
    c.run("torchrun --nproc-per-node 1", lambda: torchrun_check(ctx, models["fcos"][0], left() - 2), need=15)
    for arch in ("fcos", "detr"):
        ok = c.run(f"train {arch} amp bf16", lambda a=arch: one_run(ctx, "train", a, "bf16", models))
        if ok:
            run_dir = ctx.trained[("train", arch, "bf16")]
            c.run(f"eval {arch}", lambda r=run_dir: eval_check(ctx, r))
            c.run(f"export onnx {arch} (trained on {ctx.device})",
                  lambda r=run_dir, a=arch: export_check(r, ctx.work / "onnx" / a), need=5)
    for arch in archs:
        for task in ("train", "distill"):
            for amp in amps:
                if (task, arch, amp) in ctx.trained:
                    continue
                c.run(f"{task} {arch} amp {amp}", lambda t=task, a=arch, m=amp: one_run(ctx, t, a, m, models))
    counts = {s: sum(r["status"] == s for r in c.rows) for s in ("pass", "fail", "skipped")}
    say(f"cuda paths: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped")
    return {"checks": c.rows, "counts": counts, "archs": list(archs), "amps": list(amps)}
