"""EMA of the student's weights (kdctl.engine.ema) and the recipe's [augment] table (kdctl.data.augment)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import tv_tensors

from kdctl.data.augment import (
    AugmentBatchSampler,
    AugmentPipeline,
    RandomIoUCropP,
    parse_augment,
    resolve_stop_epoch,
)
from kdctl.data.dataset import shutdown_workers
from kdctl.engine.checkpoint import load_trainer_state
from kdctl.engine.config import RunConfig, apply_recipe, load_recipe, read_config
from kdctl.engine.ema import ModelEMA, build_ema, ema_settings
from kdctl.engine.sampler import ResumableSampler
from kdctl.engine.trainer import Trainer, train
from kdctl.errors import KdctlError

AUG = {"photometric": 0.5, "zoom_out": {"fill": 0, "p": 0.5}, "iou_crop": {"p": 0.8}, "multiscale": [64, 96, 128],
       "stop_epoch": 2}


def cfg(tmp_path, model, data, **kw) -> RunConfig:
    base = dict(task="train", model=model, data=str(data), max_steps=4, batch_size=2, imgsz=64, device="cpu",
                workers=0, output=str(tmp_path / "runs"), quiet=True, log_every=1, seed=0)
    base.update(kw)
    return RunConfig(**base)


# ---------------------------------------------------------------------------------------------------- EMA
def test_ema_follows_the_official_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9999, warmups=2000)
    assert ema.decay_at(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model[1].num_batches_tracked += 5
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-n / 2000))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expect[k] = expect[k] * d + (1 - d) * v
    got = ema.module.state_dict()
    for k, v in expect.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    # early updates follow the raw weights (warm-up), a plain 0.9999 average would barely move
    assert (got["0.weight"] - model[0].weight).abs().max() < 0.01
    assert int(got["1.num_batches_tracked"]) == 0  # integer buffers keep the copy's values, as the official EMA
    assert not any(p.requires_grad for p in ema.module.parameters())
    # state round trip
    other = ModelEMA(model)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(torch.equal(other.module.state_dict()[k], got[k]) for k in got)


def test_ema_averages_a_tied_weight_once():
    a = nn.Linear(2, 2, bias=False)
    model = nn.Sequential(a, nn.Linear(2, 2, bias=False))
    model[1].weight = a.weight  # tied (a state dict lists it twice)
    ema = ModelEMA(model, decay=0.5, warmups=1)
    before = a.weight.detach().clone()
    with torch.no_grad():
        a.weight.add_(1.0)
    ema.update(model)
    d = 0.5 * (1 - math.exp(-1))
    assert torch.allclose(ema.module[0].weight, before * d + (1 - d) * a.weight, atol=1e-6)
    assert ema.module[1].weight is ema.module[0].weight


def test_ema_settings():
    assert ema_settings(True) == {"decay": 0.9999, "warmups": 2000}
    assert ema_settings(None)["decay"] == 0.0 and ema_settings(False)["decay"] == 0.0
    assert ema_settings({"decay": 0.99}) == {"decay": 0.99, "warmups": 2000}
    assert build_ema({"decay": 0.0, "warmups": 2000}, nn.Linear(1, 1)) is None
    assert build_ema({}, nn.Linear(1, 1)) is None
    assert isinstance(build_ema({"decay": 0.9}, nn.Linear(1, 1)), ModelEMA)


# ---------------------------------------------------------------------------------------------------- recipes
def test_rtdetr_recipe_has_the_official_values():
    c = apply_recipe(RunConfig(), load_recipe("rtdetr"))
    assert c.ema == {"decay": 0.9999, "warmups": 2000}
    o = c.optim
    assert (o["optimizer"], o["lr"], o["weight_decay"], o["clip_grad"]) == ("adamw", 1e-4, 1e-4, 0.1)
    assert o["lr"] * o["backbone_lr_mult"] == pytest.approx(1e-5)
    assert o["warmup_steps"] == 2000 and o["milestones"] == [] and o["lr_scaling"] == "none"
    plan = parse_augment(c.augment)
    assert plan.photometric == 0.5 and plan.zoom_out["fill"] == 0 and plan.iou_crop["p"] == 0.8
    assert sorted(set(plan.multiscale)) == list(range(480, 801, 32)) and plan.multiscale.count(640) == 3
    assert resolve_stop_epoch(plan.stop_epoch, c.epochs) == 71 == c.epochs - 1  # official: epoch 71 of 72
    assert "kd-detr" in c.kd  # inherits the DETR family's KD weights


@pytest.mark.parametrize("recipe", ["cnn", "retinanet", "detr"])
def test_existing_recipes_have_no_ema_and_no_augment(recipe):
    c = apply_recipe(RunConfig(), load_recipe(recipe))
    assert c.ema["decay"] == 0.0 and c.augment == {} and parse_augment(c.augment) is None


def test_a_recipe_file_starts_from_a_preset_and_can_drop_its_ema_and_augment(tmp_path):
    (tmp_path / "plain.toml").write_text('base = "rtdetr"\naugment = false\n[train]\nema = false\nepochs = 12\n'
                                         '[optim]\nlr = 2e-4\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.toml").write_text('base = "../plain.toml"\n[optim]\nclip_grad = 1.0\n')
    c = apply_recipe(RunConfig(), load_recipe(str(tmp_path / "sub" / "child.toml")))
    official = apply_recipe(RunConfig(), load_recipe("rtdetr"))
    assert c.ema["decay"] == 0.0 and c.augment == {} and parse_augment(c.augment) is None and c.epochs == 12
    assert c.optim["lr"] == 2e-4 and c.optim["clip_grad"] == 1.0  # the file's keys win, key by key
    assert {k: v for k, v in c.optim.items() if k not in ("lr", "clip_grad")} == \
        {k: v for k, v in official.optim.items() if k not in ("lr", "clip_grad")}
    assert c.kd == official.kd
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    for bad, match in ((tmp_path / "missing.toml", "cannot be read"), (tmp_path / "loop.toml", "comes back")):
        with pytest.raises(KdctlError, match=match):
            load_recipe(str(bad))
    (tmp_path / "bad.toml").write_text('augment = 3\n')
    with pytest.raises(KdctlError, match="augment must be a table or false"):
        apply_recipe(RunConfig(), load_recipe(str(tmp_path / "bad.toml")))


def test_a_run_records_its_recipe_file_absolutely(tmp_path, tiny_retinanet, synth, monkeypatch):
    (tmp_path / "mine.toml").write_text('base = "retinanet"\n[optim]\nlr = 0.002\n')
    monkeypatch.chdir(tmp_path)
    r = train(cfg(tmp_path, tiny_retinanet, synth, max_steps=1, eval_every=100, recipe="mine.toml"))
    c, _ = read_config(r.run_dir / "config.toml")
    assert c.recipe == str(tmp_path / "mine.toml") and c.optim["lr"] == 0.002


def test_augment_table_is_checked():
    with pytest.raises(KdctlError, match="unknown key"):
        parse_augment({"mosaic": 1.0})
    with pytest.raises(KdctlError, match="stop_epoch"):
        parse_augment({"stop_epoch": "last"})
    with pytest.raises(KdctlError, match="multiscale"):
        parse_augment({"multiscale": [640, "800"]})
    assert parse_augment({"zoom_out": 0.3}).zoom_out == {"fill": 0, "side_range": [1.0, 4.0], "p": 0.3}
    assert parse_augment({"iou_crop": False}).iou_crop is None
    assert resolve_stop_epoch(None, 10) is None and resolve_stop_epoch(0.9, 10) == 9
    assert resolve_stop_epoch(-3, 120) == 117 and resolve_stop_epoch(5, 10) == 5


# ---------------------------------------------------------------------------------------------------- pipeline
def sample(h=120, w=160):
    g = torch.Generator().manual_seed(1)
    img = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [80.0, 30.0, 150.0, 110.0]])
    return img, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                 "labels": torch.tensor([0, 1])}


def test_pipeline_order_and_stop():
    pipe = AugmentPipeline(parse_augment(AUG), imgsz=64, hflip=0.5)
    names = [type(t).__name__ for t in pipe.ops(True, 96).transforms]
    assert names == ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCropP", "SanitizeBoundingBoxes",
                     "RandomHorizontalFlip", "Resize", "ToDtype", "SanitizeBoundingBoxes"]
    assert [type(t).__name__ for t in pipe.ops(False, 64).transforms] == [
        "RandomHorizontalFlip", "Resize", "ToDtype", "SanitizeBoundingBoxes"]
    outs = []
    for seed in range(12):
        torch.manual_seed(seed)
        img, t = pipe(*sample(), active=True, size=96)
        assert img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1 and max(img.shape[-2:]) == 96
        b = t["boxes"]
        assert len(b) == len(t["labels"]) and (b[:, 2:] - b[:, :2] >= 1).all()
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= img.shape[-1]).all() and (b[:, 3] <= img.shape[-2]).all()
        outs.append(img.shape)
        torch.manual_seed(seed)  # a function of the seed
        again, _ = pipe(*sample(), active=True, size=96)
        assert torch.equal(img, again)
    assert len(set(outs)) > 1  # zoom-out / crop change the aspect ratio
    torch.manual_seed(0)
    img, _ = pipe(*sample(), active=False)
    assert img.shape[-2:] == (48, 64)  # past the stop epoch: only flip + resize to imgsz


def test_iou_crop_probability_and_empty_images():
    crop = RandomIoUCropP(p=0.0)
    img, t = sample()
    assert crop(img, t)[0] is img
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(120, 160)),
             "labels": torch.zeros(0, dtype=torch.int64)}
    assert RandomIoUCropP(p=1.0)(img, empty)[0] is img


def test_batch_sampler_one_size_per_batch_and_resume():
    s = ResumableSampler(23, seed=4)
    bs = AugmentBatchSampler(s, 3, scales=(480, 512, 640, 800), stop_epoch=2)
    s.set_epoch(1)
    full = list(bs)
    assert len(full) == len(bs) == 8 and [len(b) for b in full] == [3] * 7 + [2]
    sizes = [{item[3] for item in b} for b in full]
    assert all(len(x) == 1 for x in sizes)  # one size per batch
    assert len({x.pop() for x in sizes}) > 1  # and it varies between batches
    assert [(i, seed) for b in full for i, seed, *_ in b] == list(s)  # the sampler's own (index, seed)
    s.set_epoch(1, start=9)  # resume after 3 batches: the same batches, the same sizes
    assert list(bs) == full[3:]
    s.set_epoch(2)  # the stop epoch: no multi-scale, stoppable augmentations off
    assert all(item[2:] == (False, None) for b in bs for item in b)
    # the same size on every rank
    r0, r1 = (AugmentBatchSampler(ResumableSampler(24, seed=4, rank=r, world=2), 3, (480, 640, 800)) for r in (0, 1))
    assert [b[0][3] for b in r0] == [b[0][3] for b in r1]


# ---------------------------------------------------------------------------------------------------- runs
def test_loader_batches_do_not_depend_on_workers(tmp_path, tiny_retinanet, synth):
    from kdctl.engine.build import build_loaders, open_data
    from kdctl.engine.distributed import DistInfo

    got = []
    for workers in (0, 2):
        c = cfg(tmp_path, tiny_retinanet, synth, workers=workers, augment=dict(AUG), epochs=3, max_steps=None)
        lo = build_loaders(c, open_data(c, print), DistInfo(), "cpu")
        assert isinstance(lo.loader.batch_sampler, AugmentBatchSampler) and lo.loader.batch_sampler.stop_epoch == 2
        lo.sampler.set_epoch(0)
        got.append([b.images for b in lo.loader])
        shutdown_workers(lo.loader)
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))
    assert {max(x.shape[-2:]) for x in got[0]} <= {64, 96, 128} and len({x.shape for x in got[0]}) > 1


def test_default_run_uses_the_plain_pipeline(tmp_path, tiny_retinanet, synth):
    from kdctl.engine.build import build_loaders, open_data
    from kdctl.engine.distributed import DistInfo

    c = cfg(tmp_path, tiny_retinanet, synth)
    apply_recipe(c, load_recipe("retinanet"))
    lo = build_loaders(c, open_data(c, print), DistInfo(), "cpu")
    assert lo.train_set.augment is None and type(lo.loader.batch_sampler).__name__ == "BatchSampler"


def test_ema_and_augment_run_resumes_bitwise(tmp_path, tiny_retinanet, synth):
    # 7 train images, batch 2 -> 4 steps per epoch; 10 steps = 3 epochs, the last without the augmentations
    kw = dict(max_steps=10, eval_every=100, ema={"decay": 0.9, "warmups": 2}, augment=dict(AUG))
    full = train(cfg(tmp_path, tiny_retinanet, synth, name="full", **kw))

    def stop_at_5(trainer: Trainer) -> None:
        if trainer.pos.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path, tiny_retinanet, synth, name="cut", **kw), on_step=stop_at_5).run()
    cut = tmp_path / "runs" / "train" / "cut"
    st = load_trainer_state(cut / "last")
    assert st["step"] == 5 and st["ema"]["updates"] == 5
    resumed = train(resume=cut)
    assert resumed.steps == 10
    c, _ = read_config(cut / "config.toml")
    assert c.ema == {"decay": 0.9, "warmups": 2} and c.augment["multiscale"] == [64, 96, 128]
    for which in ("last", "best"):
        a, b = (load_file(str(Path(r) / which / "model.safetensors")) for r in (full.run_dir, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    ea, eb = (load_trainer_state(Path(r) / "last")["ema"] for r in (full.run_dir, cut))
    assert ea["updates"] == eb["updates"] == 10
    assert all(torch.equal(ea["module"][k], eb["module"][k]) for k in ea["module"])
    # best/ (evaluated, exported) holds the EMA weights, last/ the raw ones
    best, last = (load_file(str(full.run_dir / w / "model.safetensors")) for w in ("best", "last"))
    assert all(torch.equal(best[k], ea["module"]["model." + k]) for k in best)
    assert any(not torch.equal(best[k], last[k]) for k in best if best[k].is_floating_point())
