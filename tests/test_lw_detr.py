"""LW-DETR and RF-DETR (kdctl/models/detr/lw_detr.py): decoding parity in train and eval mode, transformers' own
loss, Group-DETR-safe decoding of extra queries, KD-DETR with the slot-content point rule, padded input, ONNX,
the published presets' sizes and the licence line of ``kdctl inspect``. Tiny random models built from configs;
nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from batches import assert_final_layer_is_output, padded_batch  # noqa: E402

from kdctl.data.batch import Batch  # noqa: E402
from kdctl.distill.kd_detr import KDDETR, sample_queries  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.models.base import TrainOutput  # noqa: E402
from kdctl.models.license import checkpoint_license  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["a", "b", "c"]
ARCHS = ["lw_detr", "rf_detr"]


def build(arch: str, out: Path, d: int = 16, layers: int = 2, seed: int = 0, queries: int = 10) -> str:
    """A tiny model with 10 queries in 3 Group-DETR groups, dropout 0 (so that train mode is deterministic)."""
    import transformers as T

    torch.manual_seed(seed)
    labels = dict(enumerate(NAMES))
    common = dict(id2label=labels, label2id={n: i for i, n in labels.items()}, d_model=d, decoder_ffn_dim=2 * d,
                  decoder_layers=layers, decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                  num_queries=queries, group_detr=3, dropout=0.0)
    if arch == "lw_detr":
        vit = T.LwDetrViTConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                pretrain_image_size=64, patch_size=16, num_windows=1, out_indices=[1, 2])
        m = T.LwDetrForObjectDetection(T.LwDetrConfig(backbone_config=vit, projector_scale_factors=[1.0], **common))
    else:
        vit = T.RfDetrDinov2Config(hidden_size=2 * d, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                   patch_size=16, num_windows=2, out_indices=[1, 2])
        m = T.RfDetrForObjectDetection(T.RfDetrConfig(backbone_config=vit, **common))
    m.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lwdetr")
    out = {a: build(a, root / a) for a in ARCHS}
    out["lw_detr-1"] = build("lw_detr", root / "one", layers=1, seed=1)
    out["lw_detr-big"] = build("lw_detr", root / "big", d=32, layers=3, seed=2)
    return out


batch = padded_batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False])
def test_decode_parity(dirs, arch, train):
    """Decoding the model's own boxes (slot contents 0..Q-1) reproduces every decoder layer of its forward; in
    training the taps keep group 0 of the 3 Group-DETR groups the pass decoded."""
    det = load_detector(dirs[arch])
    det.train(train)
    b = batch()
    with torch.no_grad():
        taps = det.forward_train(b).taps if train else det.forward_taps(b)
        dec = det.decode(taps, taps["queries"])
    assert det.query_kind == "box" and taps["queries"].shape == (2, 10, 4)
    assert taps["logits"].shape == (2, 2, 10, 3) and dec["boxes"].shape == (2, 2, 10, 4)
    assert float((dec["logits"] - taps["logits"]).abs().max()) < 1e-5
    assert float((dec["boxes"] - taps["boxes"]).abs().max()) < 1e-5
    assert taps["decoder_kwargs"]["inputs_embeds"].shape[1] == (30 if train else 10)
    assert_final_layer_is_output(det, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_logged_total_is_transformers_loss(dirs, arch):
    """transformers' loss_dict is unweighted: kdctl weights each term once (class 1, bbox 5, giou 2, auxiliary and
    encoder terms alike) and the sum equals outputs.loss; weighting twice or not at all would not."""
    det = load_detector(dirs[arch])
    det.train()
    b = batch()
    losses = det.forward_train(b).losses
    ref = det.model(*det.pixel_inputs(b), labels=det.hf_labels(b))
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert abs(float(sum(losses.values())) - float(ref.loss)) <= 1e-5 * float(ref.loss)
    assert {"loss_bbox_enc", "loss_bbox_0"} <= set(ref.loss_dict)
    raw = sum(float(v) for k, v in ref.loss_dict.items() if k.startswith("loss_"))
    assert abs(raw - float(ref.loss)) > 1e-3 * float(ref.loss)  # the weights matter


@pytest.mark.parametrize("arch", ARCHS)
def test_group_detr_safe_decoding(dirs, arch, monkeypatch):
    """7 and 9 extra queries decoded in training mode (group_detr = 3) give per query the outputs of decoding each
    group on its own as inference does (attention over the whole group, one group per pass); without the eval-mode
    attention 7 queries raise and 9 are silently cut into 3 groups of 3."""
    det = load_detector(dirs[arch])
    det.train()
    b = batch()
    g = torch.Generator().manual_seed(1)
    q7, q9 = torch.rand(2, 7, 4, generator=g) * 0.5 + 0.2, torch.rand(2, 9, 4, generator=g) * 0.5 + 0.2
    with torch.no_grad():
        taps = det.forward_train(b).taps
        both = det.decode_groups(taps, [q7, q9])
        det.model.eval()  # the reference: the same decoder calls with every module in eval mode (dropout is 0)
        ref = [det.decode(taps, q7), det.decode(taps, q9)]
        det.model.train()
    for got, want in zip(both, ref, strict=True):
        assert float((got["logits"] - want["logits"]).abs().max()) < 1e-6
        assert float((got["boxes"] - want["boxes"]).abs().max()) < 1e-6
    monkeypatch.setattr(type(det.variant), "decode_context", lambda self, model: contextlib.nullcontext())
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            det.decode(taps, q7)
        split = det.decode(taps, q9)
    assert float((split["logits"] - ref[1]["logits"]).abs().max()) > 1e-4


def test_kd_zero_for_identical_weights_and_gradients(dirs):
    """One decoder layer, the same weights twice: the student decodes the teacher's boxes with its own slot contents
    (identical here), so every KD term is 0; in training, gradients reach the student (its slot contents too) and
    never the teacher."""
    teacher, student = load_detector(dirs["lw_detr-1"]), load_detector(dirs["lw_detr-1"])
    teacher.eval()
    student.eval()  # BatchNorm statistics as the teacher's
    b = batch()
    kd = KDDETR(teacher, student, num_general=7)
    with torch.no_grad():
        t = kd.teacher_taps(b)
    assert t["general_queries"].shape == (7, 4) and float(t["general_queries"].min()) > 0
    terms = kd(TrainOutput(losses={}, taps=student.forward_taps(b)), t, b)
    for v in terms.values():
        assert float(v) == pytest.approx(0.0, abs=1e-5)
    student.train()
    terms = kd(student.forward_train(b), t, b)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert float(student.model.model.query_feat.weight.grad[:10].abs().sum()) > 0


@pytest.mark.parametrize(("t_name", "s_name"), [("lw_detr-big", "rf_detr"), ("rf_detr", "lw_detr-1")])
def test_kd_across_lw_and_rf(dirs, t_name, s_name):
    """Different backbones, widths and depths, either way round: boxes are shared, contents are each model's own."""
    teacher, student = load_detector(dirs[t_name]), load_detector(dirs[s_name])
    teacher.eval()
    student.train()
    b = batch()
    kd = KDDETR(teacher, student, num_general=9)
    with torch.no_grad():
        t = kd.teacher_taps(b)
    terms = kd(student.forward_train(b), t, b)
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["kd_cls"]) > 0
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_box_general_points():
    class M:
        query_kind, query_dim = "box", 4

    for dist in ("normal", "uniform"):
        q = sample_queries(M(), 500, distribution=dist, generator=torch.Generator().manual_seed(0))
        assert q.shape == (500, 4) and float(q.min()) >= 0 and float(q.max()) <= 1 and float(q.std()) > 0.1


def test_padded_input(dirs):
    """The ViT needs multiples of patch x windows (RF-DETR: 16 x 2, and a square); the mask covers the padding and
    boxes stay relative to the unpadded image (the decoder honours the mask)."""
    lw, rf = load_detector(dirs["lw_detr"]), load_detector(dirs["rf_detr"])
    b = Batch(images=torch.rand(1, 3, 70, 100), sizes=[(70, 100)], orig_sizes=[(70, 100)],
              targets=[{"boxes": torch.tensor([[0.0, 0, 50, 35]]), "labels": torch.tensor([1])}])
    pv, mask = lw.pixel_inputs(b)
    assert pv.shape[-2:] == (80, 112) and int(mask.sum()) == 7000 and lw.pad_stride == 16
    pv, mask = rf.pixel_inputs(b)
    assert pv.shape[-2:] == (128, 128) and int(mask.sum()) == 7000 and rf.pad_stride == 32
    assert torch.allclose(rf.hf_labels(b)[0]["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    with torch.no_grad():
        dets = rf.predict(b, score_threshold=0.0)[0]
    assert float(dets["boxes"][:, 2].max()) <= 100 + 1e-3 and float(dets["boxes"][:, 3].max()) <= 70 + 1e-3



def test_too_small_inputs_refused_and_probes_large_enough(tmp_path):
    """80 queries need 9 x 9 patches of 16 px, 160 px in multiples of 32: a 128 px input is one error line (not
    torch's top-k error), and the teacher's norm-folding probe uses 160 px."""
    from kdctl.engine.fold import fold_teacher

    det = load_detector(build("rf_detr", tmp_path / "q80", queries=80))
    b = Batch(images=torch.rand(1, 3, 128, 128), sizes=[(128, 128)], orig_sizes=[(128, 128)])
    assert det.min_side == 160
    with pytest.raises(KdctlError, match=r"64 encoder positions, fewer than its 80 queries; use --imgsz 160 or more"):
        det.pixel_inputs(b)
    fold_teacher(det.eval(), "cpu")


def test_new_head_resizes_every_group_head(dirs):
    """--head: the final class head and the encoder heads of all Group-DETR groups take the new label space."""
    det = load_detector(dirs["lw_detr"])
    old = det.model.model.enc_out_class_embed[2].weight[1].clone()
    det.replace_head(["b", "new", "c"], {0: 1, 2: 2})
    heads = [det.model.class_embed, *det.model.model.enc_out_class_embed]
    assert all(h.out_features == 3 for h in heads) and torch.equal(heads[3].weight[0], old)
    det.train()
    det.set_classes(["b", "new", "c"])
    assert torch.isfinite(sum(det.forward_train(batch()).losses.values()))


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_dynamic_batch_and_pipeline(dirs, arch, tmp_path):
    import onnxruntime as ort

    from kdctl.export import export_model

    res = export_model(dirs[arch], "onnx", tmp_path / "onnx", imgsz=128)
    assert max(res.onnx["parity"]["max_abs_diff"].values()) < 1e-4
    det = load_detector(dirs[arch])
    det.eval()
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # batch 3: dynamic
    mask = torch.ones(3, 128, 128, dtype=torch.long)
    mask[2, 100:] = 0
    got = sess.run(None, {"pixel_values": x.numpy(), "pixel_mask": mask.numpy()})
    with torch.no_grad():
        ref = det.model(pixel_values=x, pixel_mask=mask)
    for gg, r in zip(got, (ref.logits, ref.pred_boxes), strict=True):
        assert float((torch.from_numpy(gg) - r).abs().max()) < 1e-4
    det.save(tmp_path / "hf")
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("object-detection", model=str(tmp_path / "hf"), threshold=0.0)
    res = pipe(Image.new("RGB", (96, 64), (120, 30, 200)))  # padded to 128 x 128 by the saved processor
    assert isinstance(res, list) and res and set(res[0]) == {"score", "label", "box"}


@pytest.mark.parametrize(("preset", "millions"), [("lw-detr-tiny", 12.1), ("rf-detr-nano", 30.5),
                                                  ("rf-detr-small", 32.1)])
def test_presets_have_the_published_sizes(preset, millions):
    """The presets build the published architectures: parameter counts with COCO's 91 labels (built on the meta
    device: no memory, no init) within 1 % of the published 12.1 M / 30.5 M / 32.1 M."""
    import transformers

    from kdctl.specs import resolve

    r = resolve(preset)
    variant = __import__("kdctl.models.detr", fromlist=["VARIANTS_BY_CLASS"]).VARIANTS_BY_CLASS[r.architecture]
    config = getattr(transformers, variant.config_cls)(**r.config, num_labels=91)
    with torch.device("meta"):
        model = getattr(transformers, variant.model_cls)(config)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) <= 0.01 * millions
    assert r.imgsz % variant.input_multiple(model) == 0


def test_preset_builds_through_the_loader():
    """A preset built as ``kdctl train`` builds it (no ImageNet weights: its backbone norms made trainable) loads,
    with the data's classes and every parameter trainable (the loader's path, not only the meta-device count)."""
    from kdctl.specs import load_detector

    det = load_detector("lw-detr-tiny", label_names=["a", "b"], pretrained_backbone=False)
    assert det.label_names == ["a", "b"]
    assert not any(type(m).__name__.endswith("FrozenBatchNorm2d") for m in det.model.modules())


def test_license_from_card_or_config(dirs, tmp_path):
    from kdctl.commands.inspect import inspect_model

    src = Path(dirs["rf_detr"])
    local = tmp_path / "m"
    local.mkdir()
    for f in src.iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    assert checkpoint_license(local) is None
    cfg = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**cfg, "license": "Apache-2.0"}))
    assert checkpoint_license(local) == "Apache-2.0"
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: pml-1.0\ntags: [object-detection]\n---\n# m\n")
    assert checkpoint_license(local) == "other (pml-1.0)"  # the card wins
    assert inspect_model(str(local), as_json=True)["license"] == "other (pml-1.0)"


def test_lw_family_and_rt_family_do_not_pair(dirs, tmp_path):
    """LW-DETR / RF-DETR content is per slot, RT-DETR / D-FINE / DEIMv2 content comes from the encoder's top-k
    proposals: KD-DETR refuses the pairing either way in one line, naming both query kinds."""
    from test_dfine import build as build_dfine

    dfine = load_detector(build_dfine("d_fine", tmp_path / "dfine"))
    lw = load_detector(dirs["lw_detr"])
    for teacher, student in ((lw, dfine), (dfine, lw)):
        with pytest.raises(KdctlError, match=r"uses \w+ queries and student .* queries; distillation points cannot "
                                             r"be shared") as e:
            KDDETR(teacher, student)
        assert "\n" not in str(e.value)
        assert f"uses {teacher.query_kind} queries" in str(e.value) and f"{student.query_kind} queries;" in str(e.value)
    assert {lw.query_kind, dfine.query_kind} == {"box", "proposal"}
