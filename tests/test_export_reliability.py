"""Issue #13, export / hub: what plain transformers computes from an export, ONNX parity of CNN detections, the
model card's facts, file modes, and unwritable output folders.

Models are built from the presets without ImageNet weights (nothing is downloaded) and run on tiny inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import errno  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from clitools import invoke as run  # noqa: E402

from kdctl.export import export_model  # noqa: E402
from kdctl.specs import list_presets, load_detector, read_preset  # noqa: E402

NAMES = ["RBC", "WBC", "Platelets"]
TOL = 1e-4  # fp32 max abs diff of raw DETR outputs between two implementations of the same network
DETR_PRESETS = sorted(n for n in list_presets("models") if read_preset(n).get("family") == "detr")
MOBILENET_DETRS = [n for n in DETR_PRESETS if "mobilenet" in n]




def preset_dir(preset: str, directory: Path) -> Path:
    """A preset built from scratch (trainable backbone norms, as ``--no-pretrained-backbone`` trains it), its
    norm statistics moved away from the identity so that the activations matter, saved as kdctl saves runs."""
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, buf in det.model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return det.save(directory)


def pixels(n: int = 2, h: int = 64, w: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, h, w, dtype=torch.long)
    mask[-1, :, w - w // 4:] = 0
    return {"pixel_values": torch.randn((n, 3, h, w), generator=g) * mask[:, None], "pixel_mask": mask}


def max_diff(a, b) -> float:
    """Max abs difference of the raw outputs. RT-DETR picks its queries by a top-k over encoder scores, which tie
    in randomly initialised models (equal scores at different anchors): a last-bit difference then swaps whole
    queries. For it, compare everything up to that choice: the encoder memory, the scores and boxes of every
    position, and the top-k scores (equal whatever the tie-break)."""
    if getattr(a, "enc_outputs_class", None) is not None:
        pairs = [(a.enc_outputs_class, b.enc_outputs_class), (a.enc_outputs_coord_logits, b.enc_outputs_coord_logits)]
        if getattr(a, "encoder_last_hidden_state", None) is not None:  # RT-DETR, D-FINE
            pairs += [(u, v) for u, v in zip(a.encoder_last_hidden_state, b.encoder_last_hidden_state, strict=True)]
            pairs += [(a.enc_topk_logits.amax(-1), b.enc_topk_logits.amax(-1))]  # the top-k scores: a near-tie
            # swap of two positions swaps their class rows, not the sorted scores
        else:  # LW-DETR / RF-DETR: the final outputs themselves
            pairs += [(a.logits, b.logits), (a.pred_boxes, b.pred_boxes)]
        return max(float((u - v).abs().max()) for u, v in pairs)
    return max(float((a.logits - b.logits).abs().max()), float((a.pred_boxes - b.pred_boxes).abs().max()))


# --------------------------------------------------------------------------- 1. hf export = kdctl's network
@pytest.mark.parametrize("preset", DETR_PRESETS)
def test_hf_export_of_every_detr_preset_computes_kdctls_network_in_plain_transformers(preset, tmp_path):
    from transformers import AutoModelForObjectDetection

    src = preset_dir(preset, tmp_path / "m")
    export_model(str(src), "hf", tmp_path / "hf")
    ours = load_detector(str(src)).eval()
    theirs = AutoModelForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    # RT-DETR / D-FINE / LW-DETR pick their queries among the encoder's positions: the input must have more of them
    # than queries (and LW-DETR's windowed ViT needs a multiple of patch x windows)
    v, m = ours.variant, ours.variant.input_multiple(ours.model)
    side = -(-max(160, v.min_input_side(ours.model)) // m) * m
    x = pixels(h=side, w=side) if v.min_input_side(ours.model) > 1 else pixels()
    with torch.no_grad():
        assert max_diff(ours.model(**x), theirs(**x)) < TOL
        # kdctl loads the export back as the same network, without hooking the activations a second time
        back = load_detector(str(tmp_path / "hf")).eval()
        assert max_diff(ours.model(**x), back.model(**x)) < TOL
    assert not any(getattr(m, "_kdctl_activation", False) for m in back.model.modules())


def test_hf_export_of_a_mobilenet_detr_run_through_the_cli_and_the_pipeline(tmp_path, capsys):
    from PIL import Image
    from transformers import pipeline

    src = preset_dir("detr-mobilenet-v2-small", tmp_path / "m")
    code, out, err = run(["export", "--model", str(src), "--format", "hf", "--output", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert "freeze_batch_norm_2d" in out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["backbone_config"]["freeze_batch_norm_2d"] is True
    image = Image.new("RGB", (80, 64), (120, 30, 200))
    theirs = pipeline("object-detection", model=str(tmp_path / "hf"), threshold=0.0)(image)
    ours = load_detector(str(src)).predict_images([image], score_threshold=0.0)[0]
    top = max(theirs, key=lambda d: d["score"])
    assert abs(top["score"] - ours["scores"][0]) < TOL


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_safetensors_and_onnx_exports_of_a_mobilenet_detr_compute_kdctls_network(fmt, tmp_path):
    from kdctl.export import run_onnx

    src = preset_dir("dab-detr-mobilenet-v2-small", tmp_path / "m")
    export_model(str(src), fmt, tmp_path / fmt, imgsz=64)
    ours = load_detector(str(src)).eval()
    x = pixels()
    with torch.no_grad():
        ref = ours.model(**x)
    if fmt == "onnx":
        logits, boxes = run_onnx(tmp_path / fmt / "model.onnx", x)
        diff = max(float((torch.from_numpy(logits) - ref.logits).abs().max()),
                   float((torch.from_numpy(boxes) - ref.pred_boxes).abs().max()))
    else:
        with torch.no_grad():
            diff = max_diff(ref, load_detector(str(tmp_path / fmt)).eval().model(**x))
    assert diff < TOL


# --------------------------------------------------------------------------- 2. ONNX parity of CNN detections
def test_detection_matching_pairs_tied_detections_whatever_their_order():
    from kdctl.export import CNN_BOX_RTOL, CNN_SCORE_TOLERANCE, match_detections

    g = torch.Generator().manual_seed(0)
    n = 40
    boxes = torch.rand((n, 4), generator=g) * 300
    boxes[:, 2:] += boxes[:, :2]
    # an untrained model: scores tied to 1e-6, around a 4th-decimal rounding boundary (the old comparison sorted
    # by scores rounded to 4 decimals, paired other detections and reported a 333 px box difference here)
    scores = (0.25005 + (torch.arange(n) % 4 - 1.5) * 1e-6).float()
    labels = torch.arange(n) % 3
    order = torch.randperm(n, generator=g)  # the other runtime lists tied detections in another order
    got = [(boxes[order] + 1e-3).numpy(), (scores[order] + 2e-6).numpy(), labels[order].numpy()]
    rep = match_detections(got, (boxes, scores, labels), box_tolerance=CNN_BOX_RTOL * 320)
    assert rep["matched"] == n and rep["unmatched"] == 0 and "warning" not in rep
    assert rep["max_abs_diff"]["boxes"] < 2e-3 and rep["max_abs_diff"]["scores"] <= CNN_SCORE_TOLERANCE
    assert "matched one to one" in rep["compared"]
    moved = got[0].copy()
    moved[0] += 50.0  # a real difference is reported, with a warning, not hidden
    rep = match_detections([moved, got[1], got[2]], (boxes, scores, labels), box_tolerance=CNN_BOX_RTOL * 320)
    assert rep["unmatched"] == 2 and "warning" in rep


def test_onnx_parity_of_an_untrained_fasterrcnn_says_what_it_compared(tmp_path, capsys):
    """20 classes at 320 px: tied scores made the old canonical-order comparison report 248 px box differences."""
    box_rtol = 1e-4  # kdctl.export.CNN_BOX_RTOL: fp32 box coordinates relative to the image side
    torch.manual_seed(0)
    src = load_detector("fasterrcnn-r18-fpn", label_names=[f"c{i}" for i in range(20)], pretrained_backbone=False)
    src.save(tmp_path / "m")
    code, out, err = run(["export", "--model", str(tmp_path / "m"), "--format", "onnx", "--output",
                          str(tmp_path / "o"), "--imgsz", "320"], capsys)
    assert code == 0, err
    parity = json.loads((tmp_path / "o" / "model.onnx.json").read_text())["parity"]
    assert parity["max_abs_diff"]["boxes"] <= box_rtol * 320 and parity.get("matched", 0) > 0
    assert parity.get("compared", "?").startswith("detections scoring >=") and parity["compared"] in out


# --------------------------------------------------------------------------- 3. model card
def fake_run(root: Path, *, teacher: str, data: str, steps: int) -> Path:
    from kdctl.engine.config import RunConfig, write_config

    src = root / "src"
    preset_dir("detr-mobilenet-v2-small", src)
    run_dir = root / "runs" / "distill" / "exp"
    shutil.copytree(src, run_dir / "best")
    cfg = RunConfig(task="distill", model="detr-mobilenet-v2-small", teacher=teacher, method="auto", data=data,
                    epochs=12, batch_size=4, imgsz=320)
    write_config(run_dir / "config.toml", cfg, {"method": "kd-detr", "steps_per_epoch": 4,
                                                "teacher": "DetrForObjectDetection", "classes": NAMES})
    rows = [{"type": "train", "step": s, "epoch": 1 + (s - 1) // 4, "loss": 1.0} for s in range(1, steps + 1)]
    rows.append({"type": "eval", "step": steps, "epoch": 2, "AP": 0.1, "AP50": 0.2})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "best.json").write_text(json.dumps({"type": "eval", "step": steps, "AP": 0.1, "AP50": 0.2}))
    return run_dir


def card_of(run_dir: Path) -> tuple[dict, str]:
    import yaml

    from kdctl.card import build_card, read_run

    card = str(build_card(read_run(run_dir), "acme/student", "detr", "DetrForObjectDetection", NAMES))
    _, meta, body = card.split("---", 2)
    return yaml.safe_load(meta), body


def test_card_states_the_steps_run_and_never_local_paths(tmp_path):
    teacher = tmp_path / "teachers" / "my-teacher"
    teacher.mkdir(parents=True)
    data = tmp_path / "secret-data-folder"
    data.mkdir()
    run_dir = fake_run(tmp_path, teacher=str(teacher), data=str(data), steps=6)
    meta, body = card_of(run_dir)
    assert "trained for 6 optimiser steps (1.5 epochs)" in body and "| steps run | 6 |" in body
    assert "| configured epochs | 12 |" in body and "| epochs | 12 |" not in body
    assert str(tmp_path) not in body + json.dumps(meta) and "secret-data-folder" not in body + json.dumps(meta)
    assert "my-teacher" not in body and "a local DetrForObjectDetection checkpoint" in body
    assert "base_model" not in meta and "datasets" not in meta


def test_card_names_hub_teachers_and_hub_datasets(tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--detr-teacher" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    run_dir = fake_run(tmp_path, teacher=str(snapshot), data="acme/blood-cells", steps=3)
    meta, body = card_of(run_dir)
    assert meta["base_model"] == "acme/detr-teacher" and "`acme/detr-teacher`" in body
    assert meta["datasets"] == ["acme/blood-cells"] and "acme/blood-cells validation split" in body
    assert str(tmp_path) not in body


# --------------------------------------------------------------------------- 4. file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("preset", ["detr-mobilenet-v2-small", "fcos-mobilenet-v2-0.5"])
def test_saved_weights_follow_the_umask(preset, umask, tmp_path):
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False)
    old = os.umask(umask)
    try:
        det.save(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes
    assert len(set(modes.values())) == 1, modes


# --------------------------------------------------------------------------- 5. unwritable outputs
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return load_detector("fcos-mobilenet-v2-0.5", label_names=NAMES, pretrained_backbone=False).save(
        tmp_path_factory.mktemp("small") / "m")


def one_error_line(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("command", ["export", "push-to-hub"])
def test_output_under_a_file_is_one_line(command, small_model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "x"
    opt = ["--output", str(target)] if command == "export" else ["--repo-id", "a/b", "--dry-run", str(target)]
    code, _, err = run([command, "--model", str(small_model), *opt], capsys)
    one_error_line(code, err, str(target), "is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["export", "push-to-hub"])
def test_a_write_failure_is_one_line_and_leaves_nothing(command, small_model, tmp_path, capsys, monkeypatch):
    from kdctl.models.cnn import TorchvisionDetector

    def read_only(self, directory):
        Path(directory, "kdctl.json").write_text("{}")  # a partial write, then the file system refuses
        raise OSError(errno.EROFS, "Read-only file system", str(Path(directory, "model.safetensors")))

    monkeypatch.setattr(TorchvisionDetector, "save", read_only)
    target = tmp_path / "new" / "out"
    opt = ["--output", str(target)] if command == "export" else ["--repo-id", "a/b", "--dry-run", str(target)]
    code, _, err = run([command, "--model", str(small_model), *opt], capsys)
    one_error_line(code, err, "model.safetensors", "Read-only file system")
    assert not (tmp_path / "new").exists()
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    code, _, err = run([command, "--model", str(small_model), *opt, "--force"], capsys)
    one_error_line(code, err, "Read-only file system")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]  # only what this run added is removed


def test_push_dry_run_hints_and_takes_force(small_model, tmp_path, capsys):
    out = tmp_path / "dry"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["push-to-hub", "--model", str(small_model), "--repo-id", "acme/x", "--dry-run", str(out)]
    code, _, err = run(base, capsys)
    one_error_line(code, err, "--dry-run", "not empty", "--force")
    code, _, err = run([*base, "--force"], capsys)
    assert code == 0, err
    assert {"keep.txt", "README.md", "model.safetensors"} <= {p.name for p in out.iterdir()}
    code, _, err = run(["push-to-hub", "--model", str(small_model), "--repo-id", "acme/x", "--force"], capsys)
    one_error_line(code, err, "--force", "--dry-run")
