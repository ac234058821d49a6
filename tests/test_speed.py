"""kdctl benchmark: PyTorch and ONNX Runtime rows at batch 1 and N, throughput = batch / median latency, how it
was measured stated; an exported graph alone gives the ONNX rows only."""

from __future__ import annotations

import json

import pytest
from batches import save_tiny_detr
from clitools import invoke

from kdctl.speed import benchmark


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory):
    return save_tiny_detr(tmp_path_factory.mktemp("detr") / "m", ["a"], num_queries=5)


def test_benchmark_rows(detr_dir):
    rep = benchmark(str(detr_dir), imgsz=64, batch_size=3, device="cpu", warmup=1, repeats=3)
    assert [(r.runtime, r.batch) for r in rep.rows] == [("PyTorch", 1), ("PyTorch", 3), ("ONNX Runtime", 1),
                                                        ("ONNX Runtime", 3)]
    for r in rep.rows:
        assert 0 < r.latency_ms <= r.p90_ms
        assert r.images_per_s == pytest.approx(1000 * r.batch / r.latency_ms, rel=1e-2)
    assert "1 warm-up runs" in rep.setup and "3 timed runs" in rep.setup and "64x64" in rep.setup


def test_benchmark_cli_json_and_onnx_only(detr_dir, tmp_path, capsys):
    base = ["benchmark", "--imgsz", "64", "--batch-size", "2", "--device", "cpu", "--warmup", "0", "--repeats", "2"]
    code, out, _ = invoke([*base, "--model", str(detr_dir), "--no-onnx", "--json", str(tmp_path / "s.json")], capsys)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and "latency" in out and {r["runtime"] for r in saved["rows"]} == {"PyTorch"}
    code, _, _ = invoke(["export", "--model", str(detr_dir), "--format", "onnx", "--imgsz", "64", "--output",
                         str(tmp_path / "o")], capsys)
    code, out, _ = invoke([*base, "--model", str(tmp_path / "o" / "model.onnx")], capsys)
    assert code == 0 and "ONNX Runtime" in out and "PyTorch" not in out.split("speed of")[1].split("\n", 1)[1]
