"""DRKD: zero at a perfect match, permutation equivariance, empty images, RoIAlign batch index, gradients, mismatched
pairs, per-image term magnitudes, the relation formula and filters, the ablation switches and an end-to-end
distillation run through the engine.

Tolerances come from float32 precision: a matrix product with reduction length k is off by at most ``k u |A||B|``
(u = eps / 2, Higham), a network output by what a relative eps perturbation of its inputs changes.

Every model is a tiny random kdctl preset (ResNet-18 / MobileNet-V2, 16-32 channel FPN) on 64 px images.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kdctl.data.batch import Batch, collate  # noqa: E402
from kdctl.distill.drkd import (  # noqa: E402
    DRKD,
    REFERENCE_AREA,
    REFERENCE_BOXES,
    REFERENCE_IMAGES,
    GloReUnit,
    RelationBlock,
    glore_mid,
    instance_mask,
    instance_rois,
    pad_instances,
    pool_instances,
)
from kdctl.distill.drkd_modules import PairFilter, RandomFilter  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.models.base import TrainOutput  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["cat", "dog"]
SMALL_RPN = {
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16,
}
TINY = {
    "fasterrcnn-r18-fpn": {"representation_size": 64, **SMALL_RPN},
    "fasterrcnn-mobilenet-v2-fpn": {"representation_size": 64, **SMALL_RPN},
    "retinanet-r18-fpn": {"topk_candidates": 50, "detections_per_img": 20},
    "fcos-r18-fpn": {"topk_candidates": 50, "detections_per_img": 20},
}
BOXES = [[[4.0, 6.0, 40.0, 30.0], [30.0, 10.0, 60.0, 60.0], [8.0, 36.0, 28.0, 60.0]], [[10.0, 10.0, 30.0, 60.0]]]
EPS = torch.finfo(torch.float32).eps


def tiny(preset: str, channels: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return load_detector(preset, label_names=NAMES, pretrained_backbone=False,
                         overrides={"fpn_channels": channels, **TINY[preset]})


def make_batch(boxes: list[list[list[float]]] = BOXES, seed: int = 0) -> Batch:
    """Images of 64x64 and 64x48 (padded to 64x64), ``boxes[i]`` on image i."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 64), (64, 48), (48, 64), (64, 64)]
    samples = [(torch.rand(3, *sizes[i], generator=g),
                {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": [i % 2] * len(b),
                 "orig_size": sizes[i]}) for i, b in enumerate(boxes)]
    return collate(samples)


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    """Frozen-style teachers and trainable students, built once."""
    out = {
        "fr16": tiny("fasterrcnn-r18-fpn", 16, seed=1),
        "fr32": tiny("fasterrcnn-r18-fpn", 32, seed=2),
        "ret16": tiny("retinanet-r18-fpn", 16, seed=3),
    }
    out["fr16"].train()
    out["ret16"].train()
    out["fr32"].eval()
    return out


def taps_of(student, teacher, batch: Batch) -> tuple[TrainOutput, dict]:
    """The engine's calls: student forward_train (taps with graph), teacher forward_taps under no_grad."""
    out = student.forward_train(batch)
    with torch.no_grad():
        t = teacher.forward_taps(batch)
    return out, t


def matched(d: DRKD) -> DRKD:
    """Teacher-side modules = student-side modules, identity adapters (student and teacher widths equal)."""
    d.glore_teacher.load_state_dict(d.glore_student.state_dict())
    d.relation_teacher.load_state_dict(d.relation_student.state_dict())
    for group in (d.pixel_adapt, d.relation_adapt, d.instance_adapt):
        for conv in group.values():
            with torch.no_grad():
                conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
                conv.bias.zero_()
    return d


def matched_bounds(d: DRKD, feats: dict, boxes: list) -> dict[str, float]:
    """Float32 rounding bounds of the terms of a :func:`matched` distiller on identical student and teacher features.

    Both sides compute the same quantity in another order (the folded pixel difference ``E'_s proj_s - E'_t proj_t``,
    identity adapters), so each distance is at most ``k eps || |A| |B| ||`` per product of reduction length k
    (two products, each within ``k u``), times the normalised mode's positive scale.
    """
    counts = [len(b) for b in boxes]
    n_inst = sum(counts)
    with torch.no_grad():
        pixel = 0.0
        for s in d.strides:
            f = feats[s]
            e, p, _ = d.glore_teacher[f"s{s}"].factors(f)
            bound = EPS * (e.shape[-1] * float((e.abs() @ p.abs()).norm()) + f.shape[1] * float(f.norm()))
            n, _, h, w = f.shape
            pixel += bound * (math.sqrt(REFERENCE_IMAGES * REFERENCE_AREA / (n * h * w * s * s)) if d.normalize else 1)
        inst = rel = 0.0
        if n_inst:
            rois = instance_rois(boxes, torch.float32, torch.device("cpu"))
            valid = instance_mask(counts, torch.device("cpu"))
            for s in d.instance_strides:
                x = d.pool(feats[s], rois, s)
                z, _ = d.relation_teacher[f"s{s}"](pad_instances(x.flatten(1), counts), valid)
                inst += EPS * x.shape[1] * float(x.norm())
                rel += EPS * x.shape[1] * float(z.norm())
            scale = REFERENCE_IMAGES * math.sqrt(REFERENCE_BOXES / n_inst) if d.normalize else 1.0
            inst, rel = inst * scale, rel * scale
    return {"kd_pixel": d.w_pixel * pixel, "kd_relation": d.w_relation * rel, "kd_instance": d.w_instance * inst}


def feature_rounding(a: dict, b: dict) -> float:
    """Largest relative difference between two float32 computations of the same FPN features {stride: [N, ...]}
    (a batch of other size runs other GEMM blockings): the rounding level of everything computed from them."""
    return max(float((a[s] - b[s][: len(a[s])]).norm() / a[s].norm()) for s in a) + EPS


def with_features(out: TrainOutput, feats: dict, boxes: list | None = None) -> TrainOutput:
    taps = {**out.taps, "features": feats}
    if boxes is not None:
        taps["boxes"] = boxes
    return TrainOutput(losses=out.losses, taps=taps)


# --------------------------------------------------------------------------- 1. zero at a perfect match
def test_zero_when_features_and_modules_match(models):
    m = models["fr16"]
    batch = make_batch()
    out, t = taps_of(m, m, batch)
    for s in t["features"]:  # forward_train and forward_taps of one model: identical taps
        assert torch.equal(out.taps["features"][s], t["features"][s])
    d = matched(DRKD(m, m))
    terms = d(out, t, batch)
    assert set(terms) == {"kd_pixel", "kd_relation", "kd_instance"}
    bounds = matched_bounds(d, t["features"], out.taps["boxes"])  # zero up to float32 rounding
    assert all(0 <= float(terms[k]) <= bounds[k] for k in terms), (terms, bounds)
    assert max(bounds.values()) < 1e-3 * min(float(v) for v in DRKD(m, m)(out, t, batch).values())  # can tell
    # independent modules (fresh random GloRe / relation / adapters): every term is positive
    fresh = DRKD(m, m)(out, t, batch)
    assert all(float(v) > 0 for v in fresh.values()), fresh
    # matched modules but a different student: positive
    s16 = tiny("fasterrcnn-r18-fpn", 16, seed=5).train()
    other = d(s16.forward_train(batch), t, batch)
    assert all(float(v) > 0 for v in other.values()), other


@pytest.mark.parametrize("normalize", [True, False])
def test_glore_unit_equals_the_direct_form(normalize):
    """The reordered GloRe (BatchNorm folded into node space) computes the direct form: state map, V, (I + A), W,
    Y, extend, BatchNorm2d, residual; same outputs, gradients and running statistics, in train and eval mode; with
    the node states averaged over pixels (/ hw, default) or summed (the official code)."""
    torch.manual_seed(0)
    unit = GloReUnit(12, 4, normalize=normalize).double()
    with torch.no_grad():
        unit.norm.weight.uniform_(0.5, 1.5)
        unit.norm.bias.uniform_(-0.5, 0.5)
    bn = copy.deepcopy(unit.norm)
    x = (torch.randn(2, 12, 5, 7, dtype=torch.float64) * 3 + 1).requires_grad_()

    def direct(x: torch.Tensor) -> torch.Tensor:
        p = unit.conv_proj(x).flatten(2)  # [N, Nn, hw]
        v = unit.conv_state(x).flatten(2) @ p.transpose(1, 2) / (35 if normalize else 1)  # [N, Cs, Nn]
        hid = v + v @ unit.node_mix.weight.T + unit.node_mix.bias
        y = (unit.state_update.weight @ torch.relu(hid) @ p).view(2, 8, 5, 7)
        ext = unit.conv_extend(y)
        bn.num_batches_tracked += int(bn.training)
        return x + torch.nn.functional.batch_norm(ext, bn.running_mean, bn.running_var, unit.norm.weight,
                                                  unit.norm.bias, bn.training, bn.momentum, bn.eps)

    probe = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    grads = []
    for f in (unit, direct):
        out = f(x)
        grads.append(torch.autograd.grad((out * probe).sum(), [x, *unit.parameters()]))
        grads[-1] = (out.detach(), *grads[-1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(unit.norm.running_mean, bn.running_mean)
    torch.testing.assert_close(unit.norm.running_var, bn.running_var)
    assert int(unit.norm.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    unit.eval()
    bn.eval()
    with torch.no_grad():
        torch.testing.assert_close(unit(x), direct(x))


# --------------------------------------------------------------------------- 2. permutation equivariance
def test_relation_block_is_permutation_equivariant_and_padding_free():
    torch.manual_seed(0)
    block = RelationBlock(dim=36, inter=12, filter_hidden=8)
    x = torch.randn(1, 5, 36)
    valid = torch.ones(1, 5, dtype=torch.bool)
    perm = torch.tensor([3, 0, 4, 1, 2])
    z, a = block(x, valid)
    zp, ap = block(x[:, perm], valid)
    torch.testing.assert_close(zp, z[:, perm])
    torch.testing.assert_close(ap, a[:, perm][:, :, perm])
    assert torch.allclose(a.sum(-1), torch.ones(1, 5)) and not torch.allclose(a, torch.full_like(a, 0.2), atol=1e-3)
    # padding: image 1 has 2 of 5 slots; its real rows equal running it alone, padding is never attended to
    pad = torch.cat([x, torch.cat([x[:, :2], torch.zeros(1, 3, 36)], 1)])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    zb, ab = block(pad, mask)
    z2, _ = block(x[:, :2], torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(zb[1, :2], z2[0])
    assert float(ab[1, :2, 2:].abs().sum()) == 0.0 and torch.isfinite(zb).all()
    # one instance: the relation is trivial, z = x + W(g(x))
    z1, a1 = block(x[:, :1], torch.ones(1, 1, dtype=torch.bool))
    assert a1.shape == (1, 1, 1) and float(a1) == 1.0
    torch.testing.assert_close(z1, x[:, :1] + block.W(block.g(x[:, :1])))


def relation_by_hand(block: RelationBlock, x: torch.Tensor, m: torch.Tensor | None) -> tuple:
    """The design note's formula on one image, x [K, D]: L = theta(x) phi(x)^T, A = softmax_row(L * M),
    z = x + W(A g(x)) (M = None: A = softmax_row(L))."""
    lmat = block.theta(x) @ block.phi(x).T
    a = (lmat * m if m is not None else lmat).softmax(-1)
    return x + block.W(a @ block.g(x)), a


def test_relation_formula_of_every_filter():
    """Pins A = softmax_row(L * M) with M = softmax_row(filter(x)) for the learned, random and no filter: replacing
    ``*`` by ``+`` (or dropping M) gives another A, which the test tells apart."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 36) * 2
    valid = torch.ones(1, 5, dtype=torch.bool)
    for kind in ("learned", "random", "none"):
        block = RelationBlock(dim=36, inter=12, filter_hidden=8, filter_kind=kind)
        with torch.no_grad():
            z, a = block(x, valid)
            if kind == "learned":
                f = block.filter
                m = (f.score(torch.relu(f.left(x[0])[:, None] + f.right(x[0])[None, :]))).squeeze(-1).softmax(-1)
            elif kind == "random":
                w, b = block.filter.linear(5, x.device)
                m = (x[0] @ w.T + b).softmax(-1)
            else:
                m = None
            z_ref, a_ref = relation_by_hand(block, x[0], m)
            torch.testing.assert_close(a[0], a_ref)  # float32 defaults: the same products in the same order
            torch.testing.assert_close(z[0], z_ref)
            if m is not None:  # the test can see a wrong formula
                lmat = block.theta(x[0]) @ block.phi(x[0]).T
                for wrong in ((lmat + m).softmax(-1), lmat.softmax(-1)):
                    assert float((wrong - a[0]).abs().max()) > 1e-2
    assert not list(RelationBlock(36, 12, filter_kind="random").filter.parameters())
    assert RelationBlock(36, 12, filter_kind="none").filter is None


def test_random_filter_is_fixed_per_run_and_checkpointed():
    """The official untrained Linear(D, K), drawn once per run: the same at every step, the first K rows for K
    boxes, restored from the checkpoint, another with another seed; nn.Linear's init range +-1/sqrt(D)."""
    torch.manual_seed(0)
    f = RandomFilter(36)
    x = torch.randn(2, 6, 36)
    first = f(x)
    assert torch.equal(f(x), first)  # exact: the same weights, the same product
    w6, b6 = f.linear(6, x.device)
    w3, _ = f.linear(3, x.device)
    assert torch.equal(w3, w6[:3]) and float(w6.abs().max()) <= 1 / 6 and float(b6.abs().max()) <= 1 / 6
    assert float(w6.std()) > 0.5 / 6 / math.sqrt(3)  # uniform in +-1/6: std 1/(6 sqrt 3)
    fresh = RandomFilter(36, seed=f.seed + 7)
    assert not torch.allclose(fresh(x), first)
    fresh.load_state_dict(f.state_dict())
    assert torch.equal(fresh(x), first)
    torch.manual_seed(0)
    assert RandomFilter(36).seed == f.seed  # the run's seed fixes it
    # in DRKD, the filter is an option; the learned one is the default
    t = SimpleNamespace(fpn_strides=[4, 8], fpn_channels=16, architecture="fasterrcnn")
    d = DRKD(t, t, relation_filter="random")
    assert isinstance(d.relation_student["s4"].filter, RandomFilter)
    assert not any(".filter." in n for n, _ in d.named_parameters())
    assert any(k.endswith("filter._extra_state") for k in d.state_dict())
    assert isinstance(DRKD(t, t).relation_student["s4"].filter, PairFilter)
    assert DRKD(t, t, relation_filter="none").relation_teacher["s8"].filter is None
    with pytest.raises(KdctlError, match="relation_filter 'fixed'"):
        DRKD(t, t, relation_filter="fixed")


def test_loss_is_invariant_to_box_order(models):
    student, teacher = models["ret16"], models["fr32"]
    batch = make_batch()
    out, t = taps_of(student, teacher, batch)
    torch.manual_seed(0)
    d = DRKD(teacher, student)
    ref = d(out, t, batch)
    perm_boxes = [b[torch.tensor([2, 0, 1])] for b in out.taps["boxes"][:1]] + out.taps["boxes"][1:]
    permuted = d(with_features(out, out.taps["features"], perm_boxes), t, batch)
    for k in ref:
        torch.testing.assert_close(permuted[k], ref[k], rtol=1e-5, atol=0)
    # a different box set changes the instance terms (the boxes are really used)
    moved = [b + 4.0 for b in out.taps["boxes"]]
    changed = d(with_features(out, out.taps["features"], moved), t, batch)
    assert float(changed["kd_instance"]) != pytest.approx(float(ref["kd_instance"]), rel=1e-4)


# --------------------------------------------------------------------------- 3. empty images, one box
def test_zero_and_one_box_images(models):
    student, teacher = models["ret16"], models["fr32"]
    batch = make_batch([[], [[10.0, 10.0, 30.0, 60.0]]])
    out, t = taps_of(student, teacher, batch)
    d = DRKD(teacher, student)
    terms = d(out, t, batch)
    assert all(torch.isfinite(v) and float(v) > 0 for v in terms.values()), terms
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
    # the empty image contributes nothing: changing its features changes only the pixel term
    noisy = {s: f.detach() + torch.randn_like(f) * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
             for s, f in out.taps["features"].items()}
    base = d(with_features(out, {s: f.detach() for s, f in out.taps["features"].items()}), t, batch)
    moved = d(with_features(out, noisy), t, batch)
    assert float(moved["kd_pixel"]) != pytest.approx(float(base["kd_pixel"]))
    torch.testing.assert_close(moved["kd_instance"], base["kd_instance"])
    torch.testing.assert_close(moved["kd_relation"], base["kd_relation"])
    # no box at all: the instance terms are exactly zero, the pixel term is not
    empty = make_batch([[], []])
    out0, t0 = taps_of(student, teacher, empty)
    terms0 = d(out0, t0, empty)
    assert float(terms0["kd_relation"]) == 0.0 and float(terms0["kd_instance"]) == 0.0
    assert float(terms0["kd_pixel"]) > 0


# --------------------------------------------------------------------------- 4. RoIAlign batch index
def test_roi_align_pools_each_box_from_its_own_image():
    feature = torch.zeros(2, 4, 8, 8)
    feature[1] = 1.0
    feature[1, 2] = 3.0
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[8.0, 8.0, 40.0, 56.0], [0.0, 0.0, 64.0, 64.0]])]
    rois = instance_rois(boxes, torch.float32, torch.device("cpu"))
    assert rois[:, 0].tolist() == [0.0, 1.0, 1.0]
    pooled = pool_instances(feature, rois, stride=8)  # [3, 4, 3, 3]
    assert pooled.shape == (3, 4, 3, 3)
    assert float(pooled[0].abs().max()) == 0.0  # image 0's box: image 0's zeros
    expected = torch.tensor([1.0, 1.0, 3.0, 1.0]).view(4, 1, 1).expand(4, 3, 3)
    torch.testing.assert_close(pooled[1], expected)  # image 1's boxes: image 1's values (the official code: 0)
    torch.testing.assert_close(pooled[2], expected)
    # coordinates: aligned=True maps pixel x to feature x / stride - 0.5 (cell i is centred on pixel (i + 0.5) * 8):
    # the 3 bins of the box x in [8, 32] are centred on pixels 12, 20, 28 = cells 1, 2, 3 of a ramp f[.., x] = x
    ramp = torch.arange(8.0).expand(1, 1, 8, 8).contiguous()
    row = pool_instances(ramp, torch.tensor([[0.0, 8.0, 8.0, 32.0, 32.0]]), stride=8)[0, 0]
    torch.testing.assert_close(row, torch.tensor([1.0, 2.0, 3.0]).expand(3, 3))
    # bf16 features under autocast: the box keeps its float32 coordinates (bf16 would move x = 1001.3 to 1000)
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 4, 300, 300, generator=g)
    far = torch.tensor([[0.0, 1001.3, 1003.7, 1100.2, 1150.9]])
    ref = pool_instances(fmap, far, stride=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pool_instances(fmap.bfloat16(), far, stride=4)
    assert float((low.float() - ref).abs().max()) < 0.01


def test_distiller_uses_the_right_image(models):
    """Image 0 has no box and a perturbed student feature; image 1 matches the teacher exactly. Pooling image 1's
    boxes from image 1 gives zero instance terms; pooling them from image 0 (the official defect) would not."""
    m = models["fr16"]
    batch = make_batch([[], BOXES[0]])
    out, t = taps_of(m, m, batch)
    d = matched(DRKD(m, m))
    g = torch.Generator().manual_seed(0)
    noisy = {s: f.detach() + torch.randn(f.shape, generator=g) * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
             for s, f in out.taps["features"].items()}
    terms = d(with_features(out, noisy), t, batch)
    bounds = matched_bounds(d, t["features"], out.taps["boxes"])  # image 1 matches: zero up to float32 rounding
    assert float(terms["kd_instance"]) <= bounds["kd_instance"] and float(terms["kd_relation"]) <= bounds["kd_relation"]
    assert float(terms["kd_pixel"]) > 0
    flipped = {s: f.flip(0) for s, f in noisy.items()}  # now image 1 holds the perturbed features
    terms = d(with_features(out, flipped), t, batch)
    assert float(terms["kd_instance"]) > 0 and float(terms["kd_relation"]) > 0


# --------------------------------------------------------------------------- 5. gradients
def test_gradients_reach_student_and_distiller_never_teacher():
    teacher = tiny("fasterrcnn-r18-fpn", 32, seed=2).eval()  # parameters left requiring grad on purpose
    student = tiny("retinanet-r18-fpn", 16, seed=3).train()
    batch = make_batch()
    d = DRKD(teacher, student)
    out = student.forward_train(batch)
    terms = d(out, d.teacher_taps(batch), batch)
    sum(terms.values()).backward()
    missing = [n for n, p in d.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not missing, missing
    groups = {n.split(".")[0] for n, _ in d.named_parameters()}
    assert groups == {"glore_student", "glore_teacher", "pixel_adapt", "relation_student", "relation_teacher",
                      "relation_adapt", "instance_adapt"}
    assert any(".filter." in n for n, _ in d.named_parameters())
    fpn = [p for n, p in student.model.named_parameters() if "fpn" in n and ".p7." not in n]  # P7: no teacher level
    assert fpn and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in fpn)
    body = student.model.backbone.body.layer4[0].conv1.weight
    assert body.grad is not None and float(body.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert "teacher" not in dict(d.named_children()) and not any(k.startswith("teacher") for k in d.state_dict())


# --------------------------------------------------------------------------- 6. mismatched pairs
@pytest.mark.parametrize("teacher_preset,tch,student_preset,sch,strides", [
    ("fasterrcnn-r18-fpn", 32, "fasterrcnn-r18-fpn", 16, [4, 8, 16, 32, 64]),  # widths 16 -> 32
    ("fasterrcnn-r18-fpn", 32, "retinanet-r18-fpn", 16, [8, 16, 32, 64]),  # families: shared strides only
    ("fcos-r18-fpn", 32, "fasterrcnn-mobilenet-v2-fpn", 16, [8, 16, 32, 64]),  # backbones resnet18 / mobilenet_v2
])
def test_mismatched_pairs(teacher_preset, tch, student_preset, sch, strides):
    teacher = tiny(teacher_preset, tch, seed=2).eval()
    student = tiny(student_preset, sch, seed=3).train()
    d = DRKD(teacher, student)
    assert d.strides == strides and d.instance_strides == strides[:2]
    assert d.pixel_adapt[f"s{strides[0]}"].weight.shape == (tch, sch, 1, 1)
    assert d.relation_teacher[f"s{strides[0]}"].theta.in_features == tch * 9
    assert d.relation_student[f"s{strides[0]}"].theta.in_features == sch * 9
    batch = make_batch()
    out = student.forward_train(batch)
    t = d.teacher_taps(batch)
    terms = d(out, t, batch)
    assert all(torch.isfinite(v) and float(v) > 0 for v in terms.values()), terms
    sum(terms.values()).backward()
    # the folded pixel difference equals the direct f(G^s(S)) - G^t(T) on every shared level
    with torch.no_grad():
        for s in strides:
            k, fs, ft = f"s{s}", out.taps["features"][s], t["features"][s]
            direct = d.pixel_adapt[k](d.glore_student[k](fs)) - d.glore_teacher[k](ft)
            torch.testing.assert_close(d.pixel_difference(k, fs, ft), direct.flatten(2), rtol=1e-4, atol=1e-4)
    # default weights follow the student's architecture (official values)
    expected = (1e-3, 4e-3, 2.4e-3) if student.architecture == "fasterrcnn" else (4e-3, 5e-3, 6e-3)
    assert (d.w_pixel, d.w_relation, d.w_instance) == expected


def test_refusals_and_sizes():
    t = SimpleNamespace(fpn_strides=[4, 8], fpn_channels=16, architecture="fasterrcnn")
    s = SimpleNamespace(fpn_strides=[16, 32], fpn_channels=16, architecture="retinanet")
    with pytest.raises(KdctlError, match=r"share none") as e:
        DRKD(t, s)
    assert "\n" not in str(e.value)
    with pytest.raises(KdctlError, match="no FPN"):
        DRKD(SimpleNamespace(architecture="DetrForObjectDetection"), s)
    with pytest.raises(KdctlError, match=r"unknown key\(s\) pixle"):
        DRKD(t, t, pixle=1.0)
    with pytest.raises(KdctlError, match="relation must be a finite number"):
        DRKD(t, t, relation=-1.0)
    d = DRKD(t, SimpleNamespace(fpn_strides=[4, 8, 16], fpn_channels=32, architecture="fasterrcnn"), pixel=0.5)
    assert d.strides == [4, 8] and d.w_pixel == 0.5 and d.w_relation == 4e-3
    assert d.glore_student["s4"].nodes == 8 and d.glore_teacher["s4"].nodes == 4
    # mid: the official 64 / 256 at 256 channels, scaled down with narrower FPNs, not up with wider ones
    assert [glore_mid(c, True) for c in (16, 128, 256, 512)] == [4, 32, 64, 64]
    assert [glore_mid(c, False) for c in (16, 128, 256, 512)] == [16, 128, 256, 256]
    # relation width: min(relation_dim, D // 2); 0 restores the official D // 2
    assert d.relation_student["s4"].theta.out_features == 144
    assert DRKD(t, t, relation_dim=0).relation_student["s4"].theta.out_features == 72
    assert DRKD(t, t, relation_dim=50).relation_student["s4"].theta.out_features == 50
    assert DRKD(t, t).relation_student["s4"].theta.out_features == 72  # default: the official D // 2
    # GloRe node states: averaged over pixels by default, summed (official) as an option
    assert DRKD(t, t).glore_student["s4"].normalize and not DRKD(t, t, glore_normalize=False).glore_student["s8"].normalize


# --------------------------------------------------------------------------- per-image magnitudes (normalised mode)
def repeat_batch(batch: Batch, times: int) -> Batch:
    return Batch(images=batch.images.repeat(times, 1, 1, 1), sizes=batch.sizes * times,
                 orig_sizes=batch.orig_sizes * times, targets=batch.targets * times, image_ids=batch.image_ids * times)


def test_default_terms_are_per_image_whatever_the_batch(models):
    """Issue #14: the default gives each term the reference magnitude per image: the same two images repeated to a
    batch of 8 give the terms of the batch of 2. The official sums (normalize = False) would not: pixel x2 (one norm
    over 4x the elements), instance and relation x4 (a sum over 4x the images)."""
    student, teacher = models["ret16"], models["fr32"]
    b2 = make_batch()
    b8 = repeat_batch(b2, 4)
    torch.manual_seed(0)
    default = DRKD(teacher, student)
    assert default.normalize
    raw = DRKD(teacher, student, normalize=False)
    raw.load_state_dict(default.state_dict())
    with torch.no_grad():
        o2, t2 = taps_of(student, teacher, b2)
        o8, t8 = taps_of(student, teacher, b8)
        d2, d8 = default(o2, t2, b2), default(o8, t8, b8)
        r2, r8 = raw(o2, t2, b2), raw(o8, t8, b8)
    # the batch of 8 runs other GEMM blockings: features (and terms) agree to their measured rounding level
    rtol = 8 * (feature_rounding(o2.taps["features"], o8.taps["features"])
                + feature_rounding(t2["features"], t8["features"]))
    for k in d2:
        torch.testing.assert_close(d8[k], d2[k], rtol=rtol, atol=0)
    torch.testing.assert_close(r8["kd_pixel"], r2["kd_pixel"] * 2, rtol=rtol, atol=0)
    torch.testing.assert_close(r8["kd_instance"], r2["kd_instance"] * 4, rtol=rtol, atol=0)
    torch.testing.assert_close(r8["kd_relation"], r2["kd_relation"] * 4, rtol=rtol, atol=0)
    assert rtol < 1e-3  # far below the factors 2 and 4 the test tells apart
    # the normalised term is the official distance times sqrt(reference elements / elements): for one level
    # (stride 8) of 2 images of 64x64, sqrt(2 * 800 * 1333 / (2 * 64 * 64)); instances: 2 * sqrt(7.3 / 4 boxes)
    one, one_raw = DRKD(teacher, student, pixel=1.0), DRKD(teacher, student, pixel=1.0, normalize=False)
    for x in (one, one_raw):
        x.load_state_dict(default.state_dict())
        x.strides = [8]
    with torch.no_grad():
        n, r = one(o2, t2, b2), one_raw(o2, t2, b2)
    assert float(n["kd_pixel"]) == pytest.approx(float(r["kd_pixel"]) * math.sqrt(800 * 1333 / (64 * 64)), rel=8 * EPS)
    # instances: the batch's RMS over all boxes, not the official sum of per-image norms: compare with the direct form
    with torch.no_grad():
        direct = 0.0
        rois = instance_rois(o2.taps["boxes"], torch.float32, torch.device("cpu"))
        for s in default.instance_strides:
            xs, xt = default.pool(o2.taps["features"][s], rois, s), default.pool(t2["features"][s], rois, s)
            direct += float((default.instance_adapt[f"s{s}"](xs) - xt).norm())
    assert float(d2["kd_instance"]) == pytest.approx(default.w_instance * direct * 2 * math.sqrt(7.3 / 4), rel=1e-5)


# --------------------------------------------------------------------------- 7. end to end through the engine
def test_engine_distill_run(tmp_path):
    from kdctl.data.synth import CLASSES, synthesize
    from kdctl.engine.checkpoint import load_trainer_state
    from kdctl.engine.config import RunConfig
    from kdctl.engine.trainer import Trainer

    data = tmp_path / "data"
    synthesize(data, 8, seed=0)
    torch.manual_seed(0)
    teacher = load_detector("fasterrcnn-r18-fpn", label_names=list(CLASSES), pretrained_backbone=False,
                            overrides={"fpn_channels": 32, **TINY["fasterrcnn-r18-fpn"]})
    student = load_detector("retinanet-r18-fpn", label_names=list(CLASSES), pretrained_backbone=False,
                            overrides={"fpn_channels": 16, "trainable_layers": 5, **TINY["retinanet-r18-fpn"]})
    tdir, sdir = teacher.save(tmp_path / "teacher"), student.save(tmp_path / "student")
    cfg = RunConfig(task="distill", teacher=str(tdir), model=str(sdir), data=str(data), max_steps=2, batch_size=2,
                    imgsz=64, device="cpu", workers=0, quiet=True, output=str(tmp_path / "runs"), log_every=1)
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.method == "drkd" and isinstance(trainer.distiller, DRKD)
    assert (trainer.distiller.w_pixel, trainer.distiller.w_relation, trainer.distiller.w_instance) == (4e-3, 5e-3,
                                                                                                        6e-3)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        for k in ("kd_pixel", "kd_relation", "kd_instance"):
            assert math.isfinite(r[k]) and r[k] >= 0, (k, r)
        assert r["kd_pixel"] > 0
    state = load_trainer_state(result.run_dir / "last")["distiller"]
    assert any(k.startswith("glore_teacher.") for k in state) and any(".filter." in k for k in state)


@pytest.mark.parametrize("student_preset,recipe", [("retinanet-r18-fpn", "cnn"), ("fasterrcnn-r18-fpn", "retinanet")])
def test_default_weights_follow_the_student_whatever_the_recipe(tmp_path, student_preset, recipe):
    """A recipe made for another architecture (an FCOS / RetinaNet student on --recipe cnn, a Faster R-CNN student on
    --recipe retinanet) does not hand the student that architecture's DRKD weights; an explicit value still wins."""
    from kdctl.data.synth import CLASSES, synthesize
    from kdctl.engine.config import RunConfig
    from kdctl.engine.trainer import Trainer
    from kdctl.models.cnn.architectures import architecture_of

    synthesize(tmp_path / "data", 4, seed=0)
    torch.manual_seed(0)
    models = {}
    for role, preset in (("teacher", "fasterrcnn-r18-fpn"), ("student", student_preset)):
        m = load_detector(preset, label_names=list(CLASSES), pretrained_backbone=False,
                          overrides={"fpn_channels": 16, **TINY[preset]})
        models[role] = str(m.save(tmp_path / role))
    expected = architecture_of(student_preset).drkd_weights
    for kd, want in (({}, expected), ({"drkd": {"relation": 0.5}}, (expected[0], 0.5, expected[2]))):
        cfg = RunConfig(task="distill", teacher=models["teacher"], model=models["student"], data=str(tmp_path / "data"),
                        max_steps=1, batch_size=2, imgsz=64, device="cpu", workers=0, quiet=True, recipe=recipe,
                        output=str(tmp_path / "runs"), kd=kd)
        trainer = Trainer(cfg)
        trainer.run()
        d = trainer.distiller
        assert (d.w_pixel, d.w_relation, d.w_instance) == want


# --------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_matches_float32(models):
    student, teacher = models["ret16"], models["fr32"]
    batch = make_batch()
    torch.manual_seed(0)
    d = DRKD(teacher, student)
    with torch.no_grad():
        out, t = taps_of(student, teacher, batch)
        ref = d(out, t, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = d(with_features(out, {s: f.bfloat16() for s, f in out.taps["features"].items()}),
                    {**t, "features": {s: f.bfloat16() for s, f in t["features"].items()}}, batch)
    for k in ref:
        assert low[k].dtype == torch.float32 and torch.isfinite(low[k])
        assert float(low[k]) == pytest.approx(float(ref[k]), rel=0.05), k


def test_channels_last_gives_the_same_terms_and_gradients():
    """The engine's default NHWC layout (teacher, student and distiller moved with ``to_channels_last``) changes
    only how the convolutions run: every DRKD term, the student's detection losses and the gradients equal the
    NCHW run's to float tolerance, and the activations really are channels-last."""
    from kdctl.engine.precision import to_channels_last

    batch = make_batch()

    def run(nhwc: bool):
        teacher = tiny("fasterrcnn-r18-fpn", 32, seed=2).eval()
        student = tiny("fasterrcnn-r18-fpn", 16, seed=1).train()
        torch.manual_seed(7)
        d = DRKD(teacher, student).train()
        if nhwc:
            to_channels_last(teacher, student, d)
        out, t = taps_of(student, teacher, batch)
        terms = d(out, t, batch)
        total = sum(terms.values()) + sum(out.losses.values())
        total.backward()
        grads = {f"s.{k}": p.grad for k, p in student.named_parameters() if p.grad is not None}
        grads.update({f"d.{k}": p.grad for k, p in d.named_parameters() if p.grad is not None})
        feat = out.taps["features"][min(out.taps["features"])]
        return {k: float(v) for k, v in {**terms, **out.losses}.items()}, grads, feat

    ref_terms, ref_grads, ref_feat = run(False)
    terms, grads, feat = run(True)
    assert ref_feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last)
    assert terms.keys() == ref_terms.keys()
    for k in ref_terms:
        assert terms[k] == pytest.approx(ref_terms[k], rel=1e-4, abs=1e-6), k
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert torch.allclose(grads[k], ref_grads[k], rtol=1e-3, atol=1e-5), k
