"""The GPU suite's CPU rehearsal (``benchmarks/gpu_suite.py --smoke``) still runs, so the suite cannot rot
between the rare GPU sessions (issue #21). Slow: about 2-3 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for word in ("overhead", "throughput", "side_by_side", "gain", "cuda paths"):
        assert word in out.lower(), f"no {word!r} in the smoke output"
    doc = json.loads((tmp_path / "work" / "results" / "gpu_suite.json").read_text())
    assert doc["smoke"] is True and doc["device"] == "cpu"
    sections = doc["sections"]
    assert set(sections) == {"cuda_paths", "overhead", "throughput", "side_by_side", "gain"}
    assert sections["side_by_side"]["status"] == "pass" and set(sections["side_by_side"]["ratios"]["detr"]) == \
        {"b/a", "e/d", "e/c"}
    assert all(s["status"] in ("pass", "partial", "skipped") for s in sections.values()), sections
    checks = {c["check"]: c["status"] for c in sections["cuda_paths"]["checks"]}
    assert checks.get("resume = uninterrupted (fcos)") == "pass"
    assert checks.get("torchrun --nproc-per-node 1") == "pass"
    assert not [c for c, s in checks.items() if s == "fail"], checks
    assert (tmp_path / "work" / "results" / "gpu_suite.md").is_file()
    assert not (ROOT / "benchmarks" / "results" / "gpu" / "gpu_suite.json").exists() or \
        json.loads((ROOT / "benchmarks" / "results" / "gpu" / "gpu_suite.json").read_text())["device"] != "cpu"
