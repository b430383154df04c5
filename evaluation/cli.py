"""Evaluate a folder of predicted masks against a folder of labels.

    python -m evaluation --pred_dir OUT/masks --label_dir DATA/labels [--out FILE.csv] [--dataset files|brats2d|...]
        [--pred_suffix ""] [--label_suffix _seg] [--classes 1,2,4 | --regions "WT:1,2,4;TC:1,4;ET:4"]
        [--foreground_labels 1,4]

Like nnU-Net's evaluate-folder: predictions and labels are paired by case id (file name
without extension and suffix, see ``evaluation.files``), every pair is scored with
``evaluation.metrics.segmentation_metrics`` (whole foreground = any nonzero label, spacing
from the label's NIfTI header, else the prediction's, else 1.0), with the rows and
conventions of sample.py's metrics.csv (``evaluation.report.CONVENTIONS``):

- a 2D pair is one ``case`` row; with a layout (``--dataset brats2d``, ``lgg``, ...) whose 2D
  cases share patients, each patient is also scored on its slices stacked in 3D (``patient``
  rows, the headline);
- a 3D pair is a volume: one ``case`` row per axial slice (``<volume>_<slice:03d>``, as
  sample.py names the slices of a volume) and one ``volume`` row scored on the whole volume
  (the headline).

The table goes to ``--out FILE.csv`` and the summary (means, standard deviations, counts) to
``FILE.json`` beside it; by default beside the predictions folder, not inside it
(``OUT/masks`` -> ``OUT/masks_evaluation.csv`` and ``.json``), so that a folder of masks
holds masks only. ``--out_dir D`` writes ``D/metrics.csv`` and ``D/summary.json`` instead.
Labels without a prediction and predictions without a label are listed in the summary and
not scored. Nothing is written if any pair fails.

Several classes or regions (``--classes 1,2,4``, or ``--regions "WT:1,2,4;TC:1,4;ET:4"`` as
nnU-Net's evaluate-folder scores BraTS): every row (case, patient, volume) gets the columns
``<name>_<metric>``, ``<name>_pred_voxels`` and ``<name>_label_voxels`` of each class
(``class<v>``) or region (its name), the summary their means per row kind and, under
``per_class``, the label values and the headline kind's means of each with their counts, as in
sample.py's summary (``evaluation.report.class_summary``). With two or more, the un-prefixed
columns hold each row's mean over the classes present in it and the voxel counts of their union
(``evaluation.metrics.mean_over_classes``), and the summary's ``class_mean`` the mean of the
per-class means (nnU-Net's foreground_mean); with one they score that class or region, which
is then the whole foreground. The flags are checked as the models' are (``--classes 0,1`` and
``1,1`` are refused), and a value that no class or region covers, in a label or a prediction, is
an error naming the file (it would silently count as background), with one class or region as
with several (``data.preprocess.check_covered_by``, the rule of the models' label modes); a
subset of the labels as one foreground is ``--foreground_labels``, without them.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.errors import EvaluationError
from evaluation.files import MASK_EXTENSIONS, find_cases, read_mask, slice_axis
from evaluation.metrics import label_map_metrics, segmentation_metrics
from evaluation.report import (
    GroupAccumulator,
    class_summary,
    has_patient_groups,
    metrics_row,
    results_text,
    summarize,
    write_metrics_csv,
    write_summary_json,
)
from data.layouts import DATASET_CHOICES, scan
from data.preprocess import (
    check_classes,
    check_covered_by,
    check_foreground_values,
    class_name,
    format_regions,
    label_values,
    parse_classes,
    parse_regions,
)
from guided_diffusion import run_report
from guided_diffusion.atomic import check_writable_dir, remove_stale_temp_files
from guided_diffusion.errors import ConfigError

DATASETS = ("files",) + tuple(d for d in DATASET_CHOICES if d != "auto")


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Score predicted masks against labels; write metrics.csv and summary.json.",
    )
    parser.add_argument(
        "--pred_dir", required=True, help="folder of predicted masks (one file per case)"
    )
    parser.add_argument(
        "--label_dir", required=True, help="folder of label masks (one file per case)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="the metrics table to write (FILE.csv; the summary goes to FILE.json beside it); "
        "default: beside --pred_dir, <pred_dir>_evaluation.csv",
    )
    parser.add_argument(
        "--out_dir", default="", help="instead of --out: write metrics.csv and summary.json in this folder"
    )
    parser.add_argument(
        "--pred_suffix",
        default="",
        help="suffix of prediction file names before the extension, removed to get the case id",
    )
    parser.add_argument(
        "--label_suffix",
        default="",
        help="suffix of label file names before the extension (e.g. _seg), removed to get the "
        "case id; only files with this suffix are labels",
    )
    parser.add_argument(
        "--classes",
        default="",
        help="comma-separated label values to score one by one as well (columns "
        "class<k>_<metric>); every label and predicted value must be one of them; with two or more "
        "the main columns hold each row's mean over them, with one they score that class",
    )
    parser.add_argument(
        "--regions",
        default="",
        help="instead of --classes: overlapping regions NAME:values separated by ';', each scored "
        "on the union of its label values (columns <name>_<metric>), e.g. BraTS "
        "\"WT:1,2,4;TC:1,4;ET:4\" (2023: \"WT:1,2,3;TC:1,3;ET:3\"); with two or more the main "
        "columns hold their mean; every label and predicted value must lie in one of them",
    )
    parser.add_argument(
        "--dataset",
        default="files",
        choices=DATASETS,
        help="how labels are found: 'files' reads each file in --label_dir as one case "
        f"({', '.join(MASK_EXTENSIONS)}); a layout name ({', '.join(DATASETS[1:])}) reads "
        "--label_dir as that dataset layout (e.g. the test folder sample.py ran on), "
        "pairing each case (or volume) id with the file of the same name in --pred_dir",
    )
    parser.add_argument(
        "--mask_suffix", default="_mask", help="with --dataset lgg: suffix that marks a mask file"
    )
    parser.add_argument(
        "--foreground_labels",
        default="",
        help="label values that count as foreground, e.g. 1,4 for BraTS tumour core (as the "
        "models' --label_mode subset); empty = any non-zero value; not with --classes/--regions",
    )
    return parser


def _check_folder(path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: folder not found")
    return path


def evaluate_folders(
    pred_dir,
    label_dir,
    *,
    pred_suffix: str = "",
    label_suffix: str = "",
    classes: tuple[int, ...] = (),
    regions: tuple = (),
    dataset: str = "files",
    mask_suffix: str = "_mask",
    foreground_labels: tuple[int, ...] = (),
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Score every prediction that has a label (rows as the module docstring says).

    classes: label values scored one by one; regions: ((name, values), ...) scored on the
    union of their values (``data.preprocess.parse_regions``); one or the other.

    Returns:
        (rows for metrics.csv: case rows, then the patient or volume rows, dict with pred_dir,
        label_dir, missing_predictions (case ids of labels without a prediction) and
        unmatched_predictions (predictions without a label)).
    """
    regions = parse_regions(regions)
    scorer = _Scorer(class_sets(classes, regions), foreground_labels)
    pred_dir = _check_folder(pred_dir, "--pred_dir")
    label_dir = _check_folder(label_dir, "--label_dir")
    preds = find_cases(pred_dir, pred_suffix)
    slices, axes = {}, {}
    if dataset == "files":
        labels = find_cases(label_dir, label_suffix)
    else:
        labels, slices, axes = labels_of_layout(label_dir, dataset, mask_suffix)
    for cases, folder, flag, suffix in (
        (preds, pred_dir, "--pred_dir", pred_suffix),
        (labels, label_dir, "--label_dir", label_suffix),
    ):
        if not cases:
            ending = f" ending with {suffix!r}" if suffix else ""
            raise EvaluationError(
                f"{flag} {folder}: no mask files{ending} ({', '.join(MASK_EXTENSIONS)})"
            )
    matched = sorted(set(preds) & set(labels))
    if not matched:
        raise EvaluationError(
            f"no case ids match between --pred_dir {pred_dir} (e.g. {min(preds)!r}) and "
            f"--label_dir {label_dir} (e.g. {min(labels)!r}); check --pred_suffix/--label_suffix"
        )
    patients = [slices[c][0] for c in matched if c in slices]
    groups = _PatientGroups(scorer) if has_patient_groups(patients) else None
    rows, volume_rows = [], []
    # disable=None: the bar shows on a terminal and stays out of redirected logs.
    for case_id in tqdm(matched, desc="evaluate", unit="case", disable=None if progress else True):
        pred, label, spacing = _read_pair(preds[case_id], labels[case_id])
        if scorer.sets:
            for mask, path in ((label, labels[case_id]), (pred, preds[case_id])):
                check_covered_by(label_values(mask, path), path, classes=classes, regions=regions)
        if pred.ndim == 3:
            axis = axes[case_id] if case_id in axes else slice_axis(labels[case_id])
            rows.extend(scorer.slice_rows(case_id, pred, label, spacing, axis))
            volume_rows.append(scorer.row(case_id, pred, label, spacing, group_id=case_id, kind="volume"))
            continue
        patient = slices[case_id][0] if groups is not None else ""
        rows.append(scorer.row(case_id, pred, label, spacing, group_id=patient))
        if groups is not None:
            groups.add(patient, pred, label, slice_index=slices[case_id][1], spacing=spacing)
    rows.extend(volume_rows)
    if groups is not None:
        rows.extend(groups.rows())
    info = {
        "pred_dir": str(pred_dir),
        "label_dir": str(label_dir),
        "missing_predictions": sorted(set(labels) - set(preds)),
        "unmatched_predictions": sorted(set(preds) - set(labels)),
    }
    return rows, info


def class_sets(classes=(), regions=()) -> tuple:
    """((name, values), ...): ``class<v>`` for each of ``classes``, or ``regions`` (as
    ``parse_regions`` gives them) as they are; classes checked as the models' ``--classes`` are
    (values > 0, each once)."""
    if classes and regions:
        raise EvaluationError("give classes or regions, not both")
    if regions:
        return tuple((str(name), tuple(int(v) for v in values)) for name, values in regions)
    check_classes(classes)
    return tuple((class_name(v), (int(v),)) for v in classes)


class _Scorer:
    """metrics.csv rows of a prediction against its label: the whole foreground (or, for two or
    more classes or regions, their mean), and each class or region as ``<name>_`` columns
    (``evaluation.metrics.label_map_metrics``)."""

    def __init__(self, sets, foreground_labels):
        self.sets = tuple(sets)
        self.classes = dict(self.sets)
        self.foreground_labels = tuple(foreground_labels)
        # One class or region covers every value: the main columns score the whole foreground,
        # as without the flag.
        self.mean_headline = len(self.sets) > 1
        if self.sets and self.foreground_labels:
            raise ConfigError("--foreground_labels scores a subset of the label values as one foreground, "
                              "--classes/--regions must cover every value: give one or the other")

    def foreground(self, label: np.ndarray) -> np.ndarray:
        return np.isin(label, self.foreground_labels) if self.foreground_labels else label != 0

    def metrics(self, pred, label, spacing) -> dict:
        columns = label_map_metrics(pred, label, self.classes, spacing) if self.classes else {}
        if not self.mean_headline:
            columns.update(segmentation_metrics(pred != 0, self.foreground(label), spacing))
        return columns

    def row(self, case_id, pred, label, spacing, *, group_id: str = "", kind: str = "case") -> dict:
        return metrics_row(case_id, self.metrics(pred, label, spacing), group_id=group_id, kind=kind)

    def slice_rows(self, volume_id, pred, label, spacing, axis: int) -> list:
        """One case row per slice along ``axis``, named as sample.py names a volume's slices."""
        plane = None if spacing is None else tuple(s for a, s in enumerate(spacing) if a != axis)
        return [self.row(f"{volume_id}_{k:03d}", np.take(pred, k, axis=axis), np.take(label, k, axis=axis),
                         plane, group_id=volume_id)
                for k in range(pred.shape[axis])]


class _PatientGroups:
    """Patient rows of 2D cases, scored on their slices stacked in 3D: per class or region
    (with their mean) and, as ``_Scorer`` does, the whole foreground in the main columns."""

    def __init__(self, scorer: _Scorer):
        self.scorer = scorer
        self.per_class = GroupAccumulator(kind="patient", classes=scorer.classes) if scorer.classes else None
        self.whole = None if scorer.mean_headline else GroupAccumulator(kind="patient")

    def add(self, patient: str, pred, label, *, slice_index: int, spacing) -> None:
        if self.per_class is not None:
            self.per_class.add(patient, pred, label, slice_index=slice_index, spacing=spacing)
        if self.whole is not None:
            self.whole.add(patient, pred != 0, self.scorer.foreground(label), slice_index=slice_index,
                           spacing=spacing)

    def rows(self) -> list:
        rows = []
        groups = self.whole if self.whole is not None else self.per_class
        for patient in groups.group_ids:
            row = self.per_class.compute(patient) if self.per_class is not None else {}
            if self.whole is not None:
                row.update(self.whole.compute(patient))
            rows.append(row)
        return rows


def _read_pair(pred_path, label_path):
    """(prediction, label, spacing): the label's spacing, else the prediction's, else None."""
    pred, pred_spacing = read_mask(pred_path)
    label, label_spacing = read_mask(label_path)
    if pred.shape != label.shape:
        raise EvaluationError(
            f"prediction {pred_path} has shape {pred.shape} but label {label_path} has shape {label.shape}"
        )
    return pred, label, label_spacing if label_spacing is not None else pred_spacing


def labels_of_layout(label_dir, dataset: str, mask_suffix: str) -> tuple[dict, dict, dict]:
    """({case id: label file}, {case id: (patient id, slice index)}, {volume id: slice axis}) of
    a dataset layout: a slice's or image's case id, or a volume's id (a volume is one case,
    cut along its layout's slice axis)."""
    found = scan(str(label_dir), dataset, mask_suffix=mask_suffix)
    labels, slices, axes = {}, {}, {}
    for rec in found.records:
        if rec.label_file is not None:
            case_id = rec.volume_id if found.kind == "volume" else rec.case_id
            labels[case_id] = Path(rec.label_file)
            if found.kind == "volume":
                axes[case_id] = rec.slice_axis
            else:
                slices[case_id] = (rec.patient_id, rec.slice_index)
    return labels, slices, axes


def output_paths(args) -> tuple[Path, Path]:
    """(metrics table, summary) from --out / --out_dir; by default beside --pred_dir."""
    if args.out and args.out_dir:
        raise ConfigError("give --out FILE or --out_dir DIR, not both")
    if args.out_dir:
        return Path(args.out_dir) / "metrics.csv", Path(args.out_dir) / "summary.json"
    if args.out:
        table = Path(args.out)
        if table.suffix.lower() == ".json":
            raise ConfigError(f"--out {table}: give the table's name (.csv); the summary goes beside it as .json")
    else:
        pred_dir = Path(args.pred_dir).resolve()
        table = pred_dir.parent / f"{pred_dir.name}_evaluation.csv"
    return table, table.with_suffix(".json")


def main(argv=None) -> None:
    args = create_argparser().parse_args(argv)
    started = time.perf_counter()
    classes = parse_classes(args.classes, "--classes")
    foreground_labels = parse_classes(args.foreground_labels, "--foreground_labels")
    check_foreground_values(foreground_labels, "--foreground_labels")
    regions = parse_regions(args.regions)
    if classes and regions:
        raise ConfigError("give --classes or --regions, not both")
    sets = class_sets(classes, regions)
    table, summary_path = output_paths(args)
    check_writable_dir(table.parent, "--out_dir" if args.out_dir else "--out")
    rows, info = evaluate_folders(
        args.pred_dir,
        args.label_dir,
        pred_suffix=args.pred_suffix,
        label_suffix=args.label_suffix,
        classes=classes,
        regions=regions,
        dataset=args.dataset,
        mask_suffix=args.mask_suffix,
        foreground_labels=foreground_labels,
        progress=True,
    )
    summary = summarize(rows)
    summary.update(info, dataset=args.dataset, classes=list(classes), foreground_labels=list(foreground_labels))
    if regions:
        summary["regions"] = format_regions(regions)
    if sets:
        summary.update(class_summary(summary, dict(sets)))
    summary["results"] = results_text(summary)
    try:
        table.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(table.parent, depth=0)
        write_metrics_csv(rows, table)
        write_summary_json(summary, summary_path)
    except OSError as err:
        raise EvaluationError(f"{table.parent}: cannot write ({err.strerror})") from err
    for key, what in (
        ("missing_predictions", "labels without a prediction"),
        ("unmatched_predictions", "predictions without a label"),
    ):
        if info[key]:
            print(f"note: {what}: {len(info[key])} (listed in {summary_path})", file=sys.stderr)
    print(run_report.closing("evaluation", [summary["results"], f"wrote {table} and {summary_path}"],
                             time.perf_counter() - started))
