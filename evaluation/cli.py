"""Evaluate a folder of predicted masks against a folder of labels.

    python -m evaluation --pred_dir OUT/masks --label_dir DATA/labels [--out_dir OUT] [--dataset files|brats2d|...]
        [--pred_suffix ""] [--label_suffix _seg] [--classes 1,2,4] [--dataset auto]

Like nnU-Net's evaluate-folder: predictions and labels are paired by case id (file name
without extension and suffix, see ``evaluation.files``), every pair is scored with
``evaluation.metrics.segmentation_metrics`` (whole foreground = any nonzero label, spacing
from the label's NIfTI header, else the prediction's, else 1.0), and metrics.csv (one row
per case) and summary.json (means, standard deviations, nan counts) are written to
--out_dir, default --pred_dir. With a layout (``--dataset brats2d``, ``lgg``, ...) whose 2D
cases share patients, each patient is also scored on its slices stacked in 3D (``patient``
rows, the headline), as sample.py does. Means follow ``evaluation.report.CONVENTIONS``.
Labels without a prediction and predictions without a label are listed in summary.json and
not scored. Nothing is written if any pair fails.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.errors import EvaluationError
from evaluation.files import MASK_EXTENSIONS, find_cases, read_mask
from evaluation.metrics import METRIC_NAMES, segmentation_metrics

# Per-class columns carry their voxel counts too, so that both-empty classes leave the means.
VOXEL_COUNTS = ("pred_voxels", "label_voxels")
from evaluation.report import (
    GroupAccumulator,
    has_patient_groups,
    metrics_row,
    summarize,
    write_metrics_csv,
    write_summary_json,
)
from data.layouts import DATASET_CHOICES, scan
from guided_diffusion.atomic import remove_stale_temp_files
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
        "--out_dir", default="", help="where metrics.csv and summary.json go (default: --pred_dir)"
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
        "class<k>_<metric>); the main columns always score the whole foreground "
        "(any nonzero value)",
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
        "models' --label_mode subset); empty = any non-zero value",
    )
    return parser


def _parse_classes(text: str, flag: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers") from err


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
    dataset: str = "files",
    mask_suffix: str = "_mask",
    foreground_labels: tuple[int, ...] = (),
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Score every prediction that has a label.

    Returns:
        (rows for metrics.csv, dict with pred_dir, label_dir, missing_predictions (case ids of
        labels without a prediction) and unmatched_predictions (predictions without a label)).
    """
    pred_dir = _check_folder(pred_dir, "--pred_dir")
    label_dir = _check_folder(label_dir, "--label_dir")
    preds = find_cases(pred_dir, pred_suffix)
    slices = {}
    if dataset == "files":
        labels = find_cases(label_dir, label_suffix)
    else:
        labels, slices = labels_of_layout(label_dir, dataset, mask_suffix)
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
    groups = GroupAccumulator(kind="patient") if has_patient_groups(patients) else None
    rows = []
    # disable=None: the bar shows on a terminal and stays out of redirected logs.
    bar = tqdm(matched, desc="evaluate", unit="case", disable=None if progress else True)
    for case_id in bar:
        pred, label, spacing = _read_pair(preds[case_id], labels[case_id])
        extra = {}
        for value in classes:
            per_class = segmentation_metrics(pred == value, label == value, spacing)
            extra.update({f"class{value}_{m}": per_class[m] for m in (*METRIC_NAMES, *VOXEL_COUNTS)})
        label_fg = np.isin(label, foreground_labels) if foreground_labels else label != 0
        patient = slices[case_id][0] if groups is not None else ""
        rows.append(metrics_row(case_id, segmentation_metrics(pred != 0, label_fg, spacing),
                                group_id=patient, extra=extra))
        if groups is not None:
            groups.add(patient, pred != 0, label_fg, slice_index=slices[case_id][1], spacing=spacing)
    if groups is not None:
        rows.extend(groups.rows())
    info = {
        "pred_dir": str(pred_dir),
        "label_dir": str(label_dir),
        "missing_predictions": sorted(set(labels) - set(preds)),
        "unmatched_predictions": sorted(set(preds) - set(labels)),
    }
    return rows, info


def _read_pair(pred_path, label_path):
    """(prediction, label, spacing): the label's spacing, else the prediction's, else None."""
    pred, pred_spacing = read_mask(pred_path)
    label, label_spacing = read_mask(label_path)
    if pred.shape != label.shape:
        raise EvaluationError(
            f"prediction {pred_path} has shape {pred.shape} but label {label_path} has shape {label.shape}"
        )
    return pred, label, label_spacing if label_spacing is not None else pred_spacing


def labels_of_layout(label_dir, dataset: str, mask_suffix: str) -> tuple[dict, dict]:
    """({case id: label file}, {case id: (patient id, slice index)}) of a dataset layout: a
    slice's or image's case id, or a volume's id (a volume is one case, with no slice entry)."""
    found = scan(str(label_dir), dataset, mask_suffix=mask_suffix)
    labels, slices = {}, {}
    for rec in found.records:
        if rec.label_file is not None:
            case_id = rec.volume_id if found.kind == "volume" else rec.case_id
            labels[case_id] = Path(rec.label_file)
            if found.kind != "volume":
                slices[case_id] = (rec.patient_id, rec.slice_index)
    return labels, slices


def main(argv=None) -> None:
    args = create_argparser().parse_args(argv)
    classes = _parse_classes(args.classes, "--classes")
    foreground_labels = _parse_classes(args.foreground_labels, "--foreground_labels")
    rows, info = evaluate_folders(
        args.pred_dir,
        args.label_dir,
        pred_suffix=args.pred_suffix,
        label_suffix=args.label_suffix,
        classes=classes,
        dataset=args.dataset,
        mask_suffix=args.mask_suffix,
        foreground_labels=foreground_labels,
        progress=True,
    )
    summary = summarize(rows)
    summary.update(info, dataset=args.dataset, classes=list(classes), foreground_labels=list(foreground_labels))
    out_dir = Path(args.out_dir or args.pred_dir)
    remove_stale_temp_files(out_dir, depth=0)
    try:
        write_metrics_csv(rows, out_dir / "metrics.csv")
        write_summary_json(summary, out_dir / "summary.json")
    except OSError as err:
        raise EvaluationError(f"--out_dir {out_dir}: cannot write ({err.strerror})") from err
    for key, what in (
        ("missing_predictions", "labels without a prediction"),
        ("unmatched_predictions", "predictions without a label"),
    ):
        if info[key]:
            print(f"note: {what}: {len(info[key])} (listed in summary.json)", file=sys.stderr)
    print(f"evaluated {summary['n_cases']} cases: {headline_text(summary)}; "
          f"wrote {out_dir / 'metrics.csv'} and {out_dir / 'summary.json'}")


def headline_text(summary: dict) -> str:
    """``mean dice per patient 0.8123 (5 patients); per case 0.7710 (3 both empty left out)``."""
    def mean(kind):
        dice = summary["kinds"][kind]["metrics"].get("dice", {})
        return "undefined" if dice.get("mean") is None else f"{dice['mean']:.4f}"

    case = summary["kinds"]["case"]
    per_case = f"{mean('case')} ({case['n_both_empty']} both empty left out)"
    kind = summary["headline"]["kind"]
    if kind == "case":
        return f"mean dice per case {per_case}"
    n = summary["headline"]["n"]
    return f"mean dice per {kind} {mean(kind)} ({n} {kind}{'s' if n != 1 else ''}); per case {per_case}"

