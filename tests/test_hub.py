"""kdctl push-to-hub against a local fake Hub (threading http.server on 127.0.0.1, random port).

The server implements what huggingface_hub 2.x calls for ``create_repo``, ``create_branch`` and
``upload_folder``: POST /api/repos/create, POST /api/validate-yaml, POST /api/models/{repo}/branch/{rev},
POST /api/models/{repo}/preupload/{rev} (every file "regular": sent base64 in the commit) and
POST /api/models/{repo}/commit/{rev} (ndjson). It keeps the files that arrive; the round trip places them in a
fake huggingface_hub cache snapshot and loads them back as a spec from the repo id, offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from batches import save_tiny_detr  # noqa: E402
from clitools import invoke as run  # noqa: E402

from kdctl.specs import load_detector  # noqa: E402

TOKEN = "hf_kdctlTestSecret0123456789"
NAMES = ["RBC", "WBC", "Platelets"]
METRICS = {"AP": 0.4123, "AP50": 0.7, "AP75": 0.38, "APs": -1.0, "APm": 0.2, "APl": 0.5, "AR100": 0.6}


# --------------------------------------------------------------------------- fake hub
class FakeHub:
    """Records requests and the files committed per (repo, revision); ``fail_commit`` makes the next commit fail (400)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.repos: dict[str, dict] = {}
        self.branches: set[tuple[str, str]] = set()
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.fail_commit = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                code, reply = hub.handle(self.path.split("?")[0], body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            p = json.loads(body)
            repo = f"{p['organization']}/{p['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = p
            return 200, {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")  # ['', 'api', 'models', ns, name, action, rev]
        if len(parts) == 7 and parts[1:3] == ["api", "models"]:
            repo, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                self.branches.add((repo, rev))
                return 200, {}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "commit":
                if self.fail_commit:
                    self.fail_commit = False
                    return 400, {"error": "Bad request: commit rejected"}
                store = self.files.setdefault((repo, rev), {})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return 404, {"error": f"unknown endpoint {path}"}


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    fake = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.server.shutdown()


# --------------------------------------------------------------------------- runs
def tiny_detr_student(directory: Path) -> Path:
    save_tiny_detr(directory / "src", NAMES, widths=(8, 8, 16, 16), num_queries=5)
    return load_detector(str(directory / "src")).save(directory / "m")


def tiny_cnn_student(directory: Path) -> Path:
    det = load_detector("fcos-r18-fpn", label_names=NAMES, pretrained_backbone=False, overrides={"fpn_channels": 32})
    return det.save(directory / "m")


def make_run(root: Path, model_dir: Path, *, teacher: str, student: str, method: str) -> Path:
    """A finished distill run laid out as the trainer writes it (config.toml, best/, last/ + trainer.pt, eval/)."""
    from kdctl.engine.config import RunConfig, write_config
    from kdctl.io import write_json

    run = root / "runs" / "distill" / "exp"
    shutil.copytree(model_dir, run / "best")
    shutil.copytree(model_dir, run / "last")
    torch.save({"distiller": {"adapt.weight": torch.ones(1)}}, run / "last" / "trainer.pt")
    cfg = RunConfig(task="distill", model=student, teacher=teacher, method="auto", data=str(root / "bccd"),
                    epochs=12, batch_size=4, imgsz=320, kd={"weight": 1.0})
    write_config(run / "config.toml", cfg, {"method": method, "lr": 1e-4, "classes": NAMES})
    write_json(run / "eval" / "best.json", {"type": "eval", "step": 30, **METRICS, "per_class": {}})
    return run


@pytest.fixture(scope="module")
def detr_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detr_run")
    return make_run(root, tiny_detr_student(root), teacher="facebook/detr-resnet-50", student="detr-r18",
                    method="kd-detr")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cnn_run")
    return make_run(root, tiny_cnn_student(root), teacher=str(root / "teacher-run"), student="fcos-r18-fpn",
                    method="drkd")




def card_yaml(readme: str) -> dict:
    import yaml

    _, meta, body = readme.split("---", 2)
    return yaml.safe_load(meta)


def fake_snapshot(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay out received files as huggingface_hub's cache does (refs/main -> snapshots/COMMIT)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- tests
def test_push_detr_run_card_files_and_round_trip(hub, detr_run, tmp_path, capsys, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in detr_run.rglob("*") if p.is_file()}
    code, out, err = run(["push-to-hub", "--model", str(detr_run), "--repo-id", "acme/detr-student",
                          "--token", TOKEN, "--private"], capsys)
    assert code == 0, err
    assert hub.repos["acme/detr-student"]["visibility"] == "private"
    files = hub.files[("acme/detr-student", "main")]
    assert set(files) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"}
    commits = [h for m, p, h in hub.requests if "/commit/" in p]
    assert len(commits) == 1 and commits[0]["authorization"] == f"Bearer {TOKEN}"
    # the token is never printed, uploaded or written next to the run
    assert TOKEN not in out + err and all(TOKEN.encode() not in b for b in files.values())
    assert TOKEN.encode() not in all_bytes(detr_run)
    assert {p: p.stat().st_mtime_ns for p in detr_run.rglob("*") if p.is_file()} == before

    readme = files["README.md"].decode()
    meta = card_yaml(readme)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "object-detection"
    assert meta["base_model"] == "facebook/detr-resnet-50" and "datasets" not in meta  # a local folder: unnamed
    assert {"knowledge-distillation", "kd-detr", "object-detection"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"][0]
    values = {m["name"]: m["value"] for m in results["metrics"]}
    assert values["AP"] == 41.23 and values["AP50"] == 70.0 and "APs" not in values  # -1 = undefined: left out
    assert "| student + KD (this model) | 41.2 | 70.0 | 38.0 | - | 20.0 | 50.0 | 60.0 |" in readme
    assert 'pipeline("object-detection", model="acme/detr-student")' in readme and "configured epochs | 12" in readme
    assert "bccd" not in readme and str(detr_run.parent) not in readme

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_snapshot(tmp_path / "cache", "acme/detr-student", files)
    back, ref = load_detector("acme/detr-student"), load_detector(str(detr_run))
    assert back.label_names == NAMES and back.family == "detr"
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in ref.model.state_dict().items())


def test_push_cnn_run_to_a_branch_and_round_trip(hub, cnn_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out, err = run(["push-to-hub", "--model", str(cnn_run), "--repo-id", "acme/fcos-student",
                          "--revision", "v1", "--commit-message", "first student"], capsys)
    assert code == 0, err
    assert ("acme/fcos-student", "v1") in hub.branches
    files = hub.files[("acme/fcos-student", "v1")]
    assert set(files) == {"README.md", "kdctl.json", "model.safetensors"}  # no trainer.pt, no distiller
    assert TOKEN not in out + err
    meta = card_yaml(files["README.md"].decode())
    assert meta["library_name"] == "kdctl" and "drkd" in meta["tags"] and "base_model" not in meta
    from safetensors.torch import load

    assert not any("adapt" in k or "distill" in k for k in load(files["model.safetensors"]))

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_snapshot(tmp_path / "cache", "acme/fcos-student", files)
    back, ref = load_detector("acme/fcos-student"), load_detector(str(cnn_run))
    assert back.architecture == "fcos" and back.label_names == NAMES
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in ref.model.state_dict().items())


def test_failed_upload_is_one_line_and_can_be_retried(hub, cnn_run, capsys):
    hub.fail_commit = True
    code, out, err = run(["push-to-hub", "--model", str(cnn_run), "--repo-id", "acme/retry", "--token", TOKEN],
                         capsys)
    assert code == 2 and err.startswith("error: upload to acme/retry failed") and err.count("\n") == 1
    assert TOKEN not in out + err and "Traceback" not in err
    code, _, err = run(["push-to-hub", "--model", str(cnn_run), "--repo-id", "acme/retry", "--token", TOKEN],
                       capsys)
    assert code == 0, err  # the repo exists now: create_repo(exist_ok=True) passes the 409
    assert "model.safetensors" in hub.files[("acme/retry", "main")]


def test_no_token_is_one_clear_line(hub, cnn_run, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = run(["push-to-hub", "--model", str(cnn_run), "--repo-id", "acme/x"], capsys)
    assert code == 2 and "no Hugging Face token" in err and err.count("\n") == 1
    assert not hub.requests


def test_dry_run_writes_the_upload_locally(hub, detr_run, tmp_path, capsys):
    out_dir = tmp_path / "dry"
    code, out, err = run(["push-to-hub", "--model", str(detr_run), "--repo-id", "acme/dry", "--token", TOKEN,
                          "--dry-run", str(out_dir)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                         "preprocessor_config.json"]
    assert not hub.requests and TOKEN.encode() not in all_bytes(out_dir) and TOKEN not in out
    code, _, err = run(["push-to-hub", "--model", str(detr_run), "--repo-id", "acme/dry", "--dry-run", str(out_dir)],
                       capsys)
    assert code == 2 and "not empty" in err  # never overwritten


def test_push_uploads_the_tensorboard_logs(hub, cnn_run, tmp_path, capsys):
    """The run's TensorBoard events (and its --baseline run's) go to runs/NAME/ and runs/NAME-baseline/, byte for
    byte, which the Hub shows as training metrics."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "exp"
    shutil.copytree(cnn_run, run_dir)
    for d in (run_dir / "tensorboard", run_dir / "baseline" / "tensorboard"):
        with SummaryWriter(log_dir=str(d)) as w:
            w.add_scalar("train/loss", 1.5, 1)
    code, out, err = run(["push-to-hub", "--model", str(run_dir), "--repo-id", "acme/tb", "--token", TOKEN], capsys)
    assert code == 0, err
    files = hub.files[("acme/tb", "main")]
    for src, dest in ((run_dir / "tensorboard", "runs/exp"), (run_dir / "baseline" / "tensorboard", "runs/exp-baseline")):
        (event,) = src.glob("events.out.tfevents*")
        assert files[f"{dest}/{event.name}"] == event.read_bytes()
    assert not any("baseline/" in f and not f.startswith("runs/") for f in files)  # no baseline weights
