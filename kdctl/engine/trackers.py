"""Experiment trackers (``--report-to``, the transformers Trainer's convention): TensorBoard, Weights & Biases and
MLflow behind one small interface, :class:`Trackers`.

The trainer hands every row it writes to ``metrics.jsonl`` to :meth:`Trackers.log_row` (scalars: each logged loss
term, ``lr``, step time, and after an evaluation AP, AP50, ..., per-class AP) and, after each evaluation, images
to :meth:`Trackers.log_images` (``results.png`` and sample predictions). Only rank 0 opens trackers.

Where each writes: TensorBoard event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``; the
``tensorboard`` extra); W&B through ``wandb`` (``WANDB_PROJECT``, default ``kdctl``; ``WANDB_MODE=offline`` keeps it
in ``RUN/wandb/``); MLflow through ``mlflow`` (``MLFLOW_TRACKING_URI``, default the file store ``OUTPUT/mlruns``, with
``MLFLOW_ALLOW_FILE_STORE=true`` unless set, the opt-in MLflow 3 asks for;
``MLFLOW_EXPERIMENT_NAME``, default ``kdctl``). A tracker that fails to start or to log is one warning line and
is left out from then on: it never fails a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError
from kdctl.io import first_line

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""Tracker names ``--report-to`` takes (also ``all``: every installed one; ``none``: no tracker)."""
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each tracker needs."""
META = ("type", "step")
"""Row keys that are no scalar of their own."""

Warn = Callable[[str], None]


def installed(name: str) -> bool:
    """Whether the package tracker ``name`` needs can be imported (found, not imported)."""
    return importlib.util.find_spec(MODULES[name]) is not None


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``--report-to`` -> tracker names, in the order given, without repeats.

    None (not given): ``["tensorboard"]`` when the tensorboard package is installed, else ``[]``. ``none`` -> [];
    ``all`` -> every tracker whose package is installed. An unknown name is a one-line KdctlError."""
    if value is None:
        return ["tensorboard"] if installed("tensorboard") else []
    parts = value if isinstance(value, list) else str(value).split(",")
    names = [p.strip().lower() for p in parts if p.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
    if unknown:
        raise KdctlError(f"--report-to {unknown[0]}: unknown tracker; use {', '.join(TRACKERS)}, all or none "
                         "(comma-separated for several)")
    if "none" in names:
        if len(names) > 1:
            raise KdctlError(f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker")
        return []
    if "all" in names:
        names = [n for n in TRACKERS if installed(n)]
    return list(dict.fromkeys(names))


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` row under a tracker tag: ``train/<key>`` for a training row (every loss
    term, ``lr``, ``time_per_step``, ``epoch``), ``val/<metric>`` and ``val_per_class/<class>`` for an evaluation
    (undefined COCO metrics, -1, are left out)."""
    prefix = "val" if row.get("type") == "eval" else "train"
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in META or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and not (prefix == "val" and v < 0):
            out[f"{prefix}/{k}"] = float(v)
        elif k == "per_class" and isinstance(v, dict):
            out.update({f"val_per_class/{c}": float(a) for c, a in v.items() if isinstance(a, (int, float)) and a >= 0})
    return out


# --------------------------------------------------------------------------- the trackers
class Tracker:
    """One tracker: scalars per step, HWC uint8 images per step, close. Raising is allowed (it is then dropped)."""

    name = ""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def images(self, images: dict[str, Any], step: int) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    """Event files in ``RUN/tensorboard/``; a resumed run purges the events logged after its checkpoint's step."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        if not installed("tensorboard"):
            raise ImportError("the tensorboard package is not installed (pip install 'kdctl[tensorboard]')")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step or None)
        if step == 0:
            self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def images(self, images: dict[str, Any], step: int) -> None:
        for k, img in images.items():
            self.writer.add_image(k, img, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """A W&B run named after the run directory, its id derived from the directory's path, so that ``--resume``
    continues the same W&B run; files under ``RUN/wandb/``."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        import wandb

        self.wandb = wandb
        run_id = hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdctl"), name=Path(run_dir).name,
                              id=run_id, resume="allow", dir=str(run_dir), config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def images(self, images: dict[str, Any], step: int) -> None:
        self.run.log({k: self.wandb.Image(img) for k, img in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    """An MLflow run (named after the run directory) in experiment ``MLFLOW_EXPERIMENT_NAME`` (``kdctl``), through
    ``MlflowClient`` (no global active run: one process may train several runs); the config as parameters."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the local file store, which MLflow 3 keeps (in maintenance) behind this opt-in
            uri = mlruns_uri(config.get("output") or Path(run_dir).parent)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kdctl")
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
        self.run_id = self.client.create_run(exp_id, run_name=Path(run_dir).name,
                                             tags={"kdctl.run_dir": str(run_dir)}).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items() if v not in (None, "", [], {})]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def images(self, images: dict[str, Any], step: int) -> None:
        for k, img in images.items():
            self.client.log_image(self.run_id, img, key=k.replace("/", "_"), step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlruns_uri(output: str | Path) -> str:
    """The default MLflow store: the file store ``OUTPUT/mlruns`` as a ``file:`` URI."""
    return (Path(output).expanduser().absolute() / "mlruns").as_uri()


KINDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


# --------------------------------------------------------------------------- the set the trainer calls
class Trackers:
    """The trackers of a run; every call is safe: a tracker that raises is one warning line and is dropped."""

    def __init__(self, trackers: list[Tracker] | None = None, warn: Warn | None = None) -> None:
        self.active = list(trackers or [])
        self.warn = warn or (lambda msg: None)

    def __bool__(self) -> bool:
        return bool(self.active)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.active]

    def log_row(self, row: dict[str, Any]) -> None:
        """The scalars of a ``metrics.jsonl`` row (:func:`row_scalars`) at its ``step``."""
        if self.active and isinstance(row.get("step"), int):
            values = row_scalars(row)
            self._each("scalars", values, int(row["step"]))

    def log_images(self, images: dict[str, Any] | Callable[[], dict[str, Any]], step: int) -> None:
        """HWC uint8 RGB arrays by tag, or a function that makes them (called only when a tracker is active; one
        that raises is a warning line, not a failed run)."""
        if not self.active:
            return
        if callable(images):
            try:
                images = images()
            except Exception as e:
                self.warn(f"--report-to: the evaluation images could not be made ({first_line(e)}); skipped")
                return
        if images:
            self._each("images", images, step)

    def close(self) -> None:
        self._each("close")
        self.active = []

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.active):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a tracker never fails a run
                self.active.remove(t)
                self.warn(f"--report-to {t.name}: {first_line(e)}; no more logging to it in this run")


def open_trackers(report_to: str | list[str] | None, run_dir: Path, config: dict[str, Any], warn: Warn,
                  step: int = 0) -> Trackers:
    """Start the trackers ``report_to`` names (:func:`parse_report_to`) for ``run_dir``; one that fails to start
    (not installed, no login, a broken store) is one warning line and is left out. ``step``: the step a resumed
    run continues from."""
    started: list[Tracker] = []
    for name in parse_report_to(report_to):
        try:
            started.append(KINDS[name](Path(run_dir), config, step))
        except Exception as e:
            msg = first_line(e)
            if isinstance(e, ImportError) and name != "tensorboard":
                msg = f"the {MODULES[name]} package is not installed (pip install {MODULES[name]})"
            elif isinstance(e, ImportError):
                msg = str(e)
            warn(f"--report-to {name}: could not start ({msg}); training goes on without it")
    return Trackers(started, warn)
