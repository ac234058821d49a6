"""Shared by the benchmark scripts: write a report as JSON + markdown into benchmarks/results/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(out: Path, stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/stem.json`` and ``out/stem.md`` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / stem}.json and .md")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    import platform
    import re

    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_line(m: dict[str, Any], *, device: bool = False) -> str:
    """The "Machine:" line of a report from its ``machine`` record (``device``: name the device the runs used)."""
    gpu = m.get("gpu")
    where = (f", device {m['device']}" + (f" ({gpu})" if gpu else "")) if device else (f", GPU {gpu}" if gpu else "")
    return (f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']}, torchvision {m['torchvision']}, "
            f"transformers {m['transformers']}, {m['torch_threads']} torch thread(s){where}, "
            f"load average at start {m['load_average'][0]:.2f}  ")
