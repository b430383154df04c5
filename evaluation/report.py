"""Metric tables, summaries, per-volume aggregation and 16-bit maps (overlays: ``evaluation.overlay``).

metrics.csv has one row per evaluated unit and these columns, in this order:

- ``case_id``: the case (a 2D slice, an image or a volume), or the group for group rows;
- ``group_id``: the volume or patient the case belongs to ("" when none);
- ``kind``: ``case`` for a single case, ``volume`` / ``patient`` for a group whose metrics
  were recomputed on its slices stacked in 3D (``GroupAccumulator``), never averaged;
- the metrics of the result: ``dice iou hd95 hd95_penalized assd sensitivity specificity
  precision`` and
  the counts ``tp fp fn tn pred_voxels label_voxels`` (``evaluation.metrics``);
- the same with a ``preseg_`` prefix for the pre-segmentation, when any row has them;
- per class or region (K > 1): ``{name}_{metric}`` for every metric and ``{name}_pred_voxels``,
  ``{name}_label_voxels``, with the un-prefixed columns holding the row's mean over the classes
  present in it and the voxel counts of their union (``evaluation.metrics.mean_over_classes``),
  ``preseg_{name}_...`` likewise. The summary then adds each class's means (``class_summary``);
  ``CONVENTIONS["classes"]`` says how the two means over classes differ;
- any further columns in the order first seen.

Numbers are written at full precision; ``nan`` is written as ``nan``, a missing value as "".
Files are written atomically (a temporary file in the same folder, then a rename), so a
reader never sees half a table.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.arrays import to_bool_mask, to_numpy
from evaluation.errors import EvaluationError
from evaluation.metrics import (
    CLASS_COUNT_NAMES,
    COUNT_NAMES,
    METRIC_NAMES,
    class_columns,
    overlap_metrics,
    segmentation_metrics,
    union_counts,
)
from guided_diffusion.atomic import atomic_path, atomic_write, atomic_write_text

ID_COLUMNS = ("case_id", "group_id", "kind")
KINDS = ("case", "volume", "patient")
PRESEG_PREFIX = "preseg_"
RESULT_COLUMNS = METRIC_NAMES + COUNT_NAMES


def metrics_row(
    case_id: str,
    metrics: dict | None,
    *,
    group_id: str = "",
    kind: str = "case",
    preseg_metrics: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """One metrics.csv row: ids, the result's metrics, ``preseg_``-prefixed pre-segmentation
    metrics (if given) and ``extra`` columns (e.g. per-class metrics)."""
    if kind not in KINDS:
        raise EvaluationError(f"row kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    row = {"case_id": str(case_id), "group_id": str(group_id), "kind": kind}
    row.update(metrics or {})
    for name, value in (preseg_metrics or {}).items():
        row[PRESEG_PREFIX + name] = value
    row.update(extra or {})
    return row


def _columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(key for row in rows for key in row)
    ordered = list(ID_COLUMNS)
    ordered += [c for c in RESULT_COLUMNS if c in seen]
    ordered += [PRESEG_PREFIX + c for c in RESULT_COLUMNS if PRESEG_PREFIX + c in seen]
    ordered += [c for c in seen if c not in ordered]
    return ordered


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def metrics_columns(*, preseg: bool, extra=()) -> list[str]:
    """The columns ``write_metrics_csv`` gives rows of the result's metrics (and the
    pre-segmentation's, with ``preseg``), for a table streamed without a first look at its rows."""
    columns = list(ID_COLUMNS) + list(RESULT_COLUMNS)
    if preseg:
        columns += [PRESEG_PREFIX + c for c in RESULT_COLUMNS]
    return columns + [c for c in extra if c not in columns]


def class_column_names(names, *, preseg: bool = False) -> list[str]:
    """The per-class columns of a K-class table (``evaluation.metrics.class_columns``), for
    ``metrics_columns(extra=...)``; with ``preseg`` the pre-segmentation's too."""
    columns = [f"{name}_{m}" for name in names for m in (*METRIC_NAMES, *CLASS_COUNT_NAMES)]
    return columns + ([PRESEG_PREFIX + c for c in columns] if preseg else [])


def write_metrics_csv(rows, path, columns: list[str] | None = None) -> None:
    """Write rows (dicts from ``metrics_row``) to ``path`` as metrics.csv, atomically.

    rows: a list, or any iterable when ``columns`` is given (then the rows are streamed to the
    file one by one, and a column missing from ``columns`` is an error).
    """
    if columns is None:
        rows = list(rows)
        columns = _columns(rows)
    known = set(columns)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            unknown = set(row) - known
            if unknown:
                raise ValueError(f"row {row.get('case_id')} has columns outside the table: {sorted(unknown)}")
            writer.writerow([_format(row.get(c)) for c in columns])


def _parse(text: str):
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics_csv(path) -> list[dict]:
    """Read a metrics.csv back: ids as str, integers as int, other numbers as float
    (``nan`` included), empty cells as None."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: metrics table not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(ID_COLUMNS) <= set(reader.fieldnames):
            raise EvaluationError(
                f"{path}: not a metrics.csv (needs columns {', '.join(ID_COLUMNS)})"
            )
        return [
            {k: (v if k in ID_COLUMNS else _parse(v)) for k, v in row.items()} for row in reader
        ]


def _is_count(column: str) -> bool:
    return any(column == c or column.endswith("_" + c) for c in COUNT_NAMES)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


# How every summary here and every table of evaluation.compare reads the rows; summary.json
# carries this text (``conventions``) so that a reader of the numbers knows how they were made.
CONVENTIONS = {
    "both_empty": "a case (or group) whose label and prediction are both empty scores dice 1 and "
    "hd95 0 in metrics.csv but is left out of every mean and counted as n_both_empty",
    "hd95": "mean over the cases where it is defined: both masks non-empty (in a row's mean over "
    "several classes, in every class present in it); n_nan counts the one-sided misses, where hd95 "
    "is undefined: exactly one mask empty (in a row's mean over several classes, in any class "
    "present in it)",
    "hd95_penalized": "hd95 with each one-sided miss scored as the image diagonal in mm (as the "
    "BraTS evaluation does), over every case that is not both empty",
    "headline": "per volume (3D inputs) or per patient (2D slices of a patient), each scored "
    "on its slices stacked in 3D, wherever volumes or patients exist; else per case",
    "std": "population standard deviation (ddof=0) of the values in the mean",
    "classes": "with several classes or regions, each class's <name>_ columns follow these "
    "conventions on that class's masks, and two means are given. class_mean (the closing line's "
    "'mean of the classes') is the mean over the classes of each class's own mean over the units, "
    "as nnU-Net's foreground_mean and the BraTS mean of the region means; a class whose mean is "
    "undefined is left out and counted. The un-prefixed columns hold each row's mean over the "
    "classes present in it (not empty in both label and prediction), which pairs per patient but "
    "differs from class_mean where a class is absent from some units; their voxel counts are those "
    "of the union of the classes, so a row is both empty only when every class is. In a row's mean "
    "a class with a one-sided miss leaves the row's hd95 and assd undefined: the row counts as a "
    "miss (n_nan) although its union masks need not be empty, and hd95_penalized scores that class "
    "as the image diagonal",
}
# A run with one foreground (one class included) states hd95 in one mask's words, as before
# classes existed, and has no "classes" entry: its summary.json stays byte-identical.
_ONE_FOREGROUND_HD95 = ("mean over the cases where both masks are non-empty; n_nan counts the one-sided "
                        "misses (exactly one mask empty), where hd95 is undefined")


def conventions(*, several_classes: bool) -> dict:
    """``CONVENTIONS`` as a summary or a comparison table states them: all of them for rows with
    several classes or regions; for one foreground without the "classes" entry, hd95 in one
    mask's words."""
    if several_classes:
        return dict(CONVENTIONS)
    return {key: (_ONE_FOREGROUND_HD95 if key == "hd95" else text)
            for key, text in CONVENTIONS.items() if key != "classes"}


HEADLINE_METRICS = ("dice", "hd95", "hd95_penalized")
# Longest first, so that "hd95_penalized" is not read as "<prefix>hd95".
_METRICS_BY_LENGTH = sorted(METRIC_NAMES, key=len, reverse=True)


def metric_prefix(column: str) -> str | None:
    """``preseg_dice`` -> ``preseg_``, ``class1_hd95`` -> ``class1_``, ``dice`` -> ""; None
    for a column that is not a metric."""
    for name in _METRICS_BY_LENGTH:
        if column == name or column.endswith("_" + name):
            return column[: -len(name)]
    return None


def is_both_empty(row: dict, prefix: str = "") -> bool:
    """True when the row's label and prediction (of ``prefix``: "" for the result,
    ``preseg_`` for the pre-segmentation) are both empty; False when the counts are unknown."""
    return row.get(prefix + "pred_voxels") == 0 and row.get(prefix + "label_voxels") == 0


def metric_values(rows: list[dict], column: str) -> tuple[list, int]:
    """(values of ``column`` from the rows that enter its mean, number of both-empty rows left
    out): the one place the convention of ``CONVENTIONS["both_empty"]`` is applied."""
    prefix = metric_prefix(column)
    values, both_empty = [], 0
    for row in rows:
        if prefix is not None and is_both_empty(row, prefix):
            both_empty += 1
        else:
            values.append(row.get(column))
    return values, both_empty


def has_patient_groups(patient_ids) -> bool:
    """True when some patient holds several 2D cases: they are then also scored per patient."""
    patients = list(patient_ids)
    return any(patients) and len(set(patients)) < len(patients)


def headline_kind(kinds) -> str:
    """The row kind whose figures are the headline: volume, else patient, else case."""
    for kind in ("volume", "patient"):
        if kind in kinds:
            return kind
    return "case"


class _Moments:
    """Running mean and population variance (Welford), nan and None counted apart."""

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.n_nan = 0
        self.n_both_empty = 0

    def add(self, value) -> None:
        if not _is_number(value) or math.isnan(float(value)):
            self.n_nan += 1
            return
        self.n += 1
        delta = float(value) - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (float(value) - self.mean)

    def result(self) -> dict:
        valid = self.n > 0
        return {
            "mean": self.mean if valid else None,
            "std": math.sqrt(self.m2 / self.n) if valid else None,
            "n_valid": self.n,
            "n_nan": self.n_nan,
            "n_both_empty": self.n_both_empty,
        }


class SummaryAccumulator:
    """``summarize`` one row at a time, in memory independent of the number of rows."""

    def __init__(self):
        self._kinds: dict[str, dict] = {}

    def add(self, row: dict) -> None:
        kind = row.get("kind", "case")
        entry = self._kinds.setdefault(kind, {"n": 0, "n_both_empty": 0, "columns": {}})
        entry["n"] += 1
        entry["n_both_empty"] += int(is_both_empty(row))
        for column, value in row.items():
            if column in ID_COLUMNS or _is_count(column):
                continue
            moments = entry["columns"].get(column)
            if moments is None:
                if not _is_number(value):
                    continue
                # Rows before the first number in this column count as undefined values.
                moments = entry["columns"][column] = _Moments()
                moments.n_nan = entry["n"] - 1
            prefix = metric_prefix(column)
            if prefix is not None and is_both_empty(row, prefix):
                moments.n_both_empty += 1
            else:
                moments.add(value)
        for column, moments in entry["columns"].items():
            if column not in row:
                moments.add(None)

    def result(self) -> dict:
        summary = {"n_cases": self._kinds.get("case", {}).get("n", 0),
                   "conventions": conventions(several_classes=False), "kinds": {}}
        for kind in KINDS:
            if kind in self._kinds:
                entry = self._kinds[kind]
                metrics = {c: m.result() for c, m in entry["columns"].items()}
                summary["kinds"][kind] = {"n": entry["n"], "n_both_empty": entry["n_both_empty"],
                                          "metrics": metrics}
        kind = headline_kind(summary["kinds"])
        if kind in summary["kinds"]:
            metrics = summary["kinds"][kind]["metrics"]
            summary["headline"] = {"kind": kind, "n": summary["kinds"][kind]["n"],
                                   **{m: metrics[m] for m in HEADLINE_METRICS if m in metrics}}
        return summary


def summarize(rows) -> dict:
    """Means and standard deviations of every metric column, per row kind, by the conventions
    of ``CONVENTIONS`` (stated in the result: those of one foreground; ``class_summary`` gives
    a summary of several classes theirs).

    Every numeric column except the ids and the voxel counts is summarised. Rows whose label
    and prediction are both empty are left out of a metric's mean and counted; nan values
    (see ``evaluation.metrics``) are left out and counted.

    Returns:
        {"n_cases": number of ``case`` rows, "conventions": conventions(several_classes=False),
         "kinds": {kind: {"n": rows of that kind, "n_both_empty": rows whose result and
                          label are both empty,
                          "metrics": {column: {"mean", "std", "n_valid", "n_nan",
                                               "n_both_empty"}}}},
         "headline": {"kind": volume | patient | case, "n", "dice", "hd95",
                      "hd95_penalized"} (absent without rows)}
        ``std`` is the population standard deviation (ddof=0); mean and std are None when no
        value is valid.
    """
    accumulator = SummaryAccumulator()
    for row in rows:
        accumulator.add(row)
    return accumulator.result()


def _mean_text(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _count_text(n: int, kind: str) -> str:
    return f"{n} {kind}{'s' if n != 1 else ''}"


def headline_text(summary: dict) -> str:
    """``mean dice per patient 0.8123 (5 patients); per case 0.7710 (40 cases, 3 both empty left
    out)``: the line ``python -m evaluation`` and sample.py close with. With several classes
    (``class_mean`` in the summary) the means are those of the un-prefixed columns and say so:
    ``mean dice per volume over the classes present in each 0.8333 (2 volumes); ...``."""
    def mean(kind):
        return _mean_text(summary["kinds"][kind]["metrics"].get("dice", {}).get("mean"))

    over = " over the classes present in each" if "class_mean" in summary else ""
    case = summary["kinds"]["case"]
    per_case = f"{mean('case')} ({case['n']} cases, {case['n_both_empty']} both empty left out)"
    kind = summary["headline"]["kind"]
    if kind == "case":
        return f"mean dice per case{over} {per_case}"
    units = _count_text(summary["headline"]["n"], kind)
    return f"mean dice per {kind}{over} {mean(kind)} ({units}); per case {per_case}"


# The counts that summary.json's per_class gives beside the means, of the metrics the closing line
# and the tables show.
CLASS_COUNT_METRICS = ("dice", "hd95")
MEAN_COUNTS = ("n_valid", "n_nan", "n_both_empty")


def class_means(summary: dict, classes) -> dict:
    """summary.json's ``per_class``: {name: {"label_values": [...], metric: mean, ...,
    "counts": {"dice" | "hd95": {"n_valid", "n_nan", "n_both_empty"}}}} per class or region
    (``classes``: a mapping from its name to its label value or values), each metric's mean and
    the counts of the units behind it at the summary's headline kind
    (``summary["headline"]["kind"]``: volume, patient or case), None where undefined; {}
    without scored rows."""
    kind = summary.get("headline", {}).get("kind")
    if kind is None:
        return {}
    metrics = summary["kinds"][kind]["metrics"]
    return {
        name: {"label_values": [int(v) for v in np.atleast_1d(values)],
               **{m: metrics.get(f"{name}_{m}", {}).get("mean") for m in METRIC_NAMES},
               "counts": {m: {c: metrics.get(f"{name}_{m}", {}).get(c) for c in MEAN_COUNTS}
                          for m in CLASS_COUNT_METRICS}}
        for name, values in dict(classes).items()
    }


def mean_of_class_means(means) -> dict:
    """{"mean", "n_valid", "n_undefined"} of {class: its mean, None where undefined}: the mean over
    the classes of their means (nnU-Net's foreground_mean), the undefined ones left out and
    counted; mean None when none is defined."""
    defined = [float(m) for m in means.values() if m is not None]
    return {"mean": sum(defined) / len(defined) if defined else None, "n_valid": len(defined),
            "n_undefined": len(means) - len(defined)}


def class_summary(summary: dict, classes) -> dict:
    """The entries that classes or regions (``classes``: a mapping from a name to its label
    value or values) add to ``summary``, for ``summary.update``: ``per_class``
    (``class_means``) and, for two or more, ``class_mean`` ({metric: ``mean_of_class_means``}
    at the headline kind, when any row was scored) and the ``conventions`` of several classes."""
    classes = dict(classes)
    per_class = class_means(summary, classes)
    entries = {"per_class": per_class}
    if len(classes) > 1:
        entries["conventions"] = conventions(several_classes=True)
        if per_class:
            entries["class_mean"] = {m: mean_of_class_means({name: c[m] for name, c in per_class.items()})
                                     for m in METRIC_NAMES}
    return entries


def classes_text(summary: dict) -> str:
    """``dice per volume by class: WT 0.8123, TC 0.7012 (3 volumes), ET 0.6005, mean of the
    classes 0.7047``: the per-class line (summary["per_class"] from ``class_means``), a class's
    number of units where its mean rests on fewer than all (the others both empty or
    undefined), and the mean of the classes (``class_mean``) with several; "" without
    classes."""
    classes = summary.get("per_class") or {}
    if not classes:
        return ""
    kind, n = summary["headline"]["kind"], summary["headline"]["n"]
    shown = []
    for name, m in classes.items():
        text = f"{name} {_mean_text(m['dice'])}"
        n_valid = m["counts"]["dice"]["n_valid"]
        if n_valid is not None and n_valid < n:
            text += f" ({_count_text(n_valid, kind)})"
        shown.append(text)
    text = f"dice per {kind} by class: {', '.join(shown)}"
    mean = summary.get("class_mean", {}).get("dice")
    if mean is not None:
        text += f", mean of the classes {_mean_text(mean['mean'])}"
        if mean["n_undefined"]:
            text += f" ({mean['n_valid']} of {mean['n_valid'] + mean['n_undefined']} classes)"
    return text


def results_text(summary: dict) -> str:
    """What a run's cases gave, in words: ``headline_text`` over the scored cases and
    ``classes_text`` for classes (first with several: the mean of the class means is the figure
    nnU-Net and BraTS papers report), and ``unlabelled: N cases`` for those without a label
    (segmented, not scored)."""
    parts = []
    if summary.get("n_cases"):
        texts = [headline_text(summary), classes_text(summary)]
        if "class_mean" in summary:
            texts.reverse()
        parts += [text for text in texts if text]
    n_unlabelled = summary.get("n_unlabelled") or 0
    if n_unlabelled or not parts:
        parts.append(f"unlabelled: {_count_text(n_unlabelled, 'case')} (no metrics)")
    return "; ".join(parts)


def _json_ready(obj):
    # JSON has no NaN/Infinity; null says "undefined" to every reader.
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_summary_json(summary: dict, path) -> None:
    """Write ``summary`` as indented JSON, atomically; nan/inf become null, numpy scalars and
    paths become plain JSON values."""
    text = json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


class GroupAccumulator:
    """Collects the 2D slices of volumes (or patients) and scores each group in 3D.

    Per-volume metrics are recomputed on the stacked masks of the group, not averaged over
    its slices: the Dice of a volume is 2 TP / (2 TP + FP + FN) summed over all its voxels,
    and HD95 / ASSD are measured between 3D surfaces with spacing
    (slice_thickness, spacing_y, spacing_x).

    Slices are stacked along a new first axis in order of ``slice_index`` (order of arrival
    when it is None). Slices missing between two given indices are filled with background
    in both masks, so surface distances keep the true distance between slices; the voxel
    counts (tn, specificity) include only the slices given. An unknown slice thickness is
    taken as 1.0.

    ``classes`` (K > 1): a mapping from a class or region name to its label value(s); the
    slices are then integer label maps, and each group is scored per class
    (``evaluation.metrics.class_columns``: per-class columns, their mean and the voxel counts of
    their union).

    Example::

        acc = GroupAccumulator(kind="patient")
        for item, result in ...:
            acc.add(item["meta"]["patient_id"], result, item["label"],
                    slice_index=item["meta"]["slice_index"], spacing=item["meta"]["spacing"])
        rows += acc.rows()
    """

    def __init__(self, kind: str = "volume", classes=None):
        if kind not in ("volume", "patient"):
            raise EvaluationError(f"group kind {kind!r} is unknown; choose volume or patient")
        self.kind = kind
        self.classes = None if classes is None else dict(classes)
        self._groups: dict[str, dict] = {}

    def _slice(self, mask) -> np.ndarray:
        # Label maps keep their values; a one-class mask is its foreground.
        return to_bool_mask(mask) if self.classes is None else to_numpy(mask).astype(np.int32)

    def add(
        self,
        group_id: str,
        result,
        label,
        *,
        slice_index: int | None = None,
        spacing=None,
        slice_thickness: float | None = None,
        preseg=None,
    ) -> None:
        """Add one slice.

        Args:
            group_id: the volume or patient id.
            result, label: masks [H, W] (nonzero = foreground); same shape in a group.
            slice_index: position of the slice in its volume; unique within the group.
            spacing: (spacing_y, spacing_x) in mm, or None for 1.0.
            slice_thickness: distance between neighbouring slices in mm, or None.
            preseg: pre-segmentation mask [H, W], or None. Give it for every slice of a
                group or for none.
        """
        result, label = self._slice(result), self._slice(label)
        if result.ndim != 2 or result.shape != label.shape:
            raise EvaluationError(
                f"group {group_id}: slices must be 2D masks of one shape, got result "
                f"{result.shape} and label {label.shape}"
            )
        group = self._groups.setdefault(
            str(group_id),
            {"slices": {}, "shape": result.shape, "spacing": spacing, "thickness": None},
        )
        if result.shape != group["shape"]:
            raise EvaluationError(
                f"group {group_id}: slice shape {result.shape} differs from {group['shape']}"
            )
        if spacing is not None and group["spacing"] is not None and not np.allclose(
            spacing, group["spacing"]
        ):
            raise EvaluationError(
                f"group {group_id}: slice spacing {tuple(spacing)} differs from "
                f"{tuple(group['spacing'])}"
            )
        group["spacing"] = group["spacing"] if group["spacing"] is not None else spacing
        if slice_thickness is not None:
            group["thickness"] = float(slice_thickness)
        index = len(group["slices"]) if slice_index is None else int(slice_index)
        if index in group["slices"]:
            raise EvaluationError(f"group {group_id}: slice {index} was added twice")
        pre = None if preseg is None else self._slice(preseg)
        if pre is not None and pre.shape != result.shape:
            raise EvaluationError(
                f"group {group_id}: pre-segmentation shape {pre.shape} differs from "
                f"{result.shape}"
            )
        group["slices"][index] = (result, label, pre)

    @property
    def group_ids(self) -> list[str]:
        return sorted(self._groups)

    def _score(self, group: dict, which: int) -> dict:
        indices = sorted(group["slices"])
        first = indices[0]
        depth = indices[-1] - first + 1
        height, width = group["shape"]
        dtype = bool if self.classes is None else np.int32
        pred = np.zeros((depth, height, width), dtype=dtype)
        label = np.zeros((depth, height, width), dtype=dtype)
        for i in indices:
            pred[i - first] = group["slices"][i][which]
            label[i - first] = group["slices"][i][1]
        sy, sx = group["spacing"] if group["spacing"] is not None else (1.0, 1.0)
        thickness = group["thickness"] if group["thickness"] is not None else 1.0
        given = len(indices) * height * width

        def on_given_slices(counts):
            # Gap slices were never evaluated: count true negatives on the given slices only.
            counts["tn"] = given - counts["tp"] - counts["fp"] - counts["fn"]
            return counts

        def score(pred_mask, label_mask):
            metrics = on_given_slices(segmentation_metrics(pred_mask, label_mask, (thickness, sy, sx)))
            metrics["specificity"] = overlap_metrics(
                metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]
            )["specificity"]
            return metrics

        if self.classes is None:
            return score(pred, label)
        return class_columns(
            {name: score(np.isin(pred, values), np.isin(label, values)) for name, values in self.classes.items()},
            on_given_slices(union_counts(pred, label, self.classes)),
        )

    def compute(self, group_id: str) -> dict:
        """The metrics.csv row of one group (``kind`` = this accumulator's kind)."""
        group = self._groups.get(str(group_id))
        if group is None:
            raise EvaluationError(f"group {group_id} has no slices")
        presegs = [s[2] is not None for s in group["slices"].values()]
        if any(presegs) and not all(presegs):
            raise EvaluationError(
                f"group {group_id}: a pre-segmentation was given for some slices but not all"
            )
        return metrics_row(
            group_id,
            self._score(group, 0),
            group_id=group_id,
            kind=self.kind,
            preseg_metrics=self._score(group, 2) if all(presegs) else None,
        )

    def rows(self) -> list[dict]:
        """One row per group, sorted by group id."""
        return [self.compute(g) for g in self.group_ids]


def save_uint16_png(values, path) -> None:
    """Write a map with values in [0, 1] (clipped; nan -> 0) as a 16-bit grayscale PNG,
    value v stored as round(v * 65535). Read back with ``read_uint16_png``."""
    values = to_numpy(values).astype(np.float64)
    if values.ndim != 2:
        raise EvaluationError(f"{path}: a 16-bit PNG needs a 2D map, got shape {values.shape}")
    stored = np.round(np.nan_to_num(np.clip(values, 0.0, 1.0)) * 65535.0).astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(stored).save(tmp, format="PNG"))


def read_uint16_png(path) -> np.ndarray:
    """Read a PNG written by ``save_uint16_png`` back to float64 values in [0, 1]."""
    with Image.open(path) as img:
        stored = np.asarray(img)
    if stored.dtype != np.uint16:
        raise EvaluationError(f"{path}: not a 16-bit grayscale PNG (dtype {stored.dtype})")
    return stored.astype(np.float64) / 65535.0
