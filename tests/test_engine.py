"""The training engine: run directory, exact resume, faults, schedule, method choice, distiller wiring, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdctl._compat import tomllib
from kdctl.cli import main
from kdctl.data.synth import synthesize
from kdctl.distill.base import Distiller, choose_method
from kdctl.engine.checkpoint import load_trainer_state, save_checkpoint
from kdctl.engine.config import RunConfig, lr_lambda, read_config, to_toml
from kdctl.engine.trainer import Trainer, train
from kdctl.errors import KdctlError
from kdctl.models import registry
from kdctl.specs import load_detector


def cfg(tmp_path, model, data, **kw) -> RunConfig:
    base = dict(task="train", model=model, data=str(data), max_steps=4, batch_size=2, imgsz=64, device="cpu",
                workers=0, output=str(tmp_path / "runs"), quiet=True, log_every=1, seed=0)
    base.update(kw)
    return RunConfig(**base)


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / which / "model.safetensors"))


def test_run_directory_is_complete(tmp_path, tiny_retinanet, synth):
    r = train(cfg(tmp_path, tiny_retinanet, synth, name="t", eval_every=1))
    run = r.run_dir
    assert run == tmp_path / "runs" / "train" / "t"
    c, extra = read_config(run / "config.toml")
    assert c.max_steps == 4 and c.imgsz == 64 and c.recipe == "retinanet" and c.optim["optimizer"] == "sgd"
    assert extra["total_steps"] == 4 and extra["classes"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x["type"] == "train"]
    assert [x["step"] for x in train_rows] == [1, 2, 3, 4]
    assert all({"loss", "classification", "bbox_regression", "lr"} <= x.keys() for x in train_rows)
    assert any(x["type"] == "eval" and "AP50" in x and "per_class" in x for x in rows)
    for p in ("last/model.safetensors", "last/kdctl.json", "last/trainer.pt", "best/model.safetensors",
              "results.png", "eval/last.json"):
        assert (run / p).is_file(), p
    st = load_trainer_state(run / "last")
    assert st["step"] == 4 and {"optimizer", "scheduler", "scaler", "rng"} <= st.keys()
    # the checkpoint is a loadable model directory; the run directory itself is a spec
    det = load_detector(str(run))
    assert det.family == "cnn"
    # auto-numbered names never reuse a directory
    r2 = train(cfg(tmp_path, tiny_retinanet, synth, name="t", max_steps=1))
    assert r2.run_dir.name == "t2"


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, tiny_retinanet, synth, capsys):
    # 7 train images, batch 2 -> 4 micro-batches per epoch; 6 steps cross an epoch boundary
    full = train(cfg(tmp_path, tiny_retinanet, synth, name="full", max_steps=6))

    def stop_at_3(trainer: Trainer) -> None:
        if trainer.pos.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path, tiny_retinanet, synth, name="cut", max_steps=6), on_step=stop_at_3).run()
    cut = tmp_path / "runs" / "train" / "cut"
    assert load_trainer_state(cut / "last")["step"] == 3
    assert f"resume with: kdctl train --resume {cut}" in capsys.readouterr().out
    resumed = train(resume=cut)
    assert resumed.steps == 6
    a, b = weights(full.run_dir), weights(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    # the first 3 steps of the cut run must NOT equal the end (the test can fail)
    assert any(not torch.equal(a[k], load_file(str(Path(tiny_retinanet) / "model.safetensors"))[k]) for k in a)
    # the metrics log has each step once
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_cli_with_more_steps(tmp_path, tiny_retinanet, synth, capsys):
    train(cfg(tmp_path, tiny_retinanet, synth, name="c", max_steps=2))
    run = tmp_path / "runs" / "train" / "c"
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(run), "--max-steps", "3", "--quiet"])
    assert e.value.code in (0, None)
    assert load_trainer_state(run / "last")["step"] == 3
    with pytest.raises(SystemExit) as e:  # nothing left to do: a clear line
        main(["train", "--resume", str(run), "--max-steps", "3"])
    assert e.value.code == 2 and "already reached step 3" in capsys.readouterr().err


def test_nonfinite_loss_skips_steps_then_stops(tmp_path, tiny_retinanet, synth, monkeypatch):
    from kdctl.models.cnn import TorchvisionDetector

    real = TorchvisionDetector._forward_train
    calls = {"n": 0}

    def poisoned(self, batch, taps=True):
        out = real(self, batch, taps)
        calls["n"] += 1
        if calls["n"] >= 2:  # every step from the second on is NaN
            out.losses["classification"] = out.losses["classification"] * float("nan")
        return out

    monkeypatch.setattr(TorchvisionDetector, "_forward_train", poisoned)
    start = load_file(str(Path(tiny_retinanet) / "model.safetensors"))
    t = Trainer(cfg(tmp_path, tiny_retinanet, synth, name="nan", max_steps=10))
    with pytest.raises(KdctlError, match="non-finite for 5 steps in a row"):
        t.run()
    # one good step happened, the NaN steps changed nothing
    assert t.pos.step == 5 and t.nonfinite == 5  # raised on the 5th skipped step
    w = t.student.model.state_dict()
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    assert any(not torch.equal(w[k], start[k]) for k in start)


def test_bf16_step_with_a_nonfinite_gradient_is_skipped(tmp_path, tiny_retinanet, synth, monkeypatch):
    """Under bf16 autocast (no GradScaler) a finite loss with a NaN gradient (torch 2.14.1's CPU bf16 convolution
    gives one for a 3x3 stride-2 convolution on a 1x1 map) skips the step instead of writing NaN weights."""
    from kdctl.models.cnn import TorchvisionDetector

    real = TorchvisionDetector._forward_train
    calls = {"n": 0}

    def nan_gradient(self, batch, taps=True):
        out = real(self, batch, taps)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step: loss + 0 * sqrt(0 * w) is the same finite value, its gradient is NaN
            w = next(p for p in self.model.parameters() if p.requires_grad)
            out.losses["classification"] = out.losses["classification"] + 0 * torch.sqrt(0 * w.float().sum())
        return out

    import kdctl.engine.trainer as trainer_module

    checked = []

    def recorded(optimizer):
        out = real_check(optimizer)
        checked.append(bool(out))
        return out

    real_check = trainer_module.grads_finite
    monkeypatch.setattr(TorchvisionDetector, "_forward_train", nan_gradient)
    monkeypatch.setattr(trainer_module, "grads_finite", recorded)
    t = Trainer(cfg(tmp_path, tiny_retinanet, synth, name="bf16", max_steps=3, amp="bf16"))
    r = t.run()
    # step 2 is skipped (the other steps may be too: at 64 px RetinaNet's P7 is the 1x1 map of that torch bug)
    trailing = 3 - max((i + 1 for i, ok in enumerate(checked) if ok), default=0)
    assert len(checked) == r.steps == 3 and checked[1] is False and t.nonfinite == trailing
    w = t.student.model.state_dict()
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, tiny_retinanet, monkeypatch):
    det = load_detector(tiny_retinanet)
    save_checkpoint(tmp_path / "last", det, {"step": 1})
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KdctlError, match="disk full; the previous checkpoint"):  # one line for the user (#13)
        save_checkpoint(tmp_path / "last", det, {"step": 2})
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert load_trainer_state(tmp_path / "last") == {"step": 1}


def test_lr_schedule_warmup_and_steps():
    f = lr_lambda(total_steps=100, warmup_steps=10, warmup_factor=0.001, milestones=[0.5, 0.9], gamma=0.1)
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.5005) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(90) == pytest.approx(0.01)


def test_config_toml_round_trip():
    c = RunConfig(task="distill", model="a", teacher="b", optim={"lr": 0.1, "milestones": [0.5]},
                  kd={"kd-detr": {"cls": 1.0}}, name='we"ird')
    d = tomllib.loads(to_toml(c.to_dict()))
    assert RunConfig.from_dict(d) == c


def test_method_choice(monkeypatch):
    assert choose_method("auto", "cnn", "cnn") == "drkd"
    assert choose_method("auto", "detr", "detr") == "kd-detr"
    assert choose_method("none", "detr", "cnn") == "none"
    assert choose_method("auto", "detr", "cnn") == "pred-kd"  # across families: prediction distillation
    monkeypatch.delitem(registry.METHODS, "pred-kd")  # without a method for any pair, a cross pair is refused
    with pytest.raises(KdctlError, match="DetrForObjectDetection.*retinanet.*supported pairs"):
        choose_method("auto", "detr", "cnn", "DetrForObjectDetection", "retinanet")
    with pytest.raises(KdctlError, match="needs a detr teacher"):
        choose_method("kd-detr", "cnn", "cnn")


def test_unsupported_pair_is_refused_before_loading(tmp_path, synth, capsys):
    cfgjson = {"model_type": "detr", "architectures": ["DetrForObjectDetection"]}
    (tmp_path / "detr").mkdir()
    (tmp_path / "detr" / "config.json").write_text(json.dumps(cfgjson))  # never loaded: refused first
    with pytest.raises(SystemExit) as e:
        main(["distill", "--teacher", str(tmp_path / "detr"), "--student", "retinanet-r18-fpn", "--data", str(synth),
              "--method", "kd-detr", "--device", "cpu", "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs a detr teacher and a detr student" in err and "Traceback" not in err


class _FeatureMSE(Distiller):
    """A minimal method for wiring tests: MSE between adapted student and teacher finest FPN levels."""

    name = "test-mse"

    def __init__(self, teacher, student, weight: float = 1.0) -> None:
        super().__init__(teacher, student, weight=weight)
        self.adapt = torch.nn.Conv2d(student.fpn_channels, teacher.fpn_channels, 1)

    def forward(self, student_out, teacher_taps, batch):
        s = min(student_out.taps["features"])
        return {"kd_mse": self.weights["weight"] * torch.nn.functional.mse_loss(
            self.adapt(student_out.taps["features"][s]), teacher_taps["features"][s])}


def test_distiller_wiring(tmp_path, tiny_retinanet, synth, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "test-mse", ("cnn", "cnn", "test_engine:_FeatureMSE"))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    teacher_before = load_file(str(Path(tiny_retinanet) / "model.safetensors"))
    t = Trainer(cfg(tmp_path, tiny_retinanet, synth, task="distill", teacher=tiny_retinanet, method="test-mse",
                    name="kd", max_steps=3, kd={"test-mse": {"weight": 2.0}}))
    r = t.run()
    assert r.method == "test-mse"
    # the teacher is frozen, in eval mode, and unchanged; the distiller trained and was checkpointed
    assert not t.teacher.training and not any(p.requires_grad for p in t.teacher.parameters())
    tw = t.teacher.model.state_dict()
    assert all(torch.equal(tw[k], teacher_before[k]) for k in teacher_before)
    st = load_trainer_state(r.run_dir / "last")
    assert "adapt.weight" in st["distiller"]
    assert not torch.equal(st["distiller"]["adapt.weight"], _FeatureMSE(t.teacher, t.student).adapt.weight)
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("kd_mse" in x for x in rows if x["type"] == "train")
    # the student checkpoint holds the student only (no distiller or teacher tensors)
    assert not any(k.startswith(("adapt", "teacher")) for k in weights(r.run_dir))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on Linux")
def test_ddp_two_processes_match_one(tmp_path, tiny_retinanet):
    """2 CPU processes (gloo) with 1 image each reach the losses of 1 process with the same global batch of 2.

    The images share one size: with different sizes a batch of 2 is padded to the larger one, and padding changes
    the convolutions at the borders, so the two set-ups would differ legitimately."""
    data = tmp_path / "fixed"
    synthesize(data, 10, seed=3, size=(96, 96))
    common = ["--model", tiny_retinanet, "--data", str(data), "--max-steps", "3", "--batch-size", "2", "--imgsz",
              "64", "--device", "cpu", "--workers", "0", "--log-every", "1", "--quiet", "--output",
              str(tmp_path / "runs"), "--seed", "0", "--eval-every", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "kdctl", "train", *common, "--name", "one"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29533", "-m", "kdctl", "train", *common, "--name", "two"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / "runs" / "train" / name / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in rows if x["type"] == "train"]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True)), (a, b)
    # only rank 0 wrote a run directory
    assert sorted(p.name for p in (tmp_path / "runs" / "train").iterdir()) == ["one", "two"]


def test_offline_pretrained_backbone_warns_and_trains_from_scratch(tmp_path, synth, monkeypatch, capsys):
    import urllib.error

    from torchvision.models import ResNet18_Weights

    def offline(self, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    r = train(cfg(tmp_path, "retinanet-r18-fpn", synth, name="offline", max_steps=1, quiet=False))
    err = capsys.readouterr().err
    assert "could not download the ImageNet weights of resnet18" in err and "from scratch" in err
    c, _ = read_config(r.run_dir / "config.toml")
    assert c.pretrained_backbone is False  # what actually happened is recorded


def test_nan_weights_are_never_saved_as_best(tmp_path, tiny_retinanet, synth):
    t = Trainer(cfg(tmp_path, tiny_retinanet, synth, name="nanbest", max_steps=1))
    t.run()
    best = (t.run_dir / "best" / "model.safetensors").read_bytes()
    t.best_ap = -1.0  # any AP would now count as an improvement...
    with torch.no_grad():
        next(t.student.parameters()).fill_(float("nan"))  # ...but the weights are not finite
    t._evaluate()
    assert (t.run_dir / "best" / "model.safetensors").read_bytes() == best


def test_backbone_weights_from_a_local_file(tmp_path, synth, tiny_retinanet):
    """--backbone-weights loads a local ImageNet state dict into a preset student (no download) and is recorded;
    a model that already has its weights refuses it."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    r = train(cfg(tmp_path, "retinanet-r18-fpn", synth, name="bw", max_steps=1, backbone_weights=str(tmp_path / "resnet18.pth"),
                  optim={"lr": 0.0}))
    w = weights(r.run_dir)
    stem = next(v for k, v in w.items() if k.endswith("body.conv1.weight"))
    assert torch.equal(stem, state["conv1.weight"])  # lr 0: the file's weights, untouched
    c, _ = read_config(r.run_dir / "config.toml")
    assert c.backbone_weights and Path(c.backbone_weights).name == "resnet18.pth"
    with pytest.raises(KdctlError, match="--backbone-weights applies to a model built from a preset"):
        train(cfg(tmp_path, tiny_retinanet, synth, name="bw2", max_steps=1, backbone_weights=str(tmp_path / "resnet18.pth")))


def test_channels_last_is_a_layout_not_a_model_change(tmp_path, tiny_retinanet, synth, monkeypatch):
    """Default: teacher, student and distiller run channels-last; the checkpoint holds the same values as an NCHW
    run's (ordinary contiguous tensors, loadable anywhere); --no-channels-last keeps NCHW and is kept on resume."""
    monkeypatch.setitem(registry.METHODS, "test-mse", ("cnn", "cnn", "test_engine:_FeatureMSE"))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    kw = dict(task="distill", teacher=tiny_retinanet, method="test-mse", max_steps=2, kd={"test-mse": {"weight": 2.0}},
              teacher_amp="off")

    def conv_weights(t: Trainer) -> list[torch.Tensor]:
        mods = [*t.teacher.modules(), *t.student.modules(), *t.distiller.modules()]
        return [m.weight for m in mods if isinstance(m, torch.nn.Conv2d)]

    on = Trainer(cfg(tmp_path, tiny_retinanet, synth, name="nhwc", **kw))
    r_on = on.run()
    assert on.channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(on))
    assert all(not w.is_contiguous() for w in conv_weights(on) if w.shape[-1] > 1)  # 1x1 kernels are both layouts
    off = Trainer(cfg(tmp_path, tiny_retinanet, synth, name="nchw", channels_last=False, **kw))
    r_off = off.run()
    assert not off.channels_last and all(w.is_contiguous() for w in conv_weights(off))
    a, b = weights(r_on.run_dir), weights(r_off.run_dir)
    init = load_file(str(Path(tiny_retinanet) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], init[k], rtol=1e-4, atol=1e-6) for k in a)  # the steps did change weights
    # the CLI flag is recorded and survives --resume
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", tiny_retinanet, "--data", str(synth), "--max-steps", "1", "--batch-size", "2",
              "--imgsz", "64", "--device", "cpu", "--workers", "0", "--output", str(tmp_path / "runs"), "--name",
              "flag", "--no-channels-last", "--quiet"])
    assert e.value.code in (0, None)
    run = tmp_path / "runs" / "train" / "flag"
    assert read_config(run / "config.toml")[0].channels_last is False
    t = Trainer(resume=run, overrides={"max_steps": 2})
    t.setup()
    assert not t.channels_last


def test_teacher_precision(tmp_path, tiny_retinanet, synth, monkeypatch):
    """--teacher-amp: the teacher's forward runs in bf16 while the student's step stays float32; the taps reach the
    distiller as float32 and close to the float32 teacher's (but not equal: the teacher really ran in bf16)."""
    from kdctl.engine.objective import Objective
    from kdctl.engine.precision import native_bf16, teacher_amp_dtype

    assert teacher_amp_dtype("off", "cpu", None) is None
    assert teacher_amp_dtype("bf16", "cpu", None) is torch.bfloat16
    assert teacher_amp_dtype("auto", "cpu", torch.bfloat16) is torch.bfloat16  # follows --amp when set
    assert teacher_amp_dtype("auto", "cpu", None) is (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(KdctlError, match="--teacher-amp fp16 needs a CUDA device"):
        teacher_amp_dtype("fp16", "cpu", None)

    monkeypatch.setitem(registry.METHODS, "test-mse", ("cnn", "cnn", "test_engine:_FeatureMSE"))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    t = Trainer(cfg(tmp_path, tiny_retinanet, synth, task="distill", teacher=tiny_retinanet, method="test-mse",
                    name="bf16", max_steps=1, teacher_amp="bf16"))
    r = t.run()
    assert t.teacher_amp is torch.bfloat16 and t.amp is None
    assert read_config(r.run_dir / "config.toml")[1]["teacher_amp"] == "bfloat16"
    batch = next(iter(t.loader))
    taps16 = t.objective.teacher_taps(batch)
    taps32 = Objective(t.student, t.distiller, teacher_amp=None).teacher_taps(batch)
    for s in taps32["features"]:
        a, b = taps16["features"][s], taps32["features"][s]
        assert a.dtype == torch.float32
        err = ((a - b).norm() / b.norm()).item()
        assert 0 < err < 0.05, (s, err)


def test_distillation_starts_from_the_baseline_student(tmp_path, synth, tiny_retinanet):
    """Same --seed, preset student: `distill` builds the very student `train` builds (the teacher, loaded first,
    does not shift the random init), so a KD gain is measured against the same starting point."""
    kw = dict(max_steps=1, pretrained_backbone=False)
    base = Trainer(cfg(tmp_path, "retinanet-r18-fpn", synth, name="b", **kw))
    base.setup()
    kd = Trainer(cfg(tmp_path, "retinanet-r18-fpn", synth, name="k", task="distill", teacher=tiny_retinanet, **kw))
    kd.setup()
    other = Trainer(cfg(tmp_path, "retinanet-r18-fpn", synth, name="o", seed=1, **kw))
    other.setup()
    a, b, c = (t.student.model.state_dict() for t in (base, kd, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed: another init (the check can fail)
