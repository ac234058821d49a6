"""DETR-family adapter: decode parity, loss bookkeeping, query groups, coordinates, presets, save/load, gradients.

Every model is a tiny random one (d_model 32, 2 decoder layers, small HF ResNet), saved with save_pretrained and
loaded back through ``kdctl.specs.load_detector``. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kdctl.data.batch import Batch  # noqa: E402
from kdctl.distill.kd_detr import sample_queries  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["RBC", "WBC", "Platelets"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BACKBONE = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}
COMMON = dict(
    use_timm_backbone=False, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, id2label=dict(enumerate(NAMES)), auxiliary_loss=True,
)
CASES = {  # name -> (transformers class, config class, config kwargs)
    "detr": ("DetrForObjectDetection", "DetrConfig", {"d_model": 32}),
    "detr-noaux": ("DetrForObjectDetection", "DetrConfig", {"d_model": 32, "auxiliary_loss": False}),
    "table": ("TableTransformerForObjectDetection", "TableTransformerConfig", {"d_model": 32}),
    "table-noaux": ("TableTransformerForObjectDetection", "TableTransformerConfig",
                    {"d_model": 32, "auxiliary_loss": False}),  # as microsoft/table-transformer-detection
    "conditional": ("ConditionalDetrForObjectDetection", "ConditionalDetrConfig", {"d_model": 32}),
    "dab": ("DabDetrForObjectDetection", "DabDetrConfig", {"hidden_size": 32}),
    "deformable": ("DeformableDetrForObjectDetection", "DeformableDetrConfig", {"d_model": 32}),
    "deformable-refine": ("DeformableDetrForObjectDetection", "DeformableDetrConfig",
                          {"d_model": 32, "with_box_refine": True}),
    "deformable-2stage": ("DeformableDetrForObjectDetection", "DeformableDetrConfig",
                          {"d_model": 32, "with_box_refine": True, "two_stage": True, "two_stage_num_proposals": 10}),
}
DEFORMABLE = {"num_feature_levels": 4, "encoder_n_points": 2, "decoder_n_points": 2}


def build_tiny(case: str, directory: Path) -> Path:
    import transformers

    model_cls, config_cls, extra = CASES[case]
    kwargs = {**COMMON, **extra}
    stages = ["stage2", "stage3", "stage4"] if "deformable" in case else ["stage4"]
    if "deformable" in case:
        kwargs.update(DEFORMABLE)
    config = getattr(transformers, config_cls)(backbone_config={**BACKBONE, "out_features": stages}, **kwargs)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_detrs")
    return {case: build_tiny(case, root / case) for case in CASES}


def load_case(tiny_dirs: dict[str, Path], case: str):
    det = load_detector(str(tiny_dirs[case]))
    det.eval()
    return det


def make_batch() -> Batch:
    """Two images padded to 64x96: a full 64x96 one and a 48x64 one, both downscaled from larger originals."""
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, 64, 96)
    images[0] = torch.rand(3, 64, 96, generator=g)
    images[1, :, :48, :64] = torch.rand(3, 48, 64, generator=g)
    targets = [
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 44.0], [32.0, 0.0, 64.0, 20.0]]), "labels": torch.tensor([0, 2])},
    ]
    return Batch(images=images, sizes=[(64, 96), (48, 64)], orig_sizes=[(128, 192), (96, 128)], targets=targets)


# --------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("case", list(CASES))
def test_decode_reproduces_forward(tiny_dirs, case):
    det = load_case(tiny_dirs, case)
    batch = make_batch()
    with torch.no_grad():
        taps = det.forward_taps(batch)
        pixel_values, pixel_mask = det.pixel_inputs(batch)
        ref = det.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=det.hf_labels(batch))
        dec = det.decode(taps, taps["queries"])
    n_cls = len(NAMES) + (1 if det.logit_kind == "softmax" else 0)
    assert dec["logits"].shape == (2, 2, det.num_queries, n_cls)
    assert dec["boxes"].shape == (2, 2, det.num_queries, 4)
    assert taps["memory"].shape[0] == 2 and taps["memory"].shape[-1] == det.hidden_size
    # final layer == the model's own outputs
    assert (dec["logits"][-1] - ref.logits).abs().max() < 1e-5
    assert (dec["boxes"][-1] - ref.pred_boxes).abs().max() < 1e-5
    # every layer == the taps of the normal forward; aux layers == the model's own auxiliary outputs
    assert (dec["logits"] - taps["logits"]).abs().max() < 1e-5
    assert (dec["boxes"] - taps["boxes"]).abs().max() < 1e-5
    if det.model.config.auxiliary_loss:
        aux = ref.auxiliary_outputs
        assert len(aux) == 1
        assert (dec["logits"][0] - aux[0]["logits"]).abs().max() < 1e-5
        assert (dec["boxes"][0] - aux[0]["pred_boxes"]).abs().max() < 1e-5
    if not det.queries_image_dependent:
        with torch.no_grad():
            again = det.decode(taps, det.learned_queries())
        assert (again["logits"] - ref.logits.unsqueeze(0)).abs()[-1].max() < 1e-5
        assert det.learned_queries().shape == (det.num_queries, det.query_dim)
    else:
        assert taps["queries"].shape == (2, det.num_queries, 4)
        with pytest.raises(KdctlError):
            det.learned_queries()


def test_query_formats(tiny_dirs):
    dets = {case: load_case(tiny_dirs, case) for case in CASES}
    kinds = {case: (det.query_kind, det.query_dim) for case, det in dets.items()}
    assert kinds["detr"] == ("embed", 32) and kinds["conditional"] == ("embed", 32)
    assert kinds["table"] == ("embed", 32) and dets["table"].logit_kind == "softmax"
    assert kinds["dab"] == ("anchor4", 4) and kinds["deformable-2stage"] == ("anchor4", 4)
    assert kinds["deformable"] == ("embed2", 64)
    assert dets["detr"].logit_kind == "softmax" and dets["dab"].logit_kind == "sigmoid"


# --------------------------------------------------------------------------- 2. losses
def hand_made_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """What the HF processors would give: normalised pixels (0 on padding), mask, cxcywh / unpadded size."""
    mask = torch.zeros(2, 64, 96, dtype=torch.long)
    mask[0] = 1
    mask[1, :48, :64] = 1
    pixels = (batch.images - MEAN) / STD * mask[:, None]
    labels = []
    for (h, w), t in zip(batch.sizes, batch.targets, strict=True):
        x0, y0, x1, y1 = t["boxes"].unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], -1)
        labels.append({"class_labels": t["labels"], "boxes": boxes})
    return pixels, mask, labels


@pytest.mark.parametrize("case", ["detr", "detr-noaux", "table", "table-noaux", "conditional", "dab",
                                  "deformable-refine", "deformable-2stage"])
def test_losses_sum_to_model_loss(tiny_dirs, case):
    det = load_case(tiny_dirs, case)
    det.train()
    batch = make_batch()
    torch.manual_seed(3)
    out = det.forward_train(batch)
    pixels, mask, labels = hand_made_inputs(batch)
    torch.manual_seed(3)  # same dropout draws
    with torch.no_grad():
        plain = det.model(pixel_values=pixels, pixel_mask=mask, labels=labels)
    assert set(out.losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    total = sum(out.losses.values())
    assert torch.isfinite(total) and total.requires_grad
    assert torch.allclose(total.detach(), plain.loss, rtol=1e-5, atol=1e-5)
    assert out.taps["logits"].shape[:2] == (2, 2)


def test_unknown_loss_terms_are_refused(tiny_dirs, monkeypatch):
    """A loss term transformers optimises that the variant does not weight is an error, never silently dropped."""
    det = load_case(tiny_dirs, "detr")
    det.train()
    monkeypatch.setattr(det.variant, "loss_weights", lambda model: {"loss_ce": 1.0, "loss_bbox": 5.0})
    with pytest.raises(KdctlError, match="unknown loss term 'loss_giou'"):
        det.forward_train(make_batch())


# --------------------------------------------------------------------------- 3. query groups
def sensitise(det) -> None:
    """Random tiny decoders barely react to their queries: perturb them so that query interactions show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in det.model.model.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        if not det.queries_image_dependent:
            det.learned_queries().mul_(20)


@pytest.mark.parametrize("case", ["detr", "conditional", "dab", "deformable", "deformable-2stage"])
def test_query_groups_do_not_interact(tiny_dirs, case):
    det = load_case(tiny_dirs, case)
    sensitise(det)
    g = torch.Generator().manual_seed(0)
    qa, qb = (sample_queries(det, 6, generator=g) for _ in range(2))
    qb2 = qb + 2 * torch.randn(qb.shape, generator=g)  # a very different group B
    with torch.no_grad():
        taps = det.forward_taps(make_batch())
        a1, b1 = det.decode_groups(taps, [qa, qb])
        a2, b2 = det.decode_groups(taps, [qa, qb2])
        alone = det.decode(taps, qa)
        per_image = det.decode(taps, qa.unsqueeze(0).expand(2, -1, -1))
        uneven = det.decode_groups(taps, [qa, qb[:3]])
        joint, joint2 = (det.decode(taps, torch.cat([qa, b])) for b in (qb, qb2))  # ONE pass: A sees B
    assert (joint["logits"][:, :, :6] - joint2["logits"][:, :, :6]).abs().max() > 1e-3  # the test can see leaks
    assert (a1["logits"] - a2["logits"]).abs().max() < 1e-6 and (a1["boxes"] - a2["boxes"]).abs().max() < 1e-6
    assert (b1["logits"] - b2["logits"]).abs().max() > 1e-3  # group B did change
    # folded (batched) and lone passes agree up to float rounding, amplified by the perturbed weights: measured as
    # what a relative eps perturbation of the decoder's weights and queries changes (float32 rounding is such a
    # perturbation of every operation: backward error), with a factor 4 for the max over elements of a random draw
    tol = 4 * rounding_level(det, taps, qa, alone)
    for got, want in ((a1["logits"], alone["logits"]), (per_image["boxes"], alone["boxes"]),
                      (uneven[0]["logits"], alone["logits"])):
        assert float((got - want).abs().max()) <= tol, (float((got - want).abs().max()), tol)
    assert tol < 1e-2 * float(alone["logits"].abs().max())  # far below a wrong slice of the folded outputs
    assert uneven[1]["logits"].shape[2] == 3


def rounding_level(det, taps: dict, q: torch.Tensor, ref: dict) -> float:
    """Largest output change of ``det.decode(taps, q)`` when every decoder weight and the queries are multiplied by
    ``1 + eps * N(0, 1)`` (float32 eps): the scale of the float32 rounding of this decode, whatever the CPU."""
    import copy

    eps = torch.finfo(torch.float32).eps
    pert = copy.deepcopy(det)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pert.model.model.decoder.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g))
        out = pert.decode(taps, q * (1 + eps * torch.randn(q.shape, generator=g)))
    return max(float((out[k] - ref[k]).abs().max()) for k in ("logits", "boxes")) + eps * float(ref["logits"].abs().max())


def test_sample_queries(tiny_dirs):
    dab, detr, deform = (load_case(tiny_dirs, c) for c in ("dab", "detr", "deformable"))
    a = sample_queries(dab, 5000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5000, 4) and abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05  # N(0, 1) anchors
    b = sample_queries(dab, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    u = sample_queries(dab, 5000, distribution="uniform").sigmoid()
    assert 0.0 < u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02  # uniform boxes after sigmoid
    e = sample_queries(detr, 5000, distribution="uniform")
    learned = detr.learned_queries().detach()
    assert e.shape == (5000, 32) and abs(e.std() - learned.std()) < 0.1 * learned.std()
    d = sample_queries(deform, 10)
    assert d.shape == (10, 64)
    with torch.no_grad():
        taps = detr.forward_taps(make_batch())
    with pytest.raises(KdctlError, match="query formats differ"):
        detr.decode(taps, a[:3])  # DAB anchors into a DETR


# --------------------------------------------------------------------------- 4. coordinates
def controlled(det, box: tuple[float, float, float, float], winner: int) -> None:
    """Every query predicts ``box`` (normalised cxcywh) and class ``winner``."""
    logit_box = torch.logit(torch.tensor(box))
    m = det.model
    with torch.no_grad():
        if det.logit_kind == "softmax":
            heads = [(m.class_labels_classifier, m.bbox_predictor)]
        else:  # plain Deformable: reference points fixed at 0.5 (logit 0)
            m.model.reference_points.weight.zero_()
            m.model.reference_points.bias.zero_()
            heads = list(zip(m.class_embed, m.bbox_embed, strict=True))
        for cls, bbox in heads:
            bbox.layers[-1].weight.zero_()
            bbox.layers[-1].bias.copy_(logit_box)
            cls.weight.zero_()
            cls.bias.fill_(-4.0)
            cls.bias[winner] = 3.0
            if det.logit_kind == "softmax":
                cls.bias[-1] = -4.0


@pytest.mark.parametrize("case", ["detr", "deformable"])
def test_predict_returns_original_pixels(tiny_dirs, case):
    det = load_case(tiny_dirs, case)
    controlled(det, (0.5, 0.5, 0.4, 0.2), winner=1)
    images = torch.zeros(2, 3, 64, 128)
    images[0, :, :50, :100] = 0.5
    images[1, :, :60, :40] = 0.5
    # image 0: 200x100 original -> 100x50 (scale 0.5); image 1: 60x90 original -> 40x60 (scale 2/3)
    batch = Batch(images=images, sizes=[(50, 100), (60, 40)], orig_sizes=[(100, 200), (90, 60)])
    dets = det.predict(batch, score_threshold=0.5, max_detections=4)
    expected = [torch.tensor([60.0, 40.0, 140.0, 60.0]), torch.tensor([18.0, 36.0, 42.0, 54.0])]
    score = math.exp(3) / (math.exp(3) + 3 * math.exp(-4)) if case == "detr" else 1 / (1 + math.exp(-3))
    for d, box in zip(dets, expected, strict=True):
        assert d["boxes"].shape == (4, 4)
        assert (d["boxes"] - box).abs().max() < 1e-3
        assert (d["labels"] == 1).all()
        assert (d["scores"] - score).abs().max() < 1e-5
    det.set_classes(["Platelets", "WBC"])  # dataset index 1 is the model's label 1
    assert all((d["labels"] == 1).all() for d in det.predict(batch, score_threshold=0.5))
    det.set_classes(["WBC", "RBC"])
    assert all((d["labels"] == 0).all() for d in det.predict(batch, score_threshold=0.5))
    batch.targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2), "labels": torch.tensor([1, 0])}] * 2
    assert torch.equal(det.hf_labels(batch)[0]["class_labels"], torch.tensor([0, 1]))  # RBC -> 0, WBC -> 1


# --------------------------------------------------------------------------- 5. presets
SMALL = {"encoder_layers": 1, "decoder_layers": 2, "num_queries": 5}  # Deformable needs >= 2 decoder layers


@pytest.mark.parametrize("preset", ["detr-r18", "detr-r50", "dab-detr-r18", "conditional-detr-r18",
                                    "deformable-detr-r18"])
def test_presets_build_without_download(preset):
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False, overrides=SMALL)
    assert det.label_names == NAMES and det.model.config.id2label == dict(enumerate(NAMES))
    assert det.imgsz == 640 and det.num_queries == 5 and det.model.config.auxiliary_loss
    assert det.model.config.backbone_config.backbone == ("resnet50" if preset.endswith("r50") else "resnet18")
    det.train()
    out = det.forward_train(make_batch())
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_preset_errors(monkeypatch, tmp_path):
    import huggingface_hub

    with pytest.raises(KdctlError, match="class names"):
        load_detector("detr-r18", pretrained_backbone=False)
    with pytest.raises(KdctlError, match="num_querys"):
        load_detector("detr-r18", label_names=NAMES, pretrained_backbone=False, overrides={"num_querys": 3})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdctlError, match="ImageNet backbone weights .* could not be fetched.*--no-pretrained-backbone"):
        load_detector("detr-r18", label_names=NAMES, pretrained_backbone=True, overrides=SMALL)


def test_preset_copies_imagenet_weights(monkeypatch):
    import timm

    from kdctl.models.detr import backbone_module

    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):  # "ImageNet weights" = every tensor filled with 0.25
        net = real(name, pretrained=False, **kwargs)
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point() and pretrained:
                    t.fill_(0.25)
        return net

    monkeypatch.setattr(timm, "create_model", fake)
    for preset in ("detr-r18", "dab-detr-r18"):
        det = load_detector(preset, label_names=NAMES, pretrained_backbone=True, overrides=SMALL)
        values = [t for t in backbone_module(det.model).state_dict().values() if t.is_floating_point()]
        assert values and all(bool((t == 0.25).all()) for t in values)


# --------------------------------------------------------------------------- 6. save / load / pipeline
@pytest.mark.parametrize("case", ["detr", "table-noaux", "dab", "deformable-refine"])
def test_save_roundtrip_and_pipeline(tiny_dirs, tmp_path, case):
    import json

    from PIL import Image
    from transformers import pipeline

    det = load_case(tiny_dirs, case)
    det.imgsz = 96
    out = det.save(tmp_path / "saved")
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["use_pretrained_backbone"] is False
    back = load_detector(str(out))
    assert back.label_names == NAMES and back.imgsz == 96 and back.architecture == det.architecture
    batch = make_batch()
    p1, p2 = det.predict(batch, max_detections=20), back.predict(batch, max_detections=20)
    for a, b in zip(p1, p2, strict=True):
        assert len(a["scores"]) == (10 if det.logit_kind == "softmax" else 20)  # DETR: one per query
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
    # pipeline on the same pixels agrees with predict (same normalisation, same post-processing)
    pixels = (batch.images[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    single = Batch(images=pixels.permute(2, 0, 1)[None].float() / 255, sizes=[(64, 96)], orig_sizes=[(64, 96)])
    mine = back.predict(single, score_threshold=0.0, max_detections=100)[0]
    found = pipeline("object-detection", model=str(out), device="cpu")(image, threshold=0.0)
    assert found and {d["label"] for d in found} <= set(NAMES)
    top_pipe = sorted((d["score"] for d in found), reverse=True)[:5]
    assert torch.allclose(torch.tensor(top_pipe), mine["scores"][:5], atol=1e-4)
    best = max(found, key=lambda d: d["score"])["box"]
    box = torch.tensor([best["xmin"], best["ymin"], best["xmax"], best["ymax"]], dtype=torch.float32)
    assert (box - mine["boxes"][0]).abs().max() <= 1.0  # the pipeline rounds to integer pixels


def test_broken_checkpoints(tiny_dirs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["detr"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(KdctlError, match="corrupt"):
        load_detector(str(bad))
    weights.unlink()
    with pytest.raises(KdctlError, match="no weights"):
        load_detector(str(bad))


# --------------------------------------------------------------------------- 7. gradients
@pytest.mark.parametrize("case", ["detr", "table", "dab", "deformable-refine", "deformable-2stage"])
def test_decode_gradients_reach_decoder(tiny_dirs, case):
    det = load_case(tiny_dirs, case)
    det.train()
    out = det.forward_train(make_batch())
    queries = sample_queries(det, 7, generator=torch.Generator().manual_seed(0))
    dec = det.decode(out.taps, queries)
    (dec["logits"].pow(2).mean() + dec["boxes"].mean()).backward()
    decoder = det.model.model.decoder
    for i, layer in enumerate(decoder.layers):
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in decoder layer {i}"
    last = det.num_decoder_layers - 1  # two-stage keeps one more class head, for the encoder proposals
    head = det.model.class_labels_classifier if case in ("detr", "table") else (
        det.model.class_embed if case == "dab" else det.model.class_embed[last])
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_from_scratch_backbone_norms_train_and_reload(tmp_path):
    """Without ImageNet weights the backbone's BatchNorms must train (frozen, they would normalise nothing); a saved
    model keeps them trainable in kdctl and still loads in plain transformers with the same predictions."""
    import transformers
    from torch import nn

    from kdctl.data.batch import collate

    small = {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 5}
    det = load_detector("detr-r18", label_names=["a", "b"], pretrained_backbone=False, overrides=small)
    norms = [m for m in det.model.model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any("Frozen" in type(m).__name__ for m in det.model.model.backbone.modules())
    torch.manual_seed(0)
    batch = collate([(torch.rand(3, 64, 64), {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
                                              "labels": torch.tensor([1]), "orig_size": (64, 64)})] * 2)
    before = norms[0].running_mean.clone()
    det.train()
    sum(det.forward_train(batch).losses.values()).backward()
    assert norms[0].weight.grad is not None and not torch.equal(norms[0].running_mean, before)
    det.save(tmp_path / "m")
    back = load_detector(str(tmp_path / "m"))
    assert any(isinstance(m, nn.BatchNorm2d) for m in back.model.model.backbone.modules())
    plain = transformers.DetrForObjectDetection.from_pretrained(tmp_path / "m").eval()
    det.eval()
    with torch.no_grad():
        pv, mask = det.pixel_inputs(batch)
        ours, theirs = det.model(pixel_values=pv, pixel_mask=mask), plain(pixel_values=pv, pixel_mask=mask)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
    assert torch.allclose(ours.pred_boxes, theirs.pred_boxes, atol=1e-5)


MOBILE = {"encoder_layers": 1, "decoder_layers": 1, "hidden_size": 32, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 5}


def test_mobilenet_backbone_from_torchvision_weights(tmp_path):
    """A torchvision mobilenet_v2 state dict loads into timm's mobilenetv2_100 inside a DAB-DETR, and the backbone
    computes what torchvision's network computes: names mapped in order, and the activations transformers drops
    (timm's BatchNormAct2d swapped for a frozen norm) restored, also after a save/load round trip."""
    import torchvision

    from kdctl.models.detr import backbone_module, restore_backbone_activations

    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad():  # non-trivial statistics, so a dropped or misplaced norm shows
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(ref.state_dict(), tmp_path / "mobilenet_v2.pth")
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        want = ref.features[:18](x)
    det = load_detector("dab-detr-mobilenet-v2-small", label_names=NAMES, pretrained_backbone=False,
                        overrides={**MOBILE, "backbone_weights": str(tmp_path / "mobilenet_v2.pth")})
    net = backbone_module(det.model).eval()
    with torch.no_grad():
        got = net(x)[-1]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    assert restore_backbone_activations(det.model) == 0  # already restored: no second activation
    det.save(tmp_path / "m")
    back = backbone_module(load_detector(str(tmp_path / "m")).model).eval()
    with torch.no_grad():
        assert torch.allclose(back(x)[-1], want, atol=1e-4)
    bad = torchvision.models.resnet18().state_dict()
    torch.save(bad, tmp_path / "resnet18.pth")
    with pytest.raises(KdctlError, match="does not fit"):
        load_detector("dab-detr-mobilenet-v2-small", label_names=NAMES, pretrained_backbone=False,
                      overrides={**MOBILE, "backbone_weights": str(tmp_path / "resnet18.pth")})


def test_mobilenet_backbone_from_scratch_keeps_activations():
    """Built without ImageNet weights (trainable norms), the timm MobileNet backbone still has its activations."""
    from kdctl.models.detr import backbone_module

    det = load_detector("dab-detr-mobilenet-v2-small", label_names=NAMES, pretrained_backbone=False,
                        overrides=MOBILE)
    net = backbone_module(det.model).eval()
    hooked = [m for m in net.modules() if getattr(m, "_kdctl_activation", False)]
    assert len(hooked) > 30 and all(isinstance(m, torch.nn.BatchNorm2d) for m in hooked)
    with torch.no_grad():
        out = net.conv_stem(torch.rand(1, 3, 32, 32))
        assert float(net.bn1(out).min()) >= 0.0  # ReLU6 after the stem's norm


@pytest.mark.parametrize("preset", ["detr-r18", "dab-detr-r18", "conditional-detr-r18", "deformable-detr-r18"])
def test_fresh_queries_use_the_official_initialisation(preset):
    """Presets draw their query embeddings from N(0, 1) as the official code does (transformers' init_std 0.02
    would put every DAB-DETR anchor at about (0.5, 0.5, 0.5, 0.5): identical queries, collapsed predictions)."""
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False, overrides={**SMALL, "num_queries": 100})
    q = det.learned_queries().detach()
    assert 0.5 < float(q.std()) < 2.0
    if preset.startswith("dab"):
        assert float(q.sigmoid().std(0).min()) > 0.1  # anchors spread over the image, not all at the centre


def test_random_refpoints_xy_centres_are_uniform():
    det = load_detector("dab-detr-r18", label_names=NAMES, pretrained_backbone=False,
                        overrides={**SMALL, "num_queries": 200, "random_refpoints_xy": True})
    xy = det.learned_queries().detach()[:, :2].sigmoid()
    assert float(xy.min()) >= 0.0 and float(xy.max()) <= 1.0 and abs(float(xy.mean()) - 0.5) < 0.1
    assert float(xy.std()) > 0.2  # uniform on [0, 1]: std 0.29


@pytest.mark.parametrize("case", ["detr", "dab", "deformable-2stage"])
def test_channels_last_gives_the_same_predictions(tiny_dirs, case):
    """The engine's NHWC layout (``to_channels_last``, on by default) runs the backbone's convolutions channels-last:
    the taps and detections equal the NCHW model's."""
    from kdctl.engine.precision import to_channels_last

    ref, det = load_case(tiny_dirs, case), load_case(tiny_dirs, case)
    to_channels_last(det)
    conv = next(m for m in det.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    batch = make_batch()
    with torch.no_grad():
        a, b = ref.forward_taps(batch), det.forward_taps(batch)
        pa, pb = ref.predict(batch), det.predict(batch)
    assert (a["logits"] - b["logits"]).abs().max() < 1e-4
    assert (a["boxes"] - b["boxes"]).abs().max() < 1e-4
    for x, y in zip(pa, pb, strict=True):  # random models tie many scores: the order among equal scores is free
        assert torch.allclose(x["scores"].sort().values, y["scores"].sort().values, atol=1e-4)
        assert len(x["boxes"]) == len(y["boxes"]) and torch.cdist(y["boxes"], x["boxes"]).min(1).values.max() < 0.5


@pytest.mark.parametrize("case", ["deformable", "deformable-refine"])
def test_decode_at_given_reference_points(tiny_dirs, case):
    """embed2 queries decoded at the recorded ``taps["reference_points"]`` reproduce the forward (the same points as
    the model's own head); other points move the boxes (they really are used)."""
    det = load_case(tiny_dirs, case)
    with torch.no_grad():
        taps = det.forward_taps(make_batch())
        ref = taps["reference_points"]
        assert ref.shape == (2, 10, 2)
        same = det.decode_groups(taps, [det.learned_queries()], [ref])[0]
        moved = det.decode_groups(taps, [det.learned_queries()], [(ref + 0.2).clamp(0, 1)])[0]
    tol = rounding_level(det, taps, det.learned_queries().detach(), same)  # measured: exactly 0 (same operations)
    assert all(float((same[k] - taps[k]).abs().max()) <= tol for k in ("boxes", "logits"))
    assert float((moved["boxes"] - taps["boxes"]).abs().max()) > 100 * tol


def test_table_transformer_variant(tiny_dirs, tmp_path):
    """Table Transformer (microsoft/table-transformer-detection: a DETR with the older decoder keyword names) is one
    variant class plus one registry line: resolved by its model_type, decoded with its own keyword names (its
    queries really reach the decoder), trained a step, distillable with KD-DETR, and round-tripped through save."""
    from kdctl.distill.kd_detr import KDDetrModel, check_pair
    from kdctl.models.detr import VARIANTS_BY_MODEL_TYPE
    from kdctl.models.registry import HF_MODEL_TYPES

    assert HF_MODEL_TYPES["table-transformer"] == "detr"
    det = load_case(tiny_dirs, "table-noaux")
    assert det.variant is VARIANTS_BY_MODEL_TYPE["table-transformer"] and isinstance(det, KDDetrModel)
    assert det.architecture == "TableTransformerForObjectDetection" and det.image_mean == (0.485, 0.456, 0.406)
    sensitised = load_case(tiny_dirs, "table-noaux")
    sensitise(sensitised)
    with torch.no_grad():
        taps = sensitised.forward_taps(make_batch())
        moved = sensitised.decode(taps, sensitised.learned_queries() + 1.0)
    assert {"object_queries", "query_position_embeddings"} <= set(taps["decoder_kwargs"])
    assert (moved["logits"] - taps["logits"]).abs().max() > 1e-3  # the swapped queries are the ones decoded
    det.train()
    sum(det.forward_train(make_batch()).losses.values()).backward()
    assert det.model.class_labels_classifier.weight.grad is not None
    check_pair(det, load_case(tiny_dirs, "detr"))  # same query kind and logit kind as DETR
    det.eval()
    back = load_detector(str(det.save(tmp_path / "saved")))
    assert back.architecture == det.architecture and back.label_names == NAMES
    with torch.no_grad():
        a, b = det.forward_taps(make_batch()), back.forward_taps(make_batch())
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["boxes"], b["boxes"])
