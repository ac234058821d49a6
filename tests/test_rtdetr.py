"""RT-DETR and RT-DETRv2 (kdctl/models/detr/rt_detr.py): decoding parity in train and eval mode, transformers' own
loss, the square input and box mapping, do_normalize = False, KD-DETR on image-dependent queries, ONNX and the
transformers directory. Tiny random models built from configs; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from batches import (  # noqa: E402
    assert_final_layer_is_output,
    assert_onnx_dynamic_batch,
    decode_own_queries,
    padded_batch,
    save_tiny,
)

from kdctl.data.batch import Batch  # noqa: E402
from kdctl.distill.kd_detr import KDDETR  # noqa: E402
from kdctl.models.detr.rt_detr import sample_memory  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["a", "b", "c"]
ARCHS = ["rt_detr", "rt_detr_v2"]


def build(arch: str, out: Path, d: int = 16, layers: int = 2, seed: int = 0, rich: bool = False, **extra) -> str:
    """A tiny model; ``rich``: weights redrawn with unit-gain fan-in scaling, so that its features (and encoder
    scores) vary over the image instead of vanishing into ties as with transformers' small init."""
    import transformers as T

    torch.manual_seed(seed)
    bb = T.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cls, model = ((T.RTDetrConfig, T.RTDetrForObjectDetection) if arch == "rt_detr"
                  else (T.RTDetrV2Config, T.RTDetrV2ForObjectDetection))
    labels = dict(enumerate(NAMES))
    cfg = cls(backbone_config=bb, encoder_in_channels=[16, 32, 64], encoder_hidden_dim=d, d_model=d,
              decoder_in_channels=[d, d, d], encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, encoder_attention_heads=2,
              decoder_attention_heads=2, decoder_layers=layers, num_queries=10, num_denoising=4,
              use_pretrained_backbone=False, id2label=labels, label2id={n: i for i, n in labels.items()}, **extra)
    return save_tiny(model(cfg), out, rich)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rtdetr")
    out = {a: build(a, root / a) for a in ARCHS}
    out["rt_detr-b"] = build("rt_detr", root / "b", d=32, layers=3, seed=1)
    out["rt_detr-4lvl"] = build("rt_detr", root / "l4", seed=2, num_feature_levels=4)
    out["rt_detr-1"] = build("rt_detr", root / "one", seed=3, layers=1)
    out["rt_detr_v2-rich"] = build("rt_detr_v2", root / "rich", seed=4, rich=True)
    return out


batch = padded_batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False])
def test_decode_parity(dirs, arch, train):
    """Decoding the model's own queries (its proposals, content at its top-k memory positions) reproduces every
    decoder layer of its forward; in training the denoising queries are not in the taps."""
    det = load_detector(dirs[arch])
    taps, dec = decode_own_queries(det, train)
    assert det.query_kind == "proposal" and taps["queries"].shape == (2, 10, 4)
    assert taps["logits"].shape == (2, 2, 10, 3) and dec["logits"].shape == (2, 2, 10, 3)
    assert float((dec["logits"] - taps["logits"]).abs().max()) < 1e-5
    assert float((dec["boxes"] - taps["boxes"]).abs().max()) < 1e-5
    if train:  # the recorded pass had 2 x num_denoising... denoising queries in front of the 10
        assert taps["decoder_kwargs"]["inputs_embeds"].shape[1] > 10
    assert_final_layer_is_output(det, batch())


@pytest.mark.parametrize("arch", ARCHS)
def test_logged_total_is_transformers_loss(dirs, arch):
    """kdctl's loss terms sum to transformers' own (already weighted) outputs.loss on the same batch: no
    re-weighting (bbox_loss_coefficient 5 applied again would give a different total), no dropped term."""
    det = load_detector(dirs[arch])
    det.train()
    b = batch()
    torch.manual_seed(3)  # the denoising groups are random: same seed for both passes
    losses = det.forward_train(b).losses
    torch.manual_seed(3)
    ref = det.model(*det.pixel_inputs(b), labels=det.hf_labels(b))
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou"}
    total = sum(losses.values())
    assert abs(float(total) - float(ref.loss)) <= 1e-5 * float(ref.loss)
    assert any("_dn_" in k for k in ref.loss_dict) and any("_aux_" in k for k in ref.loss_dict)


def test_square_input_and_box_mapping(dirs):
    """The model sees the batch padded to a square (it ignores the pixel mask); training boxes are normalised by
    the square and predicted boxes map back through it to original pixels."""
    det = load_detector(dirs["rt_detr"])
    b = Batch(images=torch.rand(1, 3, 64, 128), sizes=[(60, 128)], orig_sizes=[(120, 256)],
              targets=[{"boxes": torch.tensor([[32.0, 16, 96, 48]]), "labels": torch.tensor([1])}])
    pv, mask = det.pixel_inputs(b)
    assert pv.shape == (1, 3, 128, 128) and int(mask.sum()) == 60 * 128
    assert torch.equal(pv[0, :, :60], b.images[0, :, :60]) and float(pv[0, :, 60:].abs().max()) == 0  # as is
    assert torch.allclose(det.hf_labels(b)[0]["boxes"], torch.tensor([[0.5, 0.25, 0.5, 0.25]]))
    with torch.no_grad():
        out = det.model(pixel_values=pv)
        dets = det.predict(b, score_threshold=0.0, max_detections=300)[0]
    prob = out.logits[0].sigmoid()
    q, c = divmod(int(prob.flatten().argmax()), prob.shape[-1])
    cx, cy, w, h = out.pred_boxes[0, q].tolist()
    expect = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * 128 * 2  # square 128, scale 1/2
    expect[0::2], expect[1::2] = expect[0::2].clamp(0, 256), expect[1::2].clamp(0, 120)
    assert int(dets["labels"][0]) == c and torch.allclose(dets["boxes"][0], expect, atol=1e-3)


def test_do_normalize_false_and_save(dirs, tmp_path):
    """A processor with do_normalize = False means pixels as they are, whatever image_mean it stores; kdctl saves
    the RT-DETR processor (square size, do_normalize false) and loads it back."""
    src = Path(dirs["rt_detr"])
    local = tmp_path / "m"
    local.mkdir()
    for f in src.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    (local / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "RTDetrImageProcessor", "do_normalize": False, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "size": {"height": 320, "width": 320}}))
    det = load_detector(str(local))
    assert det.image_mean == (0.0, 0.0, 0.0) and det.image_std == (1.0, 1.0, 1.0) and det.imgsz == 320
    det.save(tmp_path / "out")
    proc = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert proc["do_normalize"] is False and proc["size"] == {"height": 320, "width": 320}
    assert load_detector(str(tmp_path / "out")).image_mean == (0.0, 0.0, 0.0)


def test_sample_memory_levels_and_centres():
    """Bilinear sampling reads the level whose anchor size (0.05 * 2^l) matches the box, at the box centre
    (cell centres at (i + 0.5) / w, transformers' anchors)."""
    layout = ((8, 8), (4, 4), (2, 2))
    mem = torch.cat([torch.arange(h * w, dtype=torch.float32) + 100 * lvl for lvl, (h, w) in enumerate(layout)])
    mem = mem.view(1, -1, 1).repeat(1, 1, 2)
    box = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 4, 0.1, 0.08], [(5 + 0.5) / 8, (3 + 0.5) / 8, 0.05, 0.04]]])
    got = sample_memory(mem, layout, torch.logit(box))
    assert got.shape == (1, 2, 2)
    assert got[0, :, 0].tolist() == pytest.approx([100 + 1 * 4 + 2, 3 * 8 + 5])


def kd_step(teacher, student, b, **opts):
    kd = KDDETR(teacher, student, num_general=7, **opts)
    with torch.no_grad():
        t = kd.teacher_taps(b)
    out = student.forward_train(b)
    return kd, t, out, kd(out, t, b)


def test_kd_zero_for_identical_weights_and_no_teacher_gradient(dirs):
    """One decoder layer (every student layer is compared with the teacher's final one), same weights twice."""
    teacher, student = load_detector(dirs["rt_detr-1"]), load_detector(dirs["rt_detr-1"])
    teacher.eval()
    student.eval()  # BatchNorm statistics as the teacher's; the taps leave the denoising queries out anyway
    b = batch()
    kd, t, out, terms = kd_step(teacher, student, b)
    assert kd.memory_index(t, out.taps)["specific"] is t["query_index"]  # same layout: same memory positions
    assert t["general_logits"].shape == (2, 7, 3)
    for v in terms.values():
        assert float(v) == pytest.approx(0.0, abs=1e-5)
    student.train()
    _, _, _, terms = kd_step(teacher, student, b)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


def test_kd_layouts_differ_bilinear(dirs):
    """Teacher with 3 memory levels, student with 4: the specific points' content is sampled bilinearly from the
    student's own memory (no memory index), and the terms stay finite and non-zero."""
    teacher, student = load_detector(dirs["rt_detr-b"]), load_detector(dirs["rt_detr-4lvl"])
    teacher.eval()
    student.train()
    b = batch()
    kd, t, out, terms = kd_step(teacher, student, b)
    assert len(out.taps["memory_layout"]) == 4 and len(t["memory_layout"]) == 3
    assert kd.memory_index(t, out.taps)["specific"] is None
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["kd_cls"]) > 0


def test_groups_isolated_and_predict_own_queries(dirs):
    det = load_detector(dirs["rt_detr"])
    det.eval()
    b = batch()
    g = torch.Generator().manual_seed(0)
    qa, qb = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    with torch.no_grad():
        taps = det.forward_taps(b)
        both = det.decode_groups(taps, [qa, qb])
        alone = det.decode(taps, qa)
        qb2 = qb.clone()
        qb2[:, 0] += 3
        other = det.decode_groups(taps, [qa, qb2])
    assert torch.allclose(both[0]["logits"], alone["logits"], atol=1e-6)
    assert torch.allclose(other[0]["boxes"], both[0]["boxes"], atol=1e-6)
    assert not torch.allclose(other[1]["boxes"], both[1]["boxes"])
    calls = []
    h = det.model.model.decoder.register_forward_hook(lambda m, a, o: calls.append(o.intermediate_logits.shape[2]))
    det.predict(b)
    h.remove()
    assert calls == [10]


def test_onnx_dynamic_batch_and_pipeline(dirs, tmp_path):
    det = load_detector(dirs["rt_detr_v2-rich"])
    assert_onnx_dynamic_batch(det, tmp_path / "m.onnx")
    det.save(tmp_path / "hf")
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("object-detection", model=str(tmp_path / "hf"), threshold=0.0)
    res = pipe(Image.new("RGB", (96, 64), (120, 30, 200)))
    assert isinstance(res, list) and res and set(res[0]) == {"score", "label", "box"}
