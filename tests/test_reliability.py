"""Faults a user runs into (issue #13): what is stored with a run, what is refused, and what survives."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from clitools import invoke as run_cli
from safetensors.torch import load_file

from kdctl.cli import main
from kdctl.engine.checkpoint import load_trainer_state, save_checkpoint
from kdctl.engine.config import RunConfig, read_config, save_interval
from kdctl.engine.progress import new_console, percent
from kdctl.engine.runlock import RunLock
from kdctl.engine.trainer import Trainer, train
from kdctl.errors import KdctlError
from kdctl.specs import load_detector


def cfg(tmp_path, model, data, **kw) -> RunConfig:
    base = dict(task="train", model=model, data=str(data), max_steps=2, batch_size=2, imgsz=64, device="cpu",
                workers=0, output=str(tmp_path / "runs"), quiet=True, log_every=1, seed=0)
    base.update(kw)
    return RunConfig(**base)


# --------------------------------------------------------------------------- what a run stores
def test_trained_imgsz_is_stored_with_the_model(tmp_path, tiny_retinanet, synth):
    r = train(cfg(tmp_path, tiny_retinanet, synth, imgsz=48))
    for sub in ("best", "last"):
        assert json.loads((r.run_dir / sub / "kdctl.json").read_text())["imgsz"] == 48
    assert load_detector(str(r.run_dir)).imgsz == 48  # eval, inspect and export read it from here
    assert load_detector(tiny_retinanet).imgsz == 64  # the input model is untouched


def test_config_stores_absolute_paths_and_resumes_from_another_directory(tmp_path, tiny_retinanet, synth,
                                                                         monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(synth, work / "data")
    shutil.copytree(tiny_retinanet, work / "model")
    monkeypatch.chdir(work)
    r = train(RunConfig(task="train", model="model", data="data", max_steps=1, batch_size=2, imgsz=64,
                        device="cpu", workers=0, output="runs", quiet=True, name="rel"))
    c, _ = read_config(work / "runs" / "train" / "rel" / "config.toml")
    for key in ("data", "output", "model"):
        assert Path(getattr(c, key)).is_absolute(), key
    assert Path(c.data) == work / "data"
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative paths would now point nowhere
    resumed = train(resume=work / "runs" / "train" / "rel", overrides={"max_steps": 2})
    assert resumed.steps == 2 and resumed.run_dir == r.run_dir.absolute()


# --------------------------------------------------------------------------- refused up front
def test_training_split_without_boxes_is_fatal(tmp_path, tiny_retinanet, synth):
    data = tmp_path / "noann"
    shutil.copytree(synth, data)
    for f in ("train.json", "val.json"):
        j = json.loads((data / f).read_text())
        j["annotations"] = []
        (data / f).write_text(json.dumps(j))
    with pytest.raises(KdctlError, match="the training split has no boxes"):
        train(cfg(tmp_path, tiny_retinanet, data))
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_val_split_without_boxes_reports_na_and_lists_only_written_paths(tmp_path, tiny_retinanet, synth, capsys):
    data = tmp_path / "noval"
    shutil.copytree(synth, data)
    j = json.loads((data / "val.json").read_text())
    j["annotations"] = []
    (data / "val.json").write_text(json.dumps(j))
    r = train(cfg(tmp_path, tiny_retinanet, data, quiet=False))
    out = capsys.readouterr().out
    assert "AP n/a" in out and "-100" not in out
    assert not (r.run_dir / "best").exists()  # no AP, no best checkpoint ...
    weights_row = next(line for line in out.splitlines() if "weights" in line)
    assert f"{r.run_dir}/last" in weights_row and "best" not in weights_row  # ... and none is listed


@pytest.mark.parametrize("lr", ["nan", "-1", "inf", "0"])
def test_non_finite_or_negative_lr_is_refused_at_parse_time(tmp_path, synth, capsys, lr):
    code, out, err = run_cli(["train", "--model", "fcos-mobilenet-v2", "--data", str(synth), f"--lr={lr}",
                              "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and err.startswith("error: --lr") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_is_one_line(tmp_path, tiny_retinanet, synth, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(KdctlError, match=r"cannot create the run folder .*afile.*Not a directory"):
        train(cfg(tmp_path, tiny_retinanet, synth, output=str(blocker / "runs")))
    code, _, err = run_cli(["data", "synth", str(blocker / "x"), "--images", "2"], capsys)
    assert code == 2 and err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1


def test_failed_checkpoint_write_keeps_the_previous_one_and_no_temp(tmp_path, tiny_retinanet, monkeypatch):
    det = load_detector(tiny_retinanet)
    save_checkpoint(tmp_path / "last", det, {"step": 1})
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "last.tmp-1" / "trainer.pt"))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(KdctlError, match=r"No space left on device; the previous checkpoint .*last is intact"):
        save_checkpoint(tmp_path / "last", det, {"step": 2})
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert load_trainer_state(tmp_path / "last") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the temp folder is gone


def test_stale_temp_folders_are_removed_on_resume(tmp_path, tiny_retinanet, synth):
    r = train(cfg(tmp_path, tiny_retinanet, synth, max_steps=1))
    stale = r.run_dir / "last.tmp-4194303"  # above Linux's pid_max default: no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    train(resume=r.run_dir, overrides={"max_steps": 2})
    assert not stale.exists()


# --------------------------------------------------------------------------- one process per run
def test_a_second_process_on_a_run_is_refused(tmp_path, tiny_retinanet, synth):
    r = train(cfg(tmp_path, tiny_retinanet, synth, max_steps=1))
    metrics = (r.run_dir / "metrics.jsonl").read_text()
    with RunLock(r.run_dir):  # another process holds the run
        with pytest.raises(KdctlError, match=rf"in use by process {os.getpid()}"):
            train(resume=r.run_dir, overrides={"max_steps": 2})
    assert (r.run_dir / "metrics.jsonl").read_text() == metrics  # the refused process wrote nothing
    assert train(resume=r.run_dir, overrides={"max_steps": 2}).steps == 2  # released: resumes


# --------------------------------------------------------------------------- losing less work
def test_save_interval_default_by_epoch_length():
    assert save_interval(None, 100) == 0 and save_interval(None, 5000) == 500
    assert save_interval(0, 5000) == 0 and save_interval(3, 10) == 3


def test_mid_epoch_checkpoint_resumes_bitwise(tmp_path, tiny_retinanet, synth):
    # 7 train images, batch 2: 4 steps per epoch; a crash (no handler runs) at step 3 leaves step 2's checkpoint
    full = train(cfg(tmp_path, tiny_retinanet, synth, name="full", max_steps=4))

    def crash_at_3(t: Trainer) -> None:
        if t.pos.step == 3:
            raise RuntimeError("simulated preemption")

    with pytest.raises(RuntimeError):
        Trainer(cfg(tmp_path, tiny_retinanet, synth, name="cut", max_steps=4, save_every_steps=2),
                on_step=crash_at_3).run()
    cut = tmp_path / "runs" / "train" / "cut"
    assert load_trainer_state(cut / "last")["step"] == 2
    train(resume=cut)
    a, b = load_file(str(full.run_dir / "last" / "model.safetensors")), load_file(str(cut / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from a mid-epoch checkpoint, the run differs"


# --------------------------------------------------------------------------- what the user reads
def test_inspect_preset_needs_no_data(capsys):
    code, out, err = run_cli(["inspect", "fcos-mobilenet-v2-0.5", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["labels"] == "taken from the data or teacher" and info["parameters"] > 0
    code, out, _ = run_cli(["inspect", "detr-mobilenet-v2-small"], capsys)
    assert code == 0 and "taken from the data or teacher" in out


def test_half_width_preset_trains_with_default_options(tmp_path, synth, capsys):
    r = train(cfg(tmp_path, "fcos-mobilenet-v2-0.5", synth, max_steps=1))  # pretrained_backbone defaults to True
    assert r.steps == 1
    assert "no ImageNet weights for mobilenet_v2 at width_mult 0.5" in capsys.readouterr().err


def test_metrics_without_ground_truth_read_na():
    assert percent(-1.0) == "n/a" and percent(0.2637) == "26.4"


def test_console_does_not_wrap_into_a_pipe(capsys):
    long_path = "/a/" + "x" * 150 + "/model.safetensors"
    new_console().print(f"weights: {long_path}")
    assert capsys.readouterr().out.strip() == f"weights: {long_path}"


def test_progress_counts_only_the_batches_max_steps_runs(tmp_path, tiny_retinanet, synth, capsys):
    train(cfg(tmp_path, tiny_retinanet, synth, max_steps=2, quiet=False))  # an epoch has 4 batches
    out = capsys.readouterr().out
    assert "batch 1/2" in out and "batch 2/2" in out and "/4" not in out


# --------------------------------------------------------------------------- hints name real options
def _command_options() -> dict[str, set[str]]:
    import typer.main

    from kdctl.cli import app

    root = typer.main.get_command(app)
    found: dict[str, set[str]] = {}

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{prefix} {name}".strip())
        found[prefix] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}

    walk(root, "")
    return found


def test_every_option_named_in_a_message_exists():
    """Every ``--option`` written in kdctl's source (error hints, warnings) is an option of some command."""
    options = set().union(*_command_options().values())
    src = Path(__file__).resolve().parents[1] / "kdctl"
    named: dict[str, str] = {}
    for f in src.rglob("*.py"):
        for lit in re.findall(r"(?:f?\"[^\"\n]*\"|f?'[^'\n]*')", f.read_text()):
            for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", lit):
                named.setdefault(opt, f.name)
    allowed_elsewhere = {"--nproc-per-node", "--no-index", "--no-deps"}  # torchrun / pip options in text
    missing = {o: where for o, where in named.items() if o not in options and o not in allowed_elsewhere}
    assert not missing, f"messages name options no command has: {missing}"


@pytest.mark.parametrize("args", [
    ["eval", "--model", "fcos-mobilenet-v2", "--data", "{data}", "--split", "test"],
    ["data", "check", "{empty}"],
    ["train", "--model", "fcos-mobilenet-v2", "--data", "{empty}"],
])
def test_hints_name_options_of_the_command_that_prints_them(tmp_path, synth, capsys, args):
    (tmp_path / "empty").mkdir()
    data = tmp_path / "d"
    shutil.copytree(synth, data)
    (data / "test.json").unlink()
    argv = [a.format(data=data, empty=tmp_path / "empty") for a in args]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("error:")
    command = " ".join(a for a in argv[:2] if not a.startswith("-") and a in {"eval", "train", "data", "check"})
    have = _command_options()[command]
    for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", err):
        assert opt in have, f"`kdctl {command}` error names {opt}, which it does not have: {err}"


def test_file_system_errors_are_one_line_and_bugs_are_not_hidden(tmp_path, monkeypatch, capsys):
    import kdctl.commands.data

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/somewhere/x.json")

    monkeypatch.setattr(kdctl.commands.data, "check_data", denied)
    code, _, err = run_cli(["data", "check", str(tmp_path)], capsys)
    assert code == 2 and err == "error: /somewhere/x.json: Permission denied\n"

    def bug(*a, **k):
        raise OSError(5, "Input/output error")  # not the user's file system state: a traceback, for a bug report

    monkeypatch.setattr(kdctl.commands.data, "check_data", bug)
    with pytest.raises(OSError):
        main(["data", "check", str(tmp_path)])
