"""Overlap and surface-distance metrics for binary 2D and 3D segmentations.

All functions take a prediction and a label of the same shape (numpy arrays or torch
tensors; any nonzero value is foreground) and an optional voxel ``spacing``: one positive
length per axis in millimetres, in the arrays' axis order, e.g. ``(2.0, 1.0)`` for rows
2 mm apart and columns 1 mm apart. Anisotropic spacing is supported; ``None`` means 1.0 on
every axis, so distances are then in voxels.

Metrics (tp, fp, fn, tn are voxel counts of the confusion matrix):

- ``dice`` = 2 tp / (2 tp + fp + fn), ``iou`` = tp / (tp + fp + fn)
- ``sensitivity`` = tp / (tp + fn), ``specificity`` = tn / (tn + fp),
  ``precision`` = tp / (tp + fp)
- ``hd95``: the 95th percentile Hausdorff distance. As MONAI's
  ``compute_hausdorff_distance(percentile=95, directed=False)``: the 95th percentile (numpy's
  linear interpolation) of the distances from each prediction surface voxel to the label
  surface, the same from the label surface to the prediction surface, and the larger of the
  two. (It is not the percentile of the pooled distances.)
- ``assd``: average symmetric surface distance, the mean of both directed distance sets
  pooled together (MONAI's ``compute_average_surface_distance(symmetric=True)``).
- ``hd95_penalized``: ``hd95``, except where exactly one of the masks is empty (a missed or a
  hallucinated lesion): there it is the diagonal of the image in mm,
  ``sqrt(sum((n_i * spacing_i) ** 2))``, the largest distance the image can hold, as the BraTS
  evaluation scores such a case (373.13 for a 240 x 240 x 155 volume at 1 mm).

The surface of a mask is ``mask XOR binary_erosion(mask)`` (face connectivity), where voxels
outside the array count as background, so a mask touching the border has a surface there.
Distances from one surface to the other come from
``scipy.ndimage.distance_transform_edt(sampling=spacing)``, evaluated on the bounding box of
both masks (exact, since every surface voxel lies inside it).

Empty masks (MONAI documents its own choices; ours are):

- both empty: dice = iou = 1, hd95 = hd95_penalized = assd = 0, sensitivity = nan,
  specificity = 1, precision = nan (a correct "nothing here"). Summaries leave such cases out
  of their means and count them (``evaluation.report.CONVENTIONS``).
- prediction empty, label not: dice = iou = 0, hd95 = assd = nan, hd95_penalized = the
  diagonal, sensitivity = 0, precision = nan.
- label empty, prediction not: dice = iou = 0, hd95 = assd = nan, hd95_penalized = the
  diagonal, sensitivity = nan, precision = 0.

Apart from dice and iou of two empty masks, a ratio whose denominator is zero is ``nan``
(no positives to find, nothing predicted); specificity is ``nan`` only when every voxel is
labelled foreground.
Where a distance is undefined because one surface is missing, MONAI returns ``nan`` (older
versions ``inf``); we return ``nan`` and give ``hd95_penalized`` beside it. Summaries aggregate
with nan-aware means and report how many cases were ``nan`` (see ``evaluation.report``).
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from evaluation.arrays import to_bool_mask, to_numpy
from evaluation.errors import EvaluationError

METRIC_NAMES = ("dice", "iou", "hd95", "hd95_penalized", "assd", "sensitivity", "specificity",
                "precision")
COUNT_NAMES = ("tp", "fp", "fn", "tn", "pred_voxels", "label_voxels")
# Undefined (nan) exactly where one mask is empty and the other is not: a miss.
DISTANCE_NAMES = ("hd95", "assd")
HD_PERCENTILE = 95.0
# Per-class columns carry their voxel counts too, so that a class empty in both masks leaves the
# means (``evaluation.report.is_both_empty``).
CLASS_COUNT_NAMES = ("pred_voxels", "label_voxels")


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise EvaluationError(
            f"spacing {spacing} has {len(spacing)} values but the masks have {ndim} axes"
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise EvaluationError(f"spacing {spacing} must be positive and finite on every axis")
    return spacing


def _check_pair(pred, label) -> tuple[np.ndarray, np.ndarray]:
    pred, label = to_bool_mask(pred), to_bool_mask(label)
    if pred.shape != label.shape:
        raise EvaluationError(
            f"prediction shape {pred.shape} does not match label shape {label.shape}"
        )
    if pred.ndim == 0:
        raise EvaluationError("masks must have at least one axis")
    return pred, label


def _surface(mask: np.ndarray) -> np.ndarray:
    # border_value=0: outside the array is background, so a mask cut by the border has a face there.
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred, label, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty masks.

    Args:
        pred, label: masks of one shape [*S] (2D or 3D; nonzero = foreground), both non-empty.
        spacing: voxel size per axis (len == ndim), or None for 1.0.

    Returns:
        (pred_to_label [Np], label_to_pred [Nl]) float64: for each surface voxel of one mask,
        the distance in spacing units to the nearest surface voxel of the other.
    """
    pred, label = _check_pair(pred, label)
    spacing = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not label.any():
        raise EvaluationError("surface distances need two non-empty masks")
    # Every surface voxel lies in the union's bounding box; one voxel of margin keeps the
    # erosion there identical to the erosion of the whole array.
    coords = np.nonzero(pred | label)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
        for c, n in zip(coords, pred.shape)
    )
    pred_surface, label_surface = _surface(pred[box]), _surface(label[box])
    to_label = ndimage.distance_transform_edt(~label_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_label[pred_surface], to_pred[label_surface]


def image_diagonal(shape, spacing) -> float:
    """Length in mm of the diagonal of an image of ``shape`` voxels of size ``spacing``."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _counts(pred: np.ndarray, label: np.ndarray) -> dict:
    tp = int(np.count_nonzero(pred & label))
    pred_voxels = int(np.count_nonzero(pred))
    label_voxels = int(np.count_nonzero(label))
    fp, fn = pred_voxels - tp, label_voxels - tp
    tn = pred.size - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "pred_voxels": pred_voxels, "label_voxels": label_voxels}


def voxel_counts(pred, label) -> dict:
    """The voxel counts ``tp fp fn tn pred_voxels label_voxels`` (``COUNT_NAMES``) of two masks
    of one shape (any nonzero value is foreground)."""
    return _counts(*_check_pair(pred, label))


def overlap_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """Count-based metrics (dice, iou, sensitivity, specificity, precision) from the confusion
    counts, with the empty-mask conventions of the module docstring."""
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    both_empty = tp + fp + fn == 0
    return {
        "dice": 1.0 if both_empty else 2 * tp / (2 * tp + fp + fn),
        "iou": 1.0 if both_empty else tp / (tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }


def segmentation_metrics(pred, label, spacing=None) -> dict:
    """All metrics of one binary prediction against its label.

    Args:
        pred, label: masks of one shape [H, W] or [D, H, W] (any nonzero value is foreground).
        spacing: voxel size per axis in mm (len == ndim), or None for 1.0 on every axis.

    Returns:
        dict with the floats dice, iou, hd95, hd95_penalized, assd, sensitivity, specificity,
        precision and the ints tp, fp, fn, tn, pred_voxels, label_voxels. Empty masks: module
        docstring.
    """
    pred, label = _check_pair(pred, label)
    spacing = _check_spacing(spacing, pred.ndim)
    counts = _counts(pred, label)
    pred_voxels, label_voxels = counts["pred_voxels"], counts["label_voxels"]

    if pred_voxels == 0 and label_voxels == 0:
        hd95, assd = 0.0, 0.0
        hd95_penalized = 0.0
    elif pred_voxels == 0 or label_voxels == 0:
        hd95, assd = math.nan, math.nan
        hd95_penalized = image_diagonal(pred.shape, spacing)
    else:
        d_pred, d_label = surface_distances(pred, label, spacing)
        hd95 = float(
            max(np.percentile(d_pred, HD_PERCENTILE), np.percentile(d_label, HD_PERCENTILE))
        )
        assd = float((d_pred.sum() + d_label.sum()) / (d_pred.size + d_label.size))
        hd95_penalized = hd95

    result = overlap_metrics(counts["tp"], counts["fp"], counts["fn"], counts["tn"])
    result.update(hd95=hd95, hd95_penalized=hd95_penalized, assd=assd)
    result = {name: result[name] for name in METRIC_NAMES}
    result.update(counts)
    return result


def multiclass_metrics(pred_labels, label_labels, classes, spacing=None) -> dict:
    """Metrics per class of two integer label maps.

    Args:
        pred_labels, label_labels: integer maps of one shape [H, W] or [D, H, W].
        classes: a sequence of label values (``[1, 2, 4]``), or a mapping from a name to a
            label value or to a sequence of values whose union forms the region
            (``{"whole_tumor": (1, 2, 4), "enhancing": 4}``).
        spacing: voxel size per axis in mm, or None.

    Returns:
        {class value or name: segmentation_metrics(pred in region, label in region)}.
    """
    pred_labels, label_labels = _check_label_maps(pred_labels, label_labels)
    return {
        key: segmentation_metrics(np.isin(pred_labels, values), np.isin(label_labels, values), spacing)
        for key, values in _regions(classes).items()
    }


def union_counts(pred_labels, label_labels, classes) -> dict:
    """``voxel_counts`` of the union of the classes or regions (``classes`` as for
    ``multiclass_metrics``): a voxel is foreground where any class or region holds it, so one
    held by several overlapping regions counts once."""
    pred_labels, label_labels = _check_label_maps(pred_labels, label_labels)
    covered = np.concatenate(list(_regions(classes).values()))
    return voxel_counts(np.isin(pred_labels, covered), np.isin(label_labels, covered))


def _check_label_maps(pred_labels, label_labels) -> tuple[np.ndarray, np.ndarray]:
    pred_labels, label_labels = to_numpy(pred_labels), to_numpy(label_labels)
    if pred_labels.shape != label_labels.shape:
        raise EvaluationError(
            f"prediction shape {pred_labels.shape} does not match label shape "
            f"{label_labels.shape}"
        )
    return pred_labels, label_labels


def _regions(classes) -> dict:
    """{class value or name: array of the label values it unites} of ``multiclass_metrics``'s
    ``classes``."""
    if isinstance(classes, Mapping):
        regions = dict(classes)
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        regions = {c: c for c in classes}
    else:
        raise EvaluationError(f"classes must be a sequence or a mapping, got {classes!r}")
    return {key: np.atleast_1d(np.asarray(values)) for key, values in regions.items()}


def mean_over_classes(per_class: Mapping, union: Mapping) -> dict:
    """The metrics of a K-class result as one: the un-prefixed columns of its metrics.csv row.

    Args:
        per_class: {class: segmentation_metrics of that class}.
        union: ``union_counts`` of the same masks: the voxel counts of the union of the classes.

    Each metric is the mean over the classes that are not empty in both masks (those are left
    out, as from every mean of ``evaluation.report``), nan values left out; nan when no class
    has a value. The distances (hd95, assd) are the exception: a class missed or hallucinated
    (nan distance) makes the row's distance nan too, so that the row counts as a miss in the
    HD95 means, as a one-class row would (``hd95_penalized`` scores it). When every class is
    empty in both masks, the both-empty values (dice 1, hd95 0, ...). The voxel counts are
    ``union``'s: a voxel of overlapping regions counts once, and the row counts as both empty
    exactly when every class is.
    """
    entries = list(per_class.values())
    if not entries:
        raise EvaluationError("mean over classes of no classes")
    scored = [m for m in entries if m["pred_voxels"] or m["label_voxels"]] or entries
    out = {}
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in scored if not math.isnan(float(m[name]))]
        missed = name in DISTANCE_NAMES and len(values) < len(scored)
        out[name] = sum(values) / len(values) if values and not missed else math.nan
    for name in COUNT_NAMES:
        out[name] = int(union[name])
    return out


def class_columns(per_class: Mapping, union: Mapping) -> dict:
    """Per-class metrics -> one flat row: ``{name}_{metric}`` and ``{name}_pred_voxels`` /
    ``{name}_label_voxels`` per class, and the un-prefixed mean over classes with the voxel
    counts of their union (``mean_over_classes``)."""
    row = mean_over_classes(per_class, union)
    for key, metrics in per_class.items():
        row.update({f"{key}_{m}": metrics[m] for m in (*METRIC_NAMES, *CLASS_COUNT_NAMES)})
    return row


def label_map_metrics(pred_labels, label_labels, classes: Mapping, spacing=None) -> dict:
    """``class_columns`` of two integer label maps: ``multiclass_metrics`` per class (a mapping
    from a name to its label value or values), their mean and the counts of their union."""
    return class_columns(multiclass_metrics(pred_labels, label_labels, classes, spacing),
                         union_counts(pred_labels, label_labels, classes))
