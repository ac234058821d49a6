"""Run configuration: CLI options over a resumed run's config over the recipe preset over defaults.

Everything a run needs to be resumed is written to ``config.toml`` in its run directory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kdctl._compat import tomllib
from kdctl.errors import KdctlError

DEFAULT_OPTIM: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.01,
    "lr_batch_size": 16,
    "lr_scaling": "none",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "backbone_lr_mult": 1.0,
    "warmup_steps": 0,
    "warmup_factor": 1.0,
    "milestones": [],
    "gamma": 0.1,
    "clip_grad": 0.0,
}


PATH_KEYS = ("data", "train_ann", "val_ann", "images", "label_map", "output", "backbone_weights")
"""RunConfig fields that always name local files or folders."""

AUTO_SAVE_EVERY = 500
"""Steps between mid-epoch checkpoints when --save-every-steps is auto and an epoch is longer than that."""


def save_interval(setting: int | None, steps_per_epoch: int) -> int:
    """--save-every-steps -> steps between mid-epoch ``last/`` checkpoints (0 = at epoch ends only).

    auto (None): every :data:`AUTO_SAVE_EVERY` steps when an epoch has more steps than that (a large dataset, where
    a preemption would otherwise lose most of an epoch), else at epoch ends only.
    """
    if setting is None:
        return AUTO_SAVE_EVERY if steps_per_epoch > AUTO_SAVE_EVERY else 0
    return max(0, int(setting))


@dataclass
class RunConfig:
    """Every resolved option of a ``kdctl train`` / ``kdctl distill`` run."""

    task: str = "train"  # "train" or "distill"
    model: str | None = None  # the model trained (train) or the student (distill)
    teacher: str | None = None
    method: str = "auto"
    data: str | None = None
    format: str = "auto"  # --format of the dataset folder: auto (detected), coco, yolo, voc, hf (kdctl.data.coco)
    train_ann: str | None = None
    val_ann: str | None = None
    images: str | None = None
    label_map: str | None = None
    head: str = "auto"  # --head: auto (a new head when the model lacks a class), keep, new (kdctl.models.labels)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    imgsz: int | None = None
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    grad_accum: int = 1
    amp: str = "auto"
    teacher_amp: str = "auto"  # the teacher's forward precision (see kdctl.engine.trainer.teacher_amp_dtype)
    channels_last: bool | None = None  # NHWC convolutions; None = auto (see kdctl.engine.trainer.use_channels_last)
    freeze_backbone_stages: int | None = None  # [train] key: a pretrained DETR backbone's stem + N stages frozen
    fold_teacher_norms: bool = True  # the teacher's frozen BatchNorms folded into its convolutions (kdctl.engine.fold)
    eval_every: int = 1
    log_every: int = 10
    save_every_steps: int | None = None  # last/ every N steps as well as every epoch; None = auto, 0 = epochs only
    name: str | None = None
    output: str = "runs"
    recipe: str | None = None
    quiet: bool = False
    pretrained_backbone: bool = True
    backbone_weights: str | None = None  # a local ImageNet state dict for a preset student's backbone
    trust_remote_code: bool = False
    report_to: str | None = None  # --report-to trackers, comma-separated; None = tensorboard when installed
    student_setup: dict[str, Any] = field(default_factory=dict)  # {labels, overrides, exact}: see build_models
    hflip: float = 0.5
    ema: dict[str, Any] = field(default_factory=dict)  # {decay, warmups}, decay 0 = off (kdctl.engine.ema)
    augment: dict[str, Any] = field(default_factory=dict)  # the recipe's [augment] table (kdctl.data.augment)
    optim: dict[str, Any] = field(default_factory=dict)
    kd: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def absolute_paths(self) -> RunConfig:
        """Make every local path absolute (in place), so that ``--resume`` works from any working directory.

        Hub ids and preset names stay as they are; a model spec is a path when it names an existing file or
        folder (the rule :func:`kdctl.specs.resolve` applies first).
        """
        for key in PATH_KEYS:
            v = getattr(self, key)
            if v:
                setattr(self, key, str(Path(v).expanduser().absolute()))
        for key in ("model", "teacher"):
            v = getattr(self, key)
            if v and not str(v).startswith("torchvision:") and Path(v).expanduser().exists():
                setattr(self, key, str(Path(v).expanduser().absolute()))
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KdctlError(f"config has unknown option(s): {', '.join(sorted(unknown))}")
        return cls(**copy.deepcopy(d))


def load_recipe(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe: a preset name, or a TOML file (``*.toml``, the presets' layout), with its ``base`` recipe (a preset
    name, or a file relative to this one) merged underneath. ``augment = false`` drops a base's ``[augment]``."""
    from kdctl.specs import read_preset

    if name.endswith(".toml"):
        path = Path(name).expanduser().resolve()
        if str(path) in _seen:
            raise KdctlError(f"recipe {name}: its base chain comes back to it")
        try:
            r = tomllib.loads(path.read_text())
        except OSError as e:
            raise KdctlError(f"recipe file {name} cannot be read ({e.strerror or e})") from e
        except tomllib.TOMLDecodeError as e:
            raise KdctlError(f"recipe file {name}: invalid TOML ({e})") from e
        base = r.pop("base", None)
        if isinstance(base, str) and base.endswith(".toml") and not Path(base).expanduser().is_absolute():
            base = str(path.parent / base)
        _seen = (*_seen, str(path))
    else:
        r = read_preset(name, "recipes")
        base = r.pop("base", None)
    if base:
        merged = load_recipe(base, _seen)
        _deep_update(merged, r)
        return merged
    return r


def default_recipe_name(architecture: str, family: str) -> str:
    """Recipe picked when --recipe is not given: the one the architecture declares
    (:data:`kdctl.models.cnn.architectures.ARCHITECTURES` for CNN detectors), else the family's."""
    from kdctl.specs import list_presets

    have = list_presets("recipes")
    if family == "cnn":
        from kdctl.models.cnn.architectures import recipe_for

        declared = recipe_for(architecture, have)
        if declared:
            return declared
    if family == "detr":
        from kdctl.models.detr.variants import recipe_for as detr_recipe

        declared = detr_recipe(architecture)
        if declared in have:
            return declared
    return family if family in have else "cnn"


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def apply_recipe(cfg: RunConfig, recipe: dict[str, Any]) -> RunConfig:
    """Fill the options the user left unset from the recipe (train table, EMA, augmentation, optimiser, KD
    weights). A resumed run's own ``ema`` and ``augment`` (from its ``config.toml``) win over the recipe's."""
    from kdctl.engine.ema import ema_settings

    train = recipe.get("train", {})
    for key in ("epochs", "batch_size", "imgsz", "freeze_backbone_stages"):
        if getattr(cfg, key) is None and key in train:
            setattr(cfg, key, train[key])
    cfg.ema = ema_settings({**ema_settings(train.get("ema")), **cfg.ema})
    if not cfg.augment:
        augment = recipe.get("augment", {})
        if augment is not False and not isinstance(augment, dict):
            raise KdctlError(f"recipe: augment must be a table or false, not {augment!r}")
        cfg.augment = copy.deepcopy(augment or {})
    optim = dict(DEFAULT_OPTIM)
    optim.update(recipe.get("optim", {}))
    optim.update(cfg.optim)  # explicit values (e.g. from a resumed config) win
    cfg.optim = optim
    kd = copy.deepcopy(recipe.get("kd", {}))
    _deep_update(kd, cfg.kd)
    cfg.kd = kd
    return cfg


def effective_lr(cfg: RunConfig) -> float:
    """--lr as given, else the recipe lr, scaled linearly by the global batch when the recipe says so.

    ``cfg.batch_size`` is the global batch (all processes); ``grad_accum`` multiplies it per optimiser step."""
    if cfg.lr is not None:
        return float(cfg.lr)
    o = cfg.optim
    lr = float(o["lr"])
    if o.get("lr_scaling") == "linear":
        lr *= (cfg.batch_size or 1) * cfg.grad_accum / float(o.get("lr_batch_size", 16))
    return lr


def lr_lambda(total_steps: int, warmup_steps: int, warmup_factor: float, milestones: list[float], gamma: float):
    """Multiplier of the base lr at optimizer step s: linear warm-up, then step decay at fractions of training."""
    warm = min(int(warmup_steps), max(1, total_steps // 3)) if warmup_steps else 0
    bounds = sorted(int(math.floor(m * total_steps)) for m in milestones)

    def f(step: int) -> float:
        mult = 1.0
        if warm and step < warm:
            alpha = step / warm
            mult = warmup_factor * (1 - alpha) + alpha
        return mult * gamma ** sum(step >= b for b in bounds)

    return f


# --------------------------------------------------------------------------- TOML
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested dicts of scalars and lists (None values are left out)."""
    lines, tables = [], []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        body = to_toml(v, name)
        out += f"\n[{name}]\n{body}"
    return out


def write_config(path: Path, cfg: RunConfig, extra: dict[str, Any] | None = None) -> None:
    from kdctl.io import write_text

    d = cfg.to_dict()
    if extra:
        d["resolved"] = extra
    write_text(path, "# kdctl run configuration: `kdctl <task> --resume RUN_DIR` continues from it\n"
                      + to_toml(d))


def read_config(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    try:
        d = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise KdctlError(f"{path} does not exist (not a kdctl run directory)") from e
    except tomllib.TOMLDecodeError as e:
        raise KdctlError(f"{path}: corrupt run config ({e})") from e
    extra = d.pop("resolved", {})
    return RunConfig.from_dict(d), extra
