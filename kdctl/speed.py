"""Inference speed of a model: PyTorch and its ONNX export, batch 1 and batch N, on the current device.

What is timed is the whole prediction from a resized batch to detections (``predict``: the forward pass plus the
post-processing, the same path ``kdctl predict`` and ``kdctl eval`` take), on random pixels of the model's input
size (square ``imgsz`` x ``imgsz``, the worst case of the longer-side resize). Each row runs ``warmup`` untimed
passes, then ``repeats`` timed ones (CUDA: synchronised), and reports the median latency per batch and the
throughput ``batch / median``. ONNX rows export the model to a temporary folder (``kdctl export --format onnx``,
fp16 with ``half``) and run it in onnxruntime (CUDA provider when the device is CUDA and onnxruntime has it); the
CNN graphs take one image per run, so their batch N is N runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError


@dataclass
class SpeedRow:
    """One measurement: ``latency_ms`` median per batch (``p90_ms`` its 90th percentile), ``images_per_s``."""

    runtime: str
    precision: str
    where: str
    batch: int
    latency_ms: float
    p90_ms: float
    images_per_s: float
    note: str = ""


@dataclass
class SpeedReport:
    """What :func:`benchmark` measured and how (``setup`` in words, for the table's caption)."""

    model: str
    architecture: str
    imgsz: int
    warmup: int
    repeats: int
    rows: list[SpeedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def setup(self) -> str:
        return (f"{self.architecture} at {self.imgsz}x{self.imgsz}, random pixels; {self.warmup} warm-up runs, then "
                f"the median (and 90th percentile) of {self.repeats} timed runs per row; predict() end to end "
                "(forward + post-processing)")

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "setup": self.setup,
                "rows": [asdict(r) for r in self.rows]}


def random_batch(n: int, size: int, seed: int = 0):
    """A :class:`kdctl.data.batch.Batch` of ``n`` random 0-1 images [3, size, size] (original size = input size)."""
    import torch

    from kdctl.data.batch import collate

    g = torch.Generator().manual_seed(seed)
    samples = [(torch.rand((3, size, size), generator=g), {"boxes": torch.zeros((0, 4)),
                                                           "labels": torch.zeros(0, dtype=torch.long),
                                                           "orig_size": (size, size)}) for _ in range(n)]
    return collate(samples)


def time_predict(model: Any, batch: Any, *, warmup: int, repeats: int, device: str) -> list[float]:
    """Seconds of each of ``repeats`` timed ``model.predict(batch)`` calls, after ``warmup`` untimed ones."""
    import torch

    cuda = device.startswith("cuda")
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model.predict(batch, 0.001, 100)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def _row(runtime: str, precision: str, where: str, n: int, times: list[float], note: str = "") -> SpeedRow:
    med = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return SpeedRow(runtime, precision, where, n, round(1000 * med, 3), round(1000 * p90, 3), round(n / med, 2), note)


def benchmark(spec: str, *, imgsz: int | None = None, batch_size: int = 8, device: str = "auto", warmup: int = 3,
              repeats: int = 10, onnx: bool = True, half: bool = False, trust_remote_code: bool = False
              ) -> SpeedReport:
    """PyTorch and ONNX Runtime latency and throughput of ``spec`` at batch 1 and ``batch_size`` (module
    docstring). An exported ``.onnx`` spec gives the ONNX rows only."""
    import torch

    from kdctl.engine.rundir import resolve_device
    from kdctl.predict.load import load_predictor
    from kdctl.predict.onnx_runner import OnnxDetector

    if warmup < 0 or repeats < 1:
        raise KdctlError("--warmup must be >= 0 and --repeats >= 1")
    dev = resolve_device(device)
    model = load_predictor(spec, device=dev, trust_remote_code=trust_remote_code)
    size = int(imgsz or model.imgsz)
    rep = SpeedReport(spec, model.architecture, size, warmup, repeats)
    sizes = sorted({1, int(batch_size)})
    threads = f"{torch.get_num_threads()} threads" if dev == "cpu" else dev
    if not isinstance(model, OnnxDetector):
        for n in sizes:
            times = time_predict(model, random_batch(n, size).to(dev), warmup=warmup, repeats=repeats, device=dev)
            rep.rows.append(_row("PyTorch", "float32", f"{dev} ({threads})" if dev == "cpu" else dev, n, times))
    with tempfile.TemporaryDirectory(prefix="kdctl-speed-") as tmp:
        if isinstance(model, OnnxDetector):
            graph = model
        else:
            graph = _export(model, size, half, rep.notes, dev, Path(tmp)) if onnx else None
        if graph is not None:
            if graph.fixed and size != graph.imgsz:
                raise KdctlError(f"this graph takes {graph.imgsz}x{graph.imgsz} inputs only; pass --imgsz {graph.imgsz}")
            note = "one image per run: batch N = N runs" if graph.graph_family == "cnn" else ""
            precision = graph.meta.get("dtype", "float32")
            if str(graph.meta.get("precision", "")).startswith("float16 weights ("):
                precision += " (fp16 weights)"
            for n in sizes:
                times = time_predict(graph, random_batch(n, size), warmup=warmup, repeats=repeats, device="cpu")
                rep.rows.append(_row("ONNX Runtime", precision, graph.provider, n, times, note if n > 1 else ""))
    return rep


def _export(det: Any, size: int, half: bool, notes: list[str], device: str, tmp: Path) -> Any:
    """The model exported to ONNX in ``tmp`` and opened in onnxruntime; None (with a note) when its architecture
    has no ONNX export."""
    from kdctl.export import export_onnx, onnx_kind
    from kdctl.predict.onnx_runner import OnnxDetector

    cpu = det.float().cpu().eval()
    try:
        onnx_kind(cpu)
    except KdctlError as e:
        notes.append(f"no ONNX rows: {e}")
        return None
    export_onnx(cpu, tmp, half=half, imgsz=size, check=False)
    det.to(device)
    graph = OnnxDetector(tmp / "model.onnx", device)
    notes.append(f"ONNX graph: {graph.meta.get('precision', 'float32')}")
    return graph


__all__ = ["SpeedReport", "SpeedRow", "benchmark", "random_batch", "time_predict"]
