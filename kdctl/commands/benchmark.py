"""``kdctl benchmark``: latency and throughput of a model, PyTorch and ONNX Runtime, batch 1 and batch N."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.commands.output import console


def benchmark_command(model: str, *, imgsz: int | None = None, batch_size: int = 8, device: str = "auto",
                      warmup: int = 3, repeats: int = 10, onnx: bool = True, half: bool = False,
                      json_out: Path | None = None, trust_remote_code: bool = False) -> Any:
    """Measure (:func:`kdctl.speed.benchmark`), print one table with how it was measured, optionally write JSON."""
    from rich.table import Table

    from kdctl.io import write_json
    from kdctl.speed import benchmark

    rep = benchmark(model, imgsz=imgsz, batch_size=batch_size, device=device, warmup=warmup, repeats=repeats,
                    onnx=onnx, half=half, trust_remote_code=trust_remote_code)
    t = Table(title=f"speed of {model}", caption=rep.setup)
    for col in ("runtime", "precision", "device", "batch", "latency ms (median)", "p90 ms", "images/s", "note"):
        t.add_column(col, justify="right" if col in ("batch", "latency ms (median)", "p90 ms", "images/s") else "left")
    for r in rep.rows:
        t.add_row(r.runtime, r.precision, r.where, str(r.batch), f"{r.latency_ms:.2f}", f"{r.p90_ms:.2f}",
                  f"{r.images_per_s:.1f}", r.note)
    c = console()
    c.print(t)
    for note in rep.notes:
        c.print(f"  {note}", soft_wrap=True)
    if json_out is not None:
        write_json(json_out, rep.to_json())
        c.print(f"written: {json_out}")
    return rep
