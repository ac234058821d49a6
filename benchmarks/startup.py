"""CLI start-up time: ``kdctl --help`` and ``kdctl distill --help`` must answer at once (target < 0.5 s, issue #7).

Each command runs ``--repeat`` times as a fresh subprocess (after one untimed run that warms the file cache); the
wall time from ``Popen`` to exit is reported as median / min / max. ``python -X importtime`` then lists which
modules a run imports: the heavy ones (torch, torchvision, transformers, timm, numpy, pycocotools) must be absent.
A bare ``python -c pass`` gives the interpreter's own floor on this machine.

    python benchmarks/startup.py            # 10 runs per command
    python benchmarks/startup.py --small    # 3 runs per command
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _results import cpu_model, write_results  # benchmarks/_results.py (run as python benchmarks/X.py)

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5
HEAVY = ("torch", "torchvision", "transformers", "timm", "numpy", "pycocotools", "scipy", "safetensors", "PIL")


def machine_info() -> dict[str, Any]:
    cpu = cpu_model()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average": list(os.getloadavg())}


def kdctl_cmd() -> list[str]:
    """The installed ``kdctl`` console script next to this interpreter (else ``python -m kdctl``)."""
    exe = Path(sys.executable).with_name("kdctl")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kdctl")
    return [found] if found else [sys.executable, "-m", "kdctl"]


def wall_times(cmd: list[str], repeat: int) -> dict[str, Any]:
    """Wall seconds of ``repeat`` fresh runs of ``cmd`` (one untimed warm-up run first)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
    times, rc = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        rc = rc or proc.returncode
    return {"command": shlex.join(cmd), "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "samples_s": [round(t, 4) for t in times], "returncode": rc}


def imported_modules(args: list[str]) -> dict[str, Any]:
    """``python -X importtime -m kdctl ARGS``: the modules imported, the heavy ones among them, the slowest ones."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdctl", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3))))
    names = {r[0] for r in rows}
    top_level = sorted((r for r in rows if r[3] <= 1), key=lambda r: r[2], reverse=True)[:8]
    return {
        "modules": len(names),
        "heavy_imported": sorted(h for h in HEAVY if h in names),
        "total_import_ms": round(sum(r[1] for r in rows) / 1e3, 1),
        "slowest_top_level_ms": {r[0]: round(r[2] / 1e3, 1) for r in top_level},
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# CLI start-up time", "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), Python {m['python']}, load average at start "
        f"{m['load_average'][0]:.2f}; {report['repeat']} fresh runs per command after one warm-up run.", "",
        "| command | median | min | max | target < 0.5 s | heavy modules imported | modules |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        imp = r.get("imports")
        heavy = (", ".join(imp["heavy_imported"]) or "none") if imp else "-"
        ok = "-" if r["name"] == "python -c pass" else ("✓" if r["median_s"] < TARGET_S else "✗")
        lines.append(f"| `{r['name']}` | {1000 * r['median_s']:.0f} ms | {1000 * r['min_s']:.0f} ms | "
                     f"{1000 * r['max_s']:.0f} ms | {ok} | {heavy} | {imp['modules'] if imp else '-'} |")
    lines += ["", "Slowest top-level imports (`python -X importtime`, cumulative ms):", ""]
    for r in report["results"]:
        if r.get("imports"):
            slow = ", ".join(f"{k} {v}" for k, v in r["imports"]["slowest_top_level_ms"].items())
            lines.append(f"- `{r['name']}`: {slow}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=None, help="timed runs per command (default 10; 3 with --small)")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.small else 10)
    kd = kdctl_cmd()
    cases = [("python -c pass", [sys.executable, "-c", "pass"], None),
             ("kdctl --help", [*kd, "--help"], ["--help"]),
             ("kdctl distill --help", [*kd, "distill", "--help"], ["distill", "--help"]),
             ("kdctl eval --help", [*kd, "eval", "--help"], ["eval", "--help"])]
    results = []
    for name, cmd, imp_args in cases:
        r = {"name": name, **wall_times(cmd, repeat)}
        if imp_args is not None:
            r["imports"] = imported_modules(imp_args)
        results.append(r)
        print(f"{name}: median {1000 * r['median_s']:.0f} ms (min {1000 * r['min_s']:.0f}, max "
              f"{1000 * r['max_s']:.0f})", flush=True)
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
              "repeat": repeat, "target_s": TARGET_S, "results": results,
              "targets_met": all(r["median_s"] < TARGET_S for r in results if r["name"].startswith("kdctl"))
              and not any(r["imports"]["heavy_imported"] for r in results if r.get("imports"))}
    write_results(args.out, "startup-small" if args.small else "startup", report, markdown)


if __name__ == "__main__":
    main()
