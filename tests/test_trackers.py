"""--report-to: tracker names, the scalars of a metrics row, failing trackers, W&B and MLflow through fake modules
(and their real offline / file-store modes when installed), TensorBoard events of a real run."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
from clitools import invoke

from kdctl.engine import trackers as T
from kdctl.errors import KdctlError


def test_report_to_names(monkeypatch):
    monkeypatch.setattr(T, "installed", lambda name: name in ("tensorboard", "mlflow"))
    assert T.parse_report_to(None) == ["tensorboard"]  # the default: TensorBoard when installed
    assert T.parse_report_to("none") == [] and T.parse_report_to(" None ") == []
    assert T.parse_report_to("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    assert T.parse_report_to("all") == ["tensorboard", "mlflow"]  # every installed one
    monkeypatch.setattr(T, "installed", lambda name: False)
    assert T.parse_report_to(None) == []
    with pytest.raises(KdctlError, match=r"--report-to comet: unknown tracker; use tensorboard, wandb, mlflow"):
        T.parse_report_to("tensorboard,comet")
    with pytest.raises(KdctlError, match="'none' cannot be combined"):
        T.parse_report_to("none,wandb")


def test_row_scalars():
    train = {"type": "train", "step": 4, "epoch": 1, "lr": 0.01, "time_per_step": 0.5, "loss": 2.5, "loss_ce": 1.0,
             "kd_cls": 0.25}
    assert T.row_scalars(train) == {"train/epoch": 1.0, "train/lr": 0.01, "train/time_per_step": 0.5,
                                    "train/loss": 2.5, "train/loss_ce": 1.0, "train/kd_cls": 0.25}
    ev = {"type": "eval", "step": 4, "AP": 0.5, "APs": -1.0, "per_class": {"cat": 0.4, "dog": -1.0},
          "eval_seconds": 1.5}
    assert T.row_scalars(ev) == {"val/AP": 0.5, "val/eval_seconds": 1.5, "val_per_class/cat": 0.4}


class Recorder(T.Tracker):
    def __init__(self, name: str, fail_on: str = "") -> None:
        self.name, self.fail_on, self.calls = name, fail_on, []

    def scalars(self, values, step):
        if self.fail_on == "scalars":
            raise RuntimeError("disk full\nsecond line")
        self.calls.append(("scalars", dict(values), step))

    def images(self, images, step):
        self.calls.append(("images", sorted(images), step))

    def close(self):
        self.calls.append(("close",))


def test_a_failing_tracker_is_one_warning_and_is_dropped():
    warnings: list[str] = []
    good, bad = Recorder("good"), Recorder("bad", fail_on="scalars")
    ts = T.Trackers([bad, good], warnings.append)
    ts.log_row({"type": "train", "step": 1, "loss": 1.0})
    ts.log_row({"type": "train", "step": 2, "loss": 0.5})
    ts.log_images({"results": object()}, 2)
    ts.log_images(lambda: 1 / 0, 3)  # images that cannot be made: a warning, nothing logged
    ts.close()
    assert warnings == ["--report-to bad: RuntimeError: disk full; no more logging to it in this run",
                        "--report-to: the evaluation images could not be made (ZeroDivisionError: division by "
                        "zero); skipped"]
    assert good.calls == [("scalars", {"train/loss": 1.0}, 1), ("scalars", {"train/loss": 0.5}, 2),
                          ("images", ["results"], 2), ("close",)]
    assert bad.calls == []


def test_a_tracker_that_fails_to_start_is_one_warning(tmp_path, monkeypatch):
    class Broken(T.Tracker):
        def __init__(self, *a):
            raise ConnectionError("no network")

    monkeypatch.setitem(T.KINDS, "wandb", Broken)
    monkeypatch.setitem(sys.modules, "wandb", None)  # and mlflow is "not installed"
    warnings: list[str] = []
    ts = T.open_trackers("wandb,mlflow", tmp_path, {}, warnings.append)
    assert not ts and len(warnings) == 2
    assert warnings[0] == ("--report-to wandb: could not start (ConnectionError: no network); training goes on "
                           "without it")
    assert warnings[1].startswith("--report-to mlflow: could not start (")


# --------------------------------------------------------------------------- W&B and MLflow, faked
def fake_wandb(log: list) -> types.ModuleType:
    m = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            log.append(("log", values, step))

        def finish(self):
            log.append(("finish",))

    def init(**kw):
        log.append(("init", kw))
        return Run()

    m.init, m.Settings, m.Image = init, lambda **kw: kw, lambda arr: ("Image", arr.shape)
    return m


def test_wandb_through_its_api(tmp_path, monkeypatch):
    import numpy as np

    log: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(log))
    monkeypatch.setenv("WANDB_PROJECT", "cells")
    run = tmp_path / "runs" / "distill" / "kd"
    ts = T.open_trackers("wandb", run, {"lr": 0.1}, pytest.fail)
    ts.log_row({"type": "train", "step": 3, "loss": 1.5})
    ts.log_images({"results": np.zeros((4, 5, 3), np.uint8)}, 3)
    ts.close()
    kw = log[0][1]
    assert kw["project"] == "cells" and kw["name"] == "kd" and kw["dir"] == str(run) and kw["config"] == {"lr": 0.1}
    # the id is a function of the run directory: a resumed run continues the same W&B run
    assert kw["resume"] == "allow" and kw["id"] == hashlib.sha1(str(run.absolute()).encode()).hexdigest()[:16]
    assert log[1:] == [("log", {"train/loss": 1.5}, 3), ("log", {"results": ("Image", (4, 5, 3))}, 3), ("finish",)]


def fake_mlflow(store: dict) -> dict[str, types.ModuleType]:
    root, tracking, entities = (types.ModuleType(n) for n in ("mlflow", "mlflow.tracking", "mlflow.entities"))

    class Client:
        def __init__(self, tracking_uri):
            store["uri"] = tracking_uri

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            store["experiment"] = name
            return "7"

        def create_run(self, exp_id, run_name, tags):
            store["run"] = (exp_id, run_name, tags)
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics=(), params=()):
            store.setdefault("metrics", []).extend(metrics)
            store.setdefault("params", []).extend(params)

        def log_image(self, run_id, image, key, step):
            store.setdefault("images", []).append((key, image.shape, step))

        def set_terminated(self, run_id):
            store["terminated"] = run_id

    tracking.MlflowClient = Client
    entities.Param = lambda k, v: (k, v)
    entities.Metric = lambda k, v, ts, step: (k, v, step)
    return {"mlflow": root, "mlflow.tracking": tracking, "mlflow.entities": entities}


def test_mlflow_through_its_api(tmp_path, monkeypatch):
    import numpy as np

    store: dict = {}
    for name, mod in fake_mlflow(store).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "runs" / "train" / "exp"
    config = {"output": str(tmp_path / "runs"), "lr": 0.1, "name": None, "kd": {}}
    ts = T.open_trackers("mlflow", run, config, pytest.fail)
    ts.log_row({"type": "eval", "step": 5, "AP": 0.25, "APs": -1.0})
    ts.log_images({"predictions/img1": np.zeros((2, 3, 3), np.uint8)}, 5)
    ts.close()
    assert store["uri"] == (tmp_path / "runs" / "mlruns").as_uri()  # a local file store beside the runs
    assert store["experiment"] == "kdctl" and store["run"] == ("7", "exp", {"kdctl.run_dir": str(run)})
    assert store["params"] == [("output", str(tmp_path / "runs")), ("lr", "0.1")]  # empty values left out
    assert store["metrics"] == [("val/AP", 0.25, 5)]
    assert store["images"] == [("predictions_img1", (2, 3, 3), 5)] and store["terminated"] == "r1"


# --------------------------------------------------------------------------- the real libraries, when installed
def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import numpy as np

    ts = T.open_trackers("wandb", tmp_path / "run", {"lr": 0.1}, pytest.fail)  # any warning fails the test
    ts.log_row({"type": "train", "step": 1, "loss": 1.5})
    ts.log_images({"predictions/a": np.zeros((8, 8, 3), np.uint8)}, 1)
    ts.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import numpy as np

    ts = T.open_trackers("mlflow", tmp_path / "runs" / "train" / "exp", {"output": str(tmp_path / "runs")},
                         pytest.fail)  # any warning fails the test
    ts.log_row({"type": "train", "step": 2, "loss": 1.5})
    ts.log_images({"predictions/a": np.zeros((8, 8, 3), np.uint8)}, 2)
    ts.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=T.mlruns_uri(tmp_path / "runs"))
    run = client.search_runs([client.get_experiment_by_name("kdctl").experiment_id])[0]
    assert run.data.metrics == {"train/loss": 1.5} and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2]


# --------------------------------------------------------------------------- a real run
def test_train_writes_tensorboard_events(tmp_path, tiny_retinanet, synth, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, err = invoke(["train", "--model", tiny_retinanet, "--data", str(synth), "--max-steps", "2",
                             "--batch-size", "2", "--imgsz", "64", "--device", "cpu", "--workers", "0",
                             "--log-every", "1", "--output", str(tmp_path / "runs"), "--name", "tb", "--quiet",
                             "--report-to", "tensorboard"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "train" / "tb"
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    for key in ("loss", "lr", *[k for k in train_rows[0] if k.startswith("loss_")]):
        logged = [(e.step, e.value) for e in ea.Scalars(f"train/{key}")]
        assert [s for s, _ in logged] == [r["step"] for r in train_rows]
        assert all(abs(v - r[key]) <= 1e-6 * max(1.0, abs(r[key])) for (_, v), r in zip(logged, train_rows, strict=True))
    ev = [r for r in rows if r["type"] == "eval"][-1]
    assert ea.Scalars("val/AP")[-1].value == pytest.approx(ev["AP"], abs=1e-7)
    images = ea.Tags()["images"]
    n_val = len(json.loads((synth / "val.json").read_text())["images"])
    assert "results" in images and sum(t.startswith("predictions/") for t in images) == min(4, n_val)


def test_unknown_tracker_is_one_line_exit_2(tmp_path, synth, capsys):
    code, out, err = invoke(["train", "--model", "retinanet-r18-fpn", "--data", str(synth), "--report-to", "comet",
                             "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and err.startswith("error: --report-to comet: unknown tracker") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_tracker_that_fails_to_start_does_not_fail_the_run(tmp_path, tiny_retinanet, synth, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    code, out, err = invoke(["train", "--model", tiny_retinanet, "--data", str(synth), "--max-steps", "1",
                             "--batch-size", "2", "--imgsz", "64", "--device", "cpu", "--workers", "0", "--quiet",
                             "--output", str(tmp_path / "runs"), "--report-to", "wandb"], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "warning: --report-to wandb: could not start (the wandb package is not installed (pip install wandb)); "
        "training goes on without it"]
    assert (Path(tmp_path / "runs" / "train" / "exp" / "last" / "model.safetensors")).is_file()
