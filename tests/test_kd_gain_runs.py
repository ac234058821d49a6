"""benchmarks/kd_gain.py's run bookkeeping, without training: which runs count as finished (and so are reused), and
the plan of --recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kd_gain  # noqa: E402


def fake_run(d: Path, step: int | None, total: int | None, last: bool = True) -> Path:
    (d / "eval").mkdir(parents=True)
    if step is not None:
        (d / "eval" / "last.json").write_text(json.dumps({"step": step, "AP": 0.1, "AP50": 0.2, "AP75": 0.05}))
    (d / "config.toml").write_text("task = \"train\"\n" + (f"[resolved]\ntotal_steps = {total}\n" if total else ""))
    if last:
        (d / "last").mkdir()
    return d


def test_a_run_killed_after_a_periodic_evaluation_is_not_finished(tmp_path):
    # a run evaluated every 6 of 12 epochs and killed in epoch 10 has eval/last.json and last/, at step 240 of 480
    assert not kd_gain.finished(fake_run(tmp_path / "killed", 240, 480))
    assert kd_gain.finished(fake_run(tmp_path / "done", 480, 480))
    assert not kd_gain.finished(fake_run(tmp_path / "no-last", 480, 480, last=False))
    assert not kd_gain.finished(fake_run(tmp_path / "no-eval", None, 480))
    assert not kd_gain.finished(fake_run(tmp_path / "no-total", 480, None))
    assert not kd_gain.finished(tmp_path / "missing")


def test_latest_teacher_skips_an_unfinished_one(tmp_path):
    args = kd_gain.parse_args(["--small", "--pair", "dab-detr-synth", "--work", str(tmp_path)])
    train = tmp_path / "runs" / "small" / "dab-detr-synth" / "train"
    assert kd_gain.latest_teacher(args, "dab-detr-synth") is None
    fake_run(train / "teacher", 600, 1800)  # still training
    assert kd_gain.latest_teacher(args, "dab-detr-synth") is None
    fake_run(train / "teacher2", 1800, 1800)
    assert kd_gain.latest_teacher(args, "dab-detr-synth") == str(train / "teacher2")


def test_recipe_plan_has_its_own_runs_and_the_pairs_teacher(tmp_path):
    recipe = tmp_path / "plain.toml"
    recipe.write_text('base = "rtdetr"\naugment = false\n')
    args = kd_gain.parse_args(["--small", "--pair", "rtdetr-synth", "--recipe", str(recipe)])
    (plan,) = kd_gain.plans(args)
    assert plan.pair == "rtdetr-synth-plain" and plan.teacher_pair == "rtdetr-synth"
    assert plan.recipe == str(recipe.resolve()) and plan.student == kd_gain.SMALL["rtdetr-synth"].student
    for bad in (["--pair", "all", "--recipe", str(recipe)], ["--pair", "fcos", "--recipe", str(tmp_path / "x.toml")]):
        with pytest.raises(SystemExit):
            kd_gain.parse_args(bad)


def test_methods_table_reuses_the_pairs_own_method_run(tmp_path, monkeypatch):
    """--methods with --reuse takes the pair's own method (DRKD on fcos) from the finished --kd-set new run of the
    seed (the same config), and trains the others."""
    args = kd_gain.parse_args(["--small", "--pair", "fcos", "--methods", "none,drkd,cwd", "--reuse",
                               "--work", str(tmp_path)])
    args.resolved_device = "cpu"
    plan = kd_gain.SMALL["fcos"]
    fake_run(tmp_path / "runs" / "small" / "fcos" / "distill" / "student-kd-new-s0", 520, 520)
    (tmp_path / "runs" / "small" / "fcos" / "distill" / "student-kd-new-s0" / "metrics.jsonl").write_text("")
    trained = []
    monkeypatch.setattr(kd_gain, "run_one", lambda *a, **k: trained.append(k["method"]) or {"AP": 1.0})
    monkeypatch.setattr(kd_gain, "write_methods", lambda *a, **k: None)
    kd_gain.run_methods(plan, args, tmp_path, {"AP": 40.0, "run_dir": "T"}, {0: "init", 1: "init"},
                        [{"AP": 1.0}, {"AP": 1.0}], [0, 1], 0.0)
    assert trained == ["cwd", "drkd", "cwd"]  # seed 0: drkd reused; seed 1 has no kd-new run


def test_seed_from_takes_the_last_seeds_only():
    assert kd_gain.parse_args(["--small", "--pair", "fcos", "--seeds", "3", "--seed-from", "2"]).seed_from == 2
    for bad in ("3", "-1"):
        with pytest.raises(SystemExit):
            kd_gain.parse_args(["--small", "--pair", "fcos", "--seeds", "3", "--seed-from", bad])


def test_a_run_killed_before_its_first_checkpoint_is_set_aside_not_shadowed(tmp_path):
    """A stub (config and logs, no last/trainer.pt) would make the engine number the new run NAME2, which --reuse
    never finds; set_aside moves it to NAME.unfinished-K (nothing deleted) and refuses a run another process holds."""
    from kdctl.engine.runlock import RunLock
    from kdctl.errors import KdctlError

    stub = tmp_path / "student-kd-new-s1"
    stub.mkdir()
    (stub / "config.toml").write_text("task = \"distill\"\n")
    moved = kd_gain.set_aside(stub)
    assert moved.name == "student-kd-new-s1.unfinished-1" and (moved / "config.toml").is_file()
    assert not stub.exists()
    stub.mkdir()
    assert kd_gain.set_aside(stub).name == "student-kd-new-s1.unfinished-2"
    stub.mkdir()
    with RunLock(stub), pytest.raises(KdctlError, match="in use"):
        kd_gain.set_aside(stub)
    assert stub.is_dir()
