"""Metrics per class or per region of integer label maps, and their mean over the classes.

A label set is a name and the label values it unites: a class of mutually exclusive labels is
one value (``class2``: (2,)), a region several (BraTS ``WT``: (1, 2, 4)). Each set is scored on
``isin(map, values)`` of prediction and label; its columns are ``<name>_<metric>`` plus
``<name>_pred_voxels`` and ``<name>_label_voxels`` (so that a set empty in both leaves the means,
``evaluation.report.CONVENTIONS``).

The mean over the sets (the un-prefixed columns where there are several): each metric is
averaged over the sets that are not both empty (all of them when every set is), leaving out the
undefined values (hd95 and assd of a one-sided miss: ``hd95_penalized`` counts those), and the
voxel counts are summed, so that the row is both empty exactly when every set is.
"""

from __future__ import annotations

import math

import numpy as np

from evaluation.errors import EvaluationError
from evaluation.metrics import COUNT_NAMES, METRIC_NAMES, segmentation_metrics

# Per-set columns carry their voxel counts too, so that both-empty sets leave the means.
VOXEL_COUNTS = ("pred_voxels", "label_voxels")


def class_sets(classes=(), regions=()) -> tuple:
    """((name, values), ...): ``class<v>`` for each of ``classes``, or ``regions`` as they are."""
    if classes and regions:
        raise EvaluationError("give classes or regions, not both")
    if regions:
        return tuple((str(name), tuple(int(v) for v in values)) for name, values in regions)
    return tuple((f"class{int(v)}", (int(v),)) for v in classes)


def check_covered(label: np.ndarray, sets, path) -> None:
    """EvaluationError naming ``path`` and the first label value that no set covers."""
    covered = {v for _, values in sets for v in values} | {0}
    extra = sorted(set(np.unique(label).tolist()) - covered)
    if extra:
        shown = "; ".join(f"{name}:{','.join(str(v) for v in values)}" for name, values in sets)
        raise EvaluationError(f"label {path} has value {extra[0]}, which no class or region covers ({shown})")


def set_masks(labels: np.ndarray, sets) -> dict:
    """{name: bool mask of ``labels`` in the set's values}."""
    return {name: np.isin(labels, values) for name, values in sets}


def prefixed(name: str, metrics: dict) -> dict:
    """The ``<name>_`` columns of one set's metrics."""
    return {f"{name}_{m}": metrics[m] for m in (*METRIC_NAMES, *VOXEL_COUNTS)}


def mean_over_sets(per_set: list) -> dict:
    """The un-prefixed metrics of several sets' ``segmentation_metrics`` (see the module docstring)."""
    scored = [m for m in per_set if m["pred_voxels"] or m["label_voxels"]] or per_set
    mean = {}
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in scored if not math.isnan(float(m[name]))]
        mean[name] = float(np.mean(values)) if values else math.nan
    mean.update({name: int(sum(m[name] for m in per_set)) for name in COUNT_NAMES})
    return mean


def classwise_metrics(pred: np.ndarray, label: np.ndarray, sets, spacing=None) -> tuple[dict, dict]:
    """(mean over the sets, the per-set ``<name>_`` columns) of two integer label maps."""
    preds, labels = set_masks(pred, sets), set_masks(label, sets)
    per_set = {name: segmentation_metrics(preds[name], labels[name], spacing) for name, _ in sets}
    columns = {}
    for name, metrics in per_set.items():
        columns.update(prefixed(name, metrics))
    return mean_over_sets(list(per_set.values())), columns
