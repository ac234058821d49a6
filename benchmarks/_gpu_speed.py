"""The throughput section of ``gpu_suite.py``: images/s of kdctl's ``train``, ``distill`` and ``eval`` against a
bare torchvision loop on the same model (pre-loaded batches, same optimiser, autocast and memory layout), and the
GPU utilisation ``nvidia-smi`` reports meanwhile."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any


class GpuSampler:
    """``nvidia-smi`` utilisation every 0.5 s in a thread while a block runs (empty where it does not answer)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=6)

    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_run(ctx: Any, task: str, steps: int) -> dict[str, Any]:
    """images/s of a ``train`` / ``distill`` run (median step time after the first step)."""
    from kdctl.engine.config import RunConfig
    from kdctl.engine.trainer import train

    kw = {"teacher": ctx.speed_teacher} if task == "distill" else {}
    cfg = RunConfig(task=task, model=ctx.speed_student, data=str(ctx.speed_data), max_steps=steps,
                    batch_size=ctx.speed_batch, imgsz=ctx.speed_imgsz, device=ctx.device, workers=ctx.workers,
                    output=str(ctx.work / "runs-speed"), quiet=True, log_every=1000, amp=ctx.speed_amp,
                    pretrained_backbone=False, name=f"speed-{task}", **kw)
    with GpuSampler() as g:
        r = train(cfg)
    return {"images_per_s": round(ctx.speed_batch / r.step_time, 2), "step_s": round(r.step_time, 4),
            "steps": r.steps, "gpu_util_percent": g.mean(), "peak_memory_mb": round(r.peak_memory_mb, 1)}


def load_model_and_batches(ctx: Any, n: int):
    import torch

    from kdctl.data.coco import open_split
    from kdctl.data.dataset import CocoDetection, make_loader
    from kdctl.engine.precision import to_channels_last
    from kdctl.specs import load_detector

    cd = open_split(str(ctx.speed_data), "train")
    torch.manual_seed(0)
    det = load_detector(ctx.speed_student, label_names=cd.names, pretrained_backbone=False)
    det.set_classes(cd.names)
    det.to(ctx.device)
    to_channels_last(det)
    loader = make_loader(CocoDetection(cd, ctx.speed_imgsz, train=True), ctx.speed_batch, shuffle=False, workers=0)
    batches = []
    for b in loader:
        batches.append(b.to(ctx.device))
        if len(batches) >= n:
            break
    return det, batches


def bare_train(ctx: Any, steps: int) -> dict[str, Any]:
    """The same torchvision model trained by a plain loop over pre-loaded device batches."""
    import torch

    from kdctl.engine.precision import amp_dtype

    det, batches = load_model_and_batches(ctx, min(steps, 4))
    model = det.model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    dtype = amp_dtype(ctx.speed_amp, ctx.device)
    dev = "cuda" if ctx.device.startswith("cuda") else "cpu"
    times = []
    for i in range(steps):
        b = batches[i % len(batches)]
        images = [b.images[j, :, :h, :w] for j, (h, w) in enumerate(b.sizes)]
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in b.targets]
        sync(ctx.device)
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(ctx.device)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:] or times)
    return {"images_per_s": round(ctx.speed_batch / step, 2), "step_s": round(step, 4), "steps": steps}


def eval_speed(ctx: Any) -> dict[str, Any]:
    """``evaluate_detector`` end to end (loader, predict, COCOeval) against ``model(images)`` over pre-loaded
    batches of the same split."""
    import torch

    from kdctl.data.coco import open_split
    from kdctl.engine.evaluate import evaluate_detector
    from kdctl.engine.precision import amp_dtype

    det, batches = load_model_and_batches(ctx, 4)
    det.eval()
    cd = open_split(str(ctx.speed_data), "val")
    dtype = amp_dtype(ctx.speed_amp, ctx.device)
    with GpuSampler() as g:
        res = evaluate_detector(det, cd, batch_size=ctx.speed_batch, device=ctx.device, workers=ctx.workers,
                                amp_dtype=dtype)
    dev = "cuda" if ctx.device.startswith("cuda") else "cpu"
    owner = getattr(det.model, "roi_heads", det.model)  # the score threshold and cap that predict() evaluates with
    for attr, value in (("score_thresh", 0.001), ("detections_per_img", 100)):
        if hasattr(owner, attr):
            setattr(owner, attr, value)
    model, n, t = det.model.eval(), 0, 0.0
    with torch.no_grad(), torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i, b in enumerate(batches):
            images = [b.images[j, :, :h, :w] for j, (h, w) in enumerate(b.sizes)]
            sync(ctx.device)
            t0 = time.perf_counter()
            model(images)
            sync(ctx.device)
            if i:  # the first batch warms up
                t, n = t + time.perf_counter() - t0, n + len(images)
    bare = n / t if t > 0 else float("nan")
    return {"engine": {"images_per_s": round(res.images_per_second, 2), "gpu_util_percent": g.mean()},
            "bare": {"images_per_s": round(bare, 2)}, "ratio": round(res.images_per_second / bare, 3)}


def saved_models(ctx: Any) -> None:
    """The student and teacher presets saved for the data's classes (a teacher must know them)."""
    import json

    import torch

    from kdctl.specs import load_detector

    names = [c["name"] for c in json.loads((ctx.speed_data / "train.json").read_text())["categories"]]
    for role in ("student", "teacher"):
        spec = getattr(ctx, f"speed_{role}")
        d = ctx.work / "models" / f"speed-{role}-{spec}"
        if not d.exists():
            torch.manual_seed(0)
            load_detector(spec, label_names=names, pretrained_backbone=False).save(d)
        setattr(ctx, f"speed_{role}", str(d))


def throughput(ctx: Any, say: Callable[[str], None], left: Callable[[], float]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    specs = ctx.speed_student, ctx.speed_teacher
    saved_models(ctx)
    steps, bare = ctx.speed_steps, {}

    def bare_once() -> dict[str, Any]:
        if not bare:
            bare.update(bare_train(ctx, steps))
        return bare

    parts = [("train", lambda: {"engine": engine_run(ctx, "train", steps), "bare": bare_once()}),
             ("distill", lambda: {"engine": engine_run(ctx, "distill", steps), "bare": bare_once()}),
             ("eval", lambda: eval_speed(ctx))]
    for name, fn in parts:
        if left() < 3:
            rows[name] = {"status": "skipped", "detail": "section budget spent"}
            say(f"  SKIP throughput {name}: section budget spent")
            continue
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - one line, the suite goes on
            rows[name] = {"status": "fail", "detail": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"  FAIL throughput {name}: {rows[name]['detail']}")
            continue
        if "ratio" not in r:
            r["ratio"] = round(r["engine"]["images_per_s"] / r["bare"]["images_per_s"], 3)
        r["status"] = "pass"
        rows[name] = r
        util = r["engine"].get("gpu_util_percent")
        say(f"  throughput {name}: kdctl {r['engine']['images_per_s']} img/s, bare loop {r['bare']['images_per_s']} "
            f"img/s, ratio {r['ratio']}" + (f", GPU util {util}%" if util is not None else ""))
    note = ("distill is compared with the bare loop of the student alone: its ratio is the whole price of KD "
            "(teacher forward + KD loss) plus the engine's")
    return {"model": specs[0], "teacher": specs[1], "imgsz": ctx.speed_imgsz,
            "batch_size": ctx.speed_batch, "amp": ctx.speed_amp, "rows": rows, "note": note}
