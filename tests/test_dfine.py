"""D-FINE and DEIMv2 (kdctl/models/detr/d_fine.py): decoding parity in train and eval mode (edge distributions
included), transformers' own loss passed through, eval_idx, KD-DETR's box = "distribution" term
(kdctl/distill/fdr.py), presets, ONNX, and the YOLOS refusal. Tiny random models built from configs; nothing is
downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from batches import assert_onnx_dynamic_batch, decode_own_queries, padded_batch, save_tiny  # noqa: E402

from kdctl.data.batch import Batch  # noqa: E402
from kdctl.distill.fdr import edge_kl, project, reexpress  # noqa: E402
from kdctl.distill.kd_detr import KDDETR  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["a", "b", "c"]
ARCHS = ["d_fine", "deimv2"]


def build(arch: str, out: Path, d: int = 16, layers: int = 2, seed: int = 0, rich: bool = False, **extra) -> str:
    """A tiny model; ``rich``: weights redrawn with unit-gain fan-in scaling, so that its encoder scores vary over
    the image instead of tying (ties make the top-k, hence the compared queries, arbitrary)."""
    import transformers as T

    torch.manual_seed(seed)
    hg = T.HGNetV2Config(embedding_size=8, stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64],
                         stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 64, 128],
                         stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                         hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                         out_features=["stage2", "stage3", "stage4"])
    cls, model = ((T.DFineConfig, T.DFineForObjectDetection) if arch == "d_fine"
                  else (T.Deimv2Config, T.Deimv2ForObjectDetection))
    labels = dict(enumerate(NAMES))
    cfg = cls(backbone_config=hg, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=d, d_model=d,
              decoder_in_channels=[d, d, d], encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, encoder_attention_heads=2,
              decoder_attention_heads=2, decoder_layers=layers, num_queries=10, num_denoising=4, lqe_hidden_dim=8,
              hidden_expansion=0.5, id2label=labels, label2id={n: i for i, n in labels.items()},
              **{"max_num_bins": 8, **extra})
    return save_tiny(model(cfg), out, rich)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dfine")
    out = {a: build(a, root / a) for a in ARCHS}
    out["d_fine-b"] = build("d_fine", root / "b", d=32, layers=3, seed=1, max_num_bins=16)
    return out


batch = padded_batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False])
def test_decode_parity(dirs, arch, train):
    """Decoding the model's own proposals reproduces its forward: logits, boxes, edge distributions and first-layer
    boxes; training mode has L + 1 logit sets (layer 0 before refinement first), eval mode only eval_idx's."""
    det = load_detector(dirs[arch])
    taps, dec = decode_own_queries(det, train)
    levels = 3 if train else 1
    assert dec["logits"].shape == (levels, 2, 10, 3) and dec["corners"].shape == (levels - train, 2, 10, 4, 9)
    for key in ("logits", "boxes", "corners", "initial_boxes"):
        assert taps[key].shape == dec[key].shape
        assert float((dec[key] - taps[key]).abs().max()) < 1e-5, key
    if not train:
        out = det.model(pixel_values=det.pixel_inputs(batch())[0])
        assert torch.allclose(taps["logits"][-1], out.logits, atol=1e-6)
        assert torch.allclose(taps["boxes"][-1], out.pred_boxes, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_logged_total_is_transformers_loss(dirs, arch):
    """kdctl's terms (FGL and DDF included, varifocal for D-FINE, MAL for DEIMv2) sum to transformers' loss: no
    term weighted twice, none dropped."""
    det = load_detector(dirs[arch])
    det.train()
    b = batch()
    torch.manual_seed(3)
    losses = det.forward_train(b).losses
    torch.manual_seed(3)
    ref = det.model(*det.pixel_inputs(b), labels=det.hf_labels(b))
    cls_term = "loss_vfl" if arch == "d_fine" else "loss_mal"
    assert set(losses) == {cls_term, "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf"}
    assert abs(float(sum(losses.values())) - float(ref.loss)) <= 1e-5 * float(ref.loss)


def test_eval_idx_other_than_last_is_refused(dirs, tmp_path):
    path = build("d_fine", tmp_path / "e", layers=3, eval_idx=1)
    with pytest.raises(KdctlError, match="eval_idx 1"):
        load_detector(path)


def test_project_keeps_mass_and_mean():
    """Linear splitting onto the bins keeps the total and, inside the range, the mean; beyond it, the end bin."""
    w = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    p = torch.tensor([[0.2, 0.3, 0.5]])
    d = torch.tensor([[-0.25, 1.0, 0.5]])
    out = project(p, d, w)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float((out * w).sum()) == pytest.approx(float((p * d).sum()), abs=1e-6)
    edge = project(torch.tensor([[1.0, 1.0]]), torch.tensor([[-9.0, 9.0]]), w)
    assert edge[0].tolist() == pytest.approx([1.0, 0, 0, 0, 1.0])


def test_reexpress_same_frame_is_identity_and_mean_is_teacher_edge():
    """Same first-layer box and bins: the teacher's distribution comes back unchanged (KL 0). Another box: the mean
    of the re-expressed distribution is the teacher's decoded edge measured from the student's box."""
    from transformers.models.d_fine.modeling_d_fine import distance2bbox

    g = torch.Generator().manual_seed(0)
    w = torch.tensor([-4.0, -1.0, -0.3, 0.0, 0.3, 1.0, 4.0])
    logits = torch.randn(5, 4, 7, generator=g)
    t_init = torch.tensor([[0.5, 0.5, 0.3, 0.2]]).repeat(5, 1)
    same = reexpress(logits, t_init, (w, 4.0), t_init, (w, 4.0))
    assert float((same - logits.softmax(-1)).abs().max()) < 1e-5
    assert float(edge_kl(logits, same).abs().max()) < 1e-5
    s_init = torch.tensor([[0.52, 0.47, 0.33, 0.25]]).repeat(5, 1)
    inner = logits.clone()
    inner[..., [0, -1]] = -50.0  # no mass on the end bins: every edge stays inside the student's range
    moved = reexpress(inner, t_init, (w, 4.0), s_init, (w, 4.0))
    t_box = distance2bbox(t_init, inner.softmax(-1) @ w, 4.0)  # the teacher's decoded boxes (cxcywh)
    mean = moved @ w  # [5, 4] distances from the student's box
    s_box = distance2bbox(s_init, mean, 4.0)
    assert float((s_box - t_box).abs().max()) < 1e-5
    assert float(edge_kl(logits, moved).min()) > 0


def kd(teacher, student, b, **opts):
    kd = KDDETR(teacher, student, num_general=7, **opts)
    with torch.no_grad():
        t = kd.teacher_taps(b)
    out = student.forward_train(b)
    return kd(out, t, b)


def test_distribution_term_zero_for_same_model_positive_otherwise(dirs):
    teacher, same = load_detector(dirs["d_fine"]), load_detector(dirs["d_fine"])
    teacher.eval()
    same.eval()
    b = batch()
    terms = kd(teacher, same, b, box="distribution")
    assert set(terms) == {"kd_cls", "kd_dist"} and float(terms["kd_dist"]) == pytest.approx(0.0, abs=1e-5)
    student = load_detector(dirs["deimv2"])  # another model, another label-space-compatible FDR head
    student.train()
    terms = kd(load_detector(dirs["d_fine-b"]).eval(), student, b, box="distribution")
    assert float(terms["kd_dist"]) > 1e-3
    sum(terms.values()).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())
    default = kd(load_detector(dirs["d_fine-b"]).eval(), load_detector(dirs["d_fine"]).train(), b)
    assert set(default) == {"kd_cls", "kd_l1", "kd_giou"} and all(torch.isfinite(v) for v in default.values())
    student = load_detector(dirs["d_fine"]).train()  # a DEIMv2 teacher, both box terms
    for box in ("boxes", "distribution"):
        terms = kd(load_detector(dirs["deimv2"]).eval(), student, b, box=box)
        assert all(torch.isfinite(v) for v in terms.values()) and float(terms["kd_cls"]) > 0


def test_distribution_refused_without_fdr_heads(dirs, tmp_path):
    import transformers as T

    bb = T.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                              out_features=["stage2", "stage3", "stage4"])
    T.RTDetrForObjectDetection(T.RTDetrConfig(
        backbone_config=bb, encoder_in_channels=[16, 32, 64], encoder_hidden_dim=16, d_model=16,
        decoder_in_channels=[16] * 3, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, decoder_layers=2, num_queries=10, num_denoising=4,
        id2label=dict(enumerate(NAMES)))).save_pretrained(tmp_path / "rt")
    rt = load_detector(str(tmp_path / "rt"))
    with pytest.raises(KdctlError, match="box = 'distribution' needs edge-distribution boxes"):
        KDDETR(load_detector(dirs["d_fine"]), rt, box="distribution")
    with pytest.raises(KdctlError, match="box 'x'"):
        KDDETR(load_detector(dirs["d_fine"]), load_detector(dirs["d_fine"]), box="x")


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_dynamic_batch(tmp_path, arch):
    """The graph (pixel_values only, square input) computes the model's outputs at another batch size; queries whose
    encoder score ties another position's are left out (onnxruntime may break the tie differently)."""
    assert_onnx_dynamic_batch(load_detector(build(arch, tmp_path / "rich", seed=4, rich=True)), tmp_path / "m.onnx")


@pytest.mark.parametrize(("preset", "millions", "layers"), [("dfine-n", 3.73, 3), ("dfine-s", 10.22, 3),
                                                       ("dfine-m", 19.47, 4), ("deimv2-atto", 0.49, 3),
                                                       ("deimv2-s", 10.48, 3)])
def test_presets_published_sizes(preset, millions, layers):
    """The presets build the published architectures: with 80 classes D-FINE-N / S / M have 3.78 / 10.32 / 19.59 M
    parameters (published 4 / 10 / 19 M), DEIMv2-Atto 0.51 M (0.5 M) and DEIMv2-S on HGNetv2 10.58 M (the
    released S uses a DINOv3 backbone instead); here with 3 classes."""
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False)
    n = sum(p.numel() for p in det.model.parameters()) / 1e6
    assert n == pytest.approx(millions, abs=0.03)
    assert det.model.config.decoder_layers == layers and det.variant.recipe == "rtdetr"


def test_yolos_is_refused_in_one_line(tmp_path):
    from transformers import YolosConfig, YolosForObjectDetection

    c = YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=[64, 64], num_detection_tokens=5, id2label=dict(enumerate(NAMES)))
    YolosForObjectDetection(c).save_pretrained(tmp_path / "y")
    with pytest.raises(KdctlError, match="YOLOS cannot take part in KD-DETR.*no attention mask.*--method pred-kd") as e:
        load_detector(str(tmp_path / "y"))
    assert "\n" not in str(e.value)


def test_input_too_small_for_the_queries_is_one_line():
    """D-FINE-N reads strides 16 and 32 only: at 160 px that is 125 positions for 300 top-k queries, which
    transformers fails on deep inside; kdctl names the smallest --imgsz that works (256: 256 + 64 positions)."""
    det = load_detector("dfine-n", label_names=NAMES, pretrained_backbone=False)
    small = Batch(images=torch.rand(1, 3, 160, 160), sizes=[(160, 160)], orig_sizes=[(160, 160)], targets=[])
    with pytest.raises(KdctlError, match="125 encoder positions, fewer than its 300 queries; use --imgsz 256"):
        det.predict(small)


def test_new_head_resizes_encoder_and_denoising_heads(dirs):
    """A new label space resizes every class head, the encoder's score head and the denoising label embedding
    (padding row last); kept classes keep their rows, and a training step runs on the new labels."""
    det = load_detector(dirs["deimv2"])
    old_enc = det.model.model.enc_score_head.weight.detach().clone()
    old_dn = det.model.model.denoising_class_embed.weight.detach().clone()
    det.replace_head(["c", "x", "y", "z"], {0: 2}, keep_background=True)
    inner = det.model.model
    assert inner.enc_score_head.out_features == 4 and torch.equal(inner.enc_score_head.weight[0], old_enc[2])
    emb = inner.denoising_class_embed
    assert emb.weight.shape[0] == 5 and emb.padding_idx == 4
    assert torch.equal(emb.weight[0], old_dn[2]) and torch.equal(emb.weight[4], old_dn[3])
    det.train()
    b = Batch(images=torch.rand(1, 3, 128, 128), sizes=[(128, 128)], orig_sizes=[(128, 128)],
              targets=[{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([3])}])
    assert torch.isfinite(sum(det.forward_train(b).losses.values()))


def test_deimv2_dinov3_backbone(tmp_path):
    """A DEIMv2 on a (tiny) DINOv3 ViT with the spatial tuning adapter, the released S-X sizes' layout: decoding
    parity in both modes, and the recipe's stage freezing reaches the ViT (its patch embedding is the stem)."""
    import transformers as T
    from transformers.models.dinov3_vit.configuration_dinov3_vit import DINOv3ViTConfig

    from kdctl.models.detr import backbone_module, freeze_backbone_stages

    torch.manual_seed(0)
    vit = DINOv3ViTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=64,
                          patch_size=16, layerscale_value=1.0, num_register_tokens=0, rope_theta=100.0,
                          out_indices=[1, 2, 3], apply_layernorm=False, reshape_hidden_states=True)
    cfg = T.Deimv2Config(backbone_config=vit, encoder_in_channels=[16] * 3, encoder_hidden_dim=16, d_model=16,
                         decoder_in_channels=[16] * 3, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                         decoder_attention_heads=2, decoder_layers=2, num_queries=10, num_denoising=4, max_num_bins=8,
                         lqe_hidden_dim=8, hidden_expansion=0.5, spatial_tuning_adapter_inplanes=8,
                         encoder_has_trailing_conv=False, id2label=dict(enumerate(NAMES)))
    T.Deimv2ForObjectDetection(cfg).save_pretrained(tmp_path / "dino")
    det = load_detector(str(tmp_path / "dino"))
    b = batch()
    for train in (True, False):
        det.train(train)
        with torch.no_grad():
            taps = det.forward_train(b).taps if train else det.forward_taps(b)
            dec = det.decode(taps, taps["queries"], memory_index=taps["query_index"])
        assert max(float((dec[k] - taps[k]).abs().max()) for k in dec) < 1e-5
    assert type(backbone_module(det.model)).__name__ == "DINOv3ViTBackbone"
    assert freeze_backbone_stages(det.model, 1) == sum(
        p.numel() for n, p in backbone_module(det.model).named_parameters() if n.startswith("embeddings."))


@pytest.mark.parametrize("arch", ARCHS)
def test_student_setup_keeps_a_real_time_presets_query_count(dirs, arch):
    """Queries from the encoder's top-k: a preset student keeps its published count (DEIMv2-Atto's 100 stay 100
    under a 300-query teacher); only the label space is the teacher's."""
    teacher = load_detector(dirs[arch])
    assert teacher.queries_image_dependent
    names, over = KDDETR.student_setup(teacher, ["c", "a"])
    assert names == NAMES and over == {}
