"""Which class head a model trains with on a dataset: its own labels, or a new head for the data's classes.

``--head`` (``kdctl train`` / ``kdctl distill``):

* ``auto`` (default): a model whose labels cover the dataset's classes (by name, case-insensitive, or through
  ``--label-map``) keeps its head; otherwise it gets a new head for the dataset's classes whose rows for the
  classes it knows are copied from the checkpoint (:func:`plan_head`);
* ``keep``: the model's head as it is (a class it lacks is an error naming it);
* ``new``: always a fresh head for the dataset's classes, nothing copied.

``kdctl eval`` never changes a head. Torch-free: the engine decides here, each family's adapter applies the plan
(:meth:`kdctl.models.base.Detector.replace_head`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdctl.errors import KdctlError

HEAD_MODES = ("auto", "keep", "new")
SHOWN_NAMES = 8  # kept class names listed in the one-line message, then "+N more"


def norm_name(name: str) -> str:
    """The form class names are compared in (case-insensitive, surrounding spaces ignored)."""
    return str(name).strip().lower()


def match_classes(names: list[str], label_names: list[str],
                  label_map: dict[str, str] | None = None) -> list[int | None]:
    """For each of ``names``, the index of the label in ``label_names`` with the same name (case-insensitive), or
    the one ``label_map`` (name -> label name) names; None where there is none."""
    lookup: dict[str, int] = {}
    for i, n in enumerate(label_names):
        lookup.setdefault(norm_name(n), i)
    user = {norm_name(k): v for k, v in (label_map or {}).items()}
    return [lookup.get(norm_name(user.get(norm_name(n), n))) for n in names]


def check_head_mode(mode: str | None) -> str:
    """``--head`` value, lower-cased; anything but auto, keep and new is one KdctlError line."""
    m = str(mode or "auto").strip().lower()
    if m not in HEAD_MODES:
        raise KdctlError(f"--head {mode!r}: use auto, keep or new")
    return m


@dataclass(frozen=True)
class HeadPlan:
    """A new class head: its label ``names`` in order and, per new row, the checkpoint row it is copied from.

    ``fresh``: nothing is copied, not even the background / no-object row (``--head new``).
    """

    names: tuple[str, ...]
    keep: dict[int, int] = field(default_factory=dict)  # new row -> checkpoint row
    old_names: tuple[str, ...] = ()
    fresh: bool = False

    def message(self) -> str:
        """One line: ``new head: 5 classes, 2 kept from the checkpoint (person, car), 3 new``."""
        kept = [self._shown(i) for i in sorted(self.keep)]
        more = len(kept) - SHOWN_NAMES
        listed = ", ".join(kept[:SHOWN_NAMES]) + (f", +{more} more" if more > 0 else "")
        n = len(self.names)
        return (f"new head: {n} classes, {len(kept)} kept from the checkpoint" + (f" ({listed})" if kept else "")
                + f", {n - len(kept)} new" + (" (--head new)" if self.fresh else ""))

    def _shown(self, row: int) -> str:
        new, old = self.names[row], self.old_names[self.keep[row]] if self.old_names else ""
        return new if not old or norm_name(old) == norm_name(new) else f"{new}={old}"


def plan_head(names: list[str], label_names: list[str], label_map: dict[str, str] | None = None,
              mode: str = "auto", exact: bool = False) -> HeadPlan | None:
    """The head a model labelled ``label_names`` needs for classes ``names``; None: keep the model's head.

    ``exact``: the model must have exactly ``names`` as its labels, in order (a KD-DETR student takes its
    teacher's label space); otherwise covering them is enough. ``mode`` is ``--head`` (see the module docstring).
    Two classes matching the same checkpoint label is a KdctlError (their rows would start identical).
    """
    mode = check_head_mode(mode)
    if mode == "keep":
        return None
    if mode == "new":
        return HeadPlan(tuple(names), {}, tuple(label_names), fresh=True)
    rows = match_classes(names, label_names, label_map)
    if exact and list(names) == list(label_names):
        return None
    if not exact and all(r is not None for r in rows):
        return None
    keep = {i: r for i, r in enumerate(rows) if r is not None}
    if len(set(keep.values())) != len(keep):
        raise KdctlError("two classes match the same model label; check --label-map")
    return HeadPlan(tuple(names), keep, tuple(label_names))


__all__ = ["HEAD_MODES", "HeadPlan", "check_head_mode", "match_classes", "norm_name", "plan_head"]
