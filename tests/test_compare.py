"""distill --baseline: the paired statistics, the baseline's configuration (the very student the distillation
starts from), the command's table and files, the model card's gain table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clitools import invoke

from kdctl.engine.compare import baseline_config, gains, paired_ci, summarise
from kdctl.engine.config import RunConfig, read_config
from kdctl.engine.trainer import Trainer


def test_paired_ci_is_the_t_interval():
    lo, hi = paired_ci([0.01, 0.02, 0.03])  # mean 0.02, sd 0.01, t(0.975, 2) = 4.302652729749464
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert lo == pytest.approx(0.02 - half, rel=1e-9) and hi == pytest.approx(0.02 + half, rel=1e-9)
    from scipy import stats

    diffs = [0.013, -0.004, 0.021, 0.008]
    ref = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)  # scipy's own paired-t interval
    assert paired_ci(diffs) == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert paired_ci([0.01]) is None  # one seed: no interval


def run(metrics: dict[str, float], seconds: float, mem: float) -> dict:
    full = {k: metrics.get(k, 0.5) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    return {"run": "r", "metrics": full, "steps": 2, "seconds": seconds, "step_time": seconds / 2,
            "peak_memory_mb": mem}


def test_gains_and_summary():
    d, b = run({"AP": 0.30, "APs": -1.0}, 30.0, 1200.0), run({"AP": 0.25}, 20.0, 1000.0)
    g = gains(d["metrics"], b["metrics"])
    assert g["AP"] == pytest.approx(0.05) and g["APs"] is None and g["AP50"] == 0.0
    d2, b2 = run({"AP": 0.28, "APs": -1.0}, 34.0, 1250.0), run({"AP": 0.27}, 20.0, 1000.0)
    runs = [{"seed": 0, "distilled": d, "baseline": b, "gain": g},
            {"seed": 1, "distilled": d2, "baseline": b2, "gain": gains(d2["metrics"], b2["metrics"])}]
    c = summarise(runs, None, {"method": "drkd"})
    assert c["seeds"] == [0, 1] and c["gain"]["AP"] == pytest.approx(0.03) and c["gain"]["APs"] is None
    assert c["distilled"]["AP"] == pytest.approx(0.29) and c["baseline"]["AP"] == pytest.approx(0.26)
    assert c["ci95"]["AP"] == pytest.approx(list(paired_ci([0.05, 0.01]))) and c["ci95"]["APs"] is None
    assert c["cost"]["time_ratio"] == pytest.approx(32 / 20) and c["cost"]["extra_memory_mb"] == pytest.approx(225)


def test_the_baseline_starts_from_the_distilled_student(tmp_path, synth):
    """KD-DETR gives a preset student the teacher's label order and query count: the baseline, built from the
    distillation's resolved config, gets the same, so both start from the same weights; a plain `train` of the
    same preset and seed does not (the check can fail)."""
    from transformers import DetrConfig, DetrForObjectDetection

    names = [c["name"] for c in json.loads((synth / "train.json").read_text())["categories"]]
    tc = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config={
        "model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 8, 16, 16], "embedding_size": 8,
        "out_features": ["stage4"]}, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=7,
        id2label=dict(enumerate(reversed(names))))
    DetrForObjectDetection(tc).save_pretrained(tmp_path / "teacher")
    kw = dict(model="detr-mobilenet-v2-small", data=str(synth), max_steps=1, batch_size=2, imgsz=64, device="cpu",
              workers=0, output=str(tmp_path / "runs"), quiet=True, pretrained_backbone=False, report_to="none")
    kd = Trainer(RunConfig(task="distill", teacher=str(tmp_path / "teacher"), name="kd", **kw))
    kd.setup()
    base = Trainer(baseline_config(kd.cfg), run_dir=kd.run_dir / "baseline")
    base.setup()
    plain = Trainer(RunConfig(task="train", name="plain", **kw))
    plain.setup()
    for t in (kd, base, plain):
        t.lock.release()
    assert base.run_dir == kd.run_dir / "baseline" and base.distiller is None and base.teacher is None
    assert base.student.label_names == list(reversed(names)) and base.student.model.config.num_queries == 7
    a, b, c = (t.student.model.state_dict() for t in (kd, base, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.student.model.config.num_queries == 100  # what the baseline would be without the pairing
    assert c["model.query_position_embeddings.weight"].shape[0] == 100
    cfg_b, _ = read_config(base.run_dir / "config.toml")
    assert cfg_b.task == "train" and cfg_b.teacher is None and cfg_b.student_setup["overrides"] == {"num_queries": 7}
    assert (cfg_b.recipe, cfg_b.seed, cfg_b.max_steps, cfg_b.optim) == (kd.cfg.recipe, 0, 1, kd.cfg.optim)


def test_distill_baseline_command(tmp_path, tiny_retinanet, synth, capsys):
    code, out, err = invoke(["distill", "--teacher", tiny_retinanet, "--student", tiny_retinanet, "--data",
                             str(synth), "--max-steps", "1", "--batch-size", "2", "--imgsz", "64", "--device", "cpu",
                             "--workers", "0", "--output", str(tmp_path / "runs"), "--name", "kd", "--quiet",
                             "--report-to", "none", "--baseline", "--seeds", "2"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "distill" / "kd"
    comp = json.loads((run_dir / "comparison.json").read_text())
    assert comp["seeds"] == [0, 1] and comp["method"] == "drkd"
    dirs = [Path(r[side]["run"]) for r in comp["runs"] for side in ("distilled", "baseline")]
    assert dirs == [run_dir, run_dir / "baseline", run_dir / "seed1", run_dir / "seed1" / "baseline"]
    for d, seed in zip(dirs, (0, 0, 1, 1), strict=True):
        cfg, _ = read_config(d / "config.toml")
        assert cfg.task == ("train" if d.name == "baseline" else "distill") and cfg.seed == seed
    for r in comp["runs"]:  # each metric a run reports is its final evaluation on the val split
        for side in ("distilled", "baseline"):
            last = json.loads((Path(r[side]["run"]) / "eval" / "last.json").read_text())
            assert r[side]["metrics"]["AP"] == last["AP"] and r[side]["steps"] == 1
        assert r["gain"]["AP"] == pytest.approx(r["distilled"]["metrics"]["AP"] - r["baseline"]["metrics"]["AP"])
    assert comp["teacher"]["images"] == len(json.loads((synth / "val.json").read_text())["images"])
    for line in ("KD gain on the val split", "(mean of 2 seeds)", "student, baseline (no KD)", "student + drkd",
                 "gain (KD - baseline)", "gain 95% CI (paired t)", "gain, seed 1", "comparison:"):
        assert line in out, line
    # the model card of the distilled run shows the table
    from kdctl.card import build_card, read_run

    card = str(build_card(read_run(run_dir), "acme/s", "cnn", "RetinaNet", ["a"]))
    assert "## Evaluation: the gain of distillation" in card and "| student without KD (mean of 2 seeds) |" in card
    assert "| gain, 95 % CI (paired t) |" in card and "| gain, seed 1 |" in card and str(tmp_path) not in card


def test_seeds_without_baseline_and_baseline_with_resume_are_refused(tmp_path, capsys):
    code, _, err = invoke(["distill", "--teacher", "a", "--student", "b", "--seeds", "3"], capsys)
    assert code == 2 and err == "error: --seeds 3 repeats the --baseline comparison; add --baseline\n"
    code, _, err = invoke(["distill", "--resume", str(tmp_path), "--baseline"], capsys)
    assert code == 2 and err.startswith("error: --baseline starts new runs")


def test_each_run_reports_its_own_cpu_peak_memory():
    """The baseline runs in the process the distillation ran in: its CPU peak (RSS) starts afresh, so a larger
    earlier peak does not show up as its own."""
    import numpy as np

    from kdctl.engine.precision import peak_memory_mb, prepare_device, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    before = peak_memory_mb("cpu")
    del big
    prepare_device("cpu")
    after = peak_memory_mb("cpu")
    assert before - after > 48, (before, after)  # the 64 MiB peak is gone (allowing for allocator slack)
