"""Metric tables, summaries, per-volume aggregation and 16-bit maps."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from evaluation.errors import EvaluationError
from evaluation.metrics import METRIC_NAMES, label_map_metrics, segmentation_metrics
from evaluation.report import (
    CONVENTIONS,
    GroupAccumulator,
    class_summary,
    conventions,
    metrics_row,
    read_metrics_csv,
    read_uint16_png,
    results_text,
    save_uint16_png,
    summarize,
    write_metrics_csv,
    write_summary_json,
)


def square(shape, top, left, size=3):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_group_dice_is_the_3d_dice_not_the_mean_of_slices():
    empty = np.zeros((6, 6), dtype=bool)
    dot = empty.copy()
    dot[2, 2] = True
    big = square((6, 6), 1, 1)
    acc = GroupAccumulator(kind="patient")
    # Slice 0: one pixel found exactly (dice 1). Slice 1: 9 pixels missed (dice 0).
    acc.add("p1", empty, big, slice_index=1)
    acc.add("p1", dot, dot, slice_index=0)
    slice_dices = [segmentation_metrics(dot, dot)["dice"], segmentation_metrics(empty, big)["dice"]]
    assert np.mean(slice_dices) == pytest.approx(0.5)
    (row,) = acc.rows()
    # Stacked: tp 1, fp 0, fn 9 -> dice 2 / 11.
    assert row["dice"] == pytest.approx(2 / 11)
    assert (row["case_id"], row["group_id"], row["kind"]) == ("p1", "p1", "patient")
    assert row["tn"] == 72 - 10


def test_group_uses_slice_thickness_and_keeps_gaps():
    mask = square((5, 5), 1, 1)
    empty = np.zeros((5, 5), dtype=bool)
    acc = GroupAccumulator()
    # Result on slice 3, label on slice 5, slice 4 never given: both are single-slice
    # squares whose every voxel is 2 slices (2 * 2.5 mm) from the other.
    acc.add("v", mask, empty, slice_index=3, spacing=(1.0, 1.0), slice_thickness=2.5,
            preseg=mask)
    acc.add("v", empty, mask, slice_index=5, spacing=(1.0, 1.0), slice_thickness=2.5,
            preseg=mask)
    row = acc.compute("v")
    assert row["kind"] == "volume"
    assert row["dice"] == 0.0
    assert row["hd95"] == pytest.approx(5.0) and row["assd"] == pytest.approx(5.0)
    assert row["tn"] == 2 * 25 - 18
    assert row["specificity"] == pytest.approx(32 / 41)
    # Pre-segmentation on both slices: tp 9, fp 9 -> dice 18 / 27.
    assert row["preseg_dice"] == pytest.approx(2 / 3)


def test_group_of_label_maps_is_scored_per_class_in_3d():
    acc = GroupAccumulator(kind="volume", classes={"WT": (1, 2, 4), "ET": 4})
    pred = np.array([[2, 2, 4, 0]])
    label = np.array([[2, 2, 4, 4]])
    acc.add("v", pred, label, slice_index=0, preseg=label)
    acc.add("v", np.zeros((1, 4), dtype=int), label, slice_index=1, preseg=label)
    row = acc.compute("v")
    # WT: tp 3 of 8 label voxels -> dice 6/11; ET: tp 1 of 4 -> 2/5.
    assert row["WT_dice"] == pytest.approx(6 / 11) and row["ET_dice"] == pytest.approx(2 / 5)
    assert row["dice"] == pytest.approx((6 / 11 + 2 / 5) / 2)
    # The union of the regions is WT (which holds ET): its counts, each voxel once, on the given slices.
    assert row["WT_label_voxels"] == 8 and row["label_voxels"] == 8 and row["pred_voxels"] == 3
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (3, 0, 5, 0)
    assert row["preseg_WT_dice"] == row["preseg_ET_dice"] == row["preseg_dice"] == 1.0


def test_per_class_summary_holds_the_label_values_and_the_headline_kinds_means():
    classes = {"WT": (1, 2, 4), "ET": 4}
    acc = GroupAccumulator(kind="volume", classes=classes)
    acc.add("v", np.array([[2, 2, 0, 0]]), np.array([[2, 2, 4, 4]]), slice_index=0)
    summary = summarize([metrics_row("v_000", {"dice": 0.5, "pred_voxels": 2, "label_voxels": 4},
                                     group_id="v"), *acc.rows()])
    summary.update(class_summary(summary, classes))
    assert list(summary["per_class"]) == ["WT", "ET"]
    wt, et = summary["per_class"]["WT"], summary["per_class"]["ET"]
    assert wt["label_values"] == [1, 2, 4] and et["label_values"] == [4]
    # The volume row is the headline: its per-class means, every metric; ET missed: hd95 undefined.
    assert wt["dice"] == pytest.approx(2 / 3) and et["dice"] == 0.0 and et["hd95"] is None
    assert set(wt) == {"label_values", *METRIC_NAMES, "counts"}
    assert et["counts"]["hd95"] == {"n_valid": 0, "n_nan": 1, "n_both_empty": 0}
    assert results_text(summary).startswith("dice per volume by class: WT 0.6667, ET 0.0000, mean of the "
                                            "classes 0.3333; mean dice per volume over the classes present in each ")
    assert class_summary(summarize([]), classes) == {"per_class": {},
                                                     "conventions": conventions(several_classes=True)}


BRATS_REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": 4}


def regions_summary(volumes) -> dict:
    """summary.json's figures of {volume id: (prediction, label)} (2D label maps, one slice per
    volume), scored in BRATS_REGIONS per case and per volume, as sample.py scores them."""
    acc = GroupAccumulator(kind="volume", classes=BRATS_REGIONS)
    rows = []
    for volume, (pred, label) in volumes.items():
        rows.append(metrics_row(f"{volume}_000", label_map_metrics(pred, label, BRATS_REGIONS), group_id=volume))
        acc.add(volume, pred, label, slice_index=0)
    summary = summarize(rows + acc.rows())
    summary.update(class_summary(summary, BRATS_REGIONS))
    return summary


def test_several_classes_give_the_mean_of_the_class_means_first_and_the_row_mean_named_as_such():
    # A: WT and TC perfect, ET absent in both. B: WT and TC perfect, ET missed (called core).
    label_a, label_b = np.zeros((5, 5), dtype=int), np.zeros((5, 5), dtype=int)
    label_a[1:4, 1:4], label_a[2, 2] = 2, 1
    label_b[1:4, 1:4], label_b[2, 2:4] = 2, (1, 4)
    pred_b = np.where(label_b == 4, 1, label_b)
    summary = regions_summary({"A": (label_a, label_a), "B": (pred_b, label_b)})
    volume = summary["kinds"]["volume"]["metrics"]
    # The un-prefixed column: each volume's mean over the regions present in it, (1 + 2/3) / 2.
    assert volume["dice"]["mean"] == pytest.approx(5 / 6)
    per_class = summary["per_class"]
    assert [per_class[n]["dice"] for n in BRATS_REGIONS] == [1.0, 1.0, 0.0]
    assert per_class["ET"]["counts"]["dice"] == {"n_valid": 1, "n_nan": 0, "n_both_empty": 1}
    assert per_class["ET"]["counts"]["hd95"] == {"n_valid": 0, "n_nan": 1, "n_both_empty": 1}
    assert per_class["WT"]["counts"]["dice"] == {"n_valid": 2, "n_nan": 0, "n_both_empty": 0}
    # class_mean: nnU-Net's foreground mean, the mean of the three region means; ET's HD95 is
    # undefined (its one volume is a miss), left out and counted.
    assert summary["class_mean"]["dice"] == {"mean": pytest.approx(2 / 3), "n_valid": 3, "n_undefined": 0}
    assert summary["class_mean"]["hd95"] == {"mean": 0.0, "n_valid": 2, "n_undefined": 1}
    assert summary["class_mean"]["hd95_penalized"]["mean"] == pytest.approx(
        np.mean([per_class[n]["hd95_penalized"] for n in BRATS_REGIONS]))
    assert results_text(summary) == (
        "dice per volume by class: WT 1.0000, TC 1.0000, ET 0.0000 (1 volume), mean of the classes 0.6667; "
        "mean dice per volume over the classes present in each 0.8333 (2 volumes); per case 0.8333 (2 cases, "
        "0 both empty left out)")
    # Row B's HD95 is undefined although neither of its union masks is empty: the conventions of a
    # summary of several classes say so, and how the two means differ.
    assert volume["hd95"]["n_nan"] == 1 and summary["conventions"] == CONVENTIONS
    assert "in any class present in it" in CONVENTIONS["hd95"]
    assert "foreground_mean" in CONVENTIONS["classes"] and "union" in CONVENTIONS["classes"]
    # A class undefined in every unit leaves the mean of the classes and says on how many it rests.
    et_everywhere_absent = regions_summary({"A": (label_a, label_a)})
    assert et_everywhere_absent["class_mean"]["dice"] == {"mean": 1.0, "n_valid": 2, "n_undefined": 1}
    assert results_text(et_everywhere_absent).startswith(
        "dice per volume by class: WT 1.0000, TC 1.0000, ET undefined (0 volumes), mean of the classes 1.0000 "
        "(2 of 3 classes); mean dice per volume over the classes present in each 1.0000 (1 volume)")


def test_one_class_or_one_foreground_summaries_keep_their_conventions_and_line():
    one_foreground = conventions(several_classes=False)
    assert list(one_foreground) == ["both_empty", "hd95", "hd95_penalized", "headline", "std"]
    assert one_foreground["hd95"] == ("mean over the cases where both masks are non-empty; n_nan counts the "
                                      "one-sided misses (exactly one mask empty), where hd95 is undefined")
    rows = [metrics_row("c", segmentation_metrics(square((6, 6), 1, 1), square((6, 6), 1, 2)))]
    summary = summarize(rows)
    assert summary["conventions"] == one_foreground
    line = results_text(summary)
    assert line.startswith("mean dice per case 0.6667 (1 cases") and "class" not in line
    # One class: its means and counts, no mean over classes.
    label = np.array([[4, 4, 0, 0]])
    one = summarize([metrics_row("c", label_map_metrics(label, label, {"ET": 4}))])
    entries = class_summary(one, {"ET": 4})
    assert set(entries) == {"per_class"} and entries["per_class"]["ET"]["dice"] == 1.0


def test_group_errors():
    acc = GroupAccumulator()
    acc.add("v", np.zeros((4, 4)), np.zeros((4, 4)), slice_index=0)
    with pytest.raises(EvaluationError, match="twice"):
        acc.add("v", np.zeros((4, 4)), np.zeros((4, 4)), slice_index=0)
    with pytest.raises(EvaluationError, match="shape"):
        acc.add("v", np.zeros((4, 5)), np.zeros((4, 5)), slice_index=1)
    with pytest.raises(EvaluationError, match="no slices"):
        acc.compute("other")


def _rows():
    a = segmentation_metrics(square((8, 8), 1, 1), square((8, 8), 2, 1))
    empty = np.zeros((8, 8), dtype=bool)
    b = segmentation_metrics(empty, square((8, 8), 2, 2))
    pre = segmentation_metrics(square((8, 8), 2, 2), square((8, 8), 2, 2))
    return [
        metrics_row("c1", a, group_id="g1", preseg_metrics=pre, extra={"class1_dice": 0.25}),
        metrics_row("c2", b, group_id="g1", preseg_metrics=pre),
        metrics_row("g1", a, group_id="g1", kind="volume"),
    ]


def test_csv_round_trip(tmp_path):
    rows = _rows()
    path = tmp_path / "out" / "metrics.csv"
    write_metrics_csv(rows, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:6] == ["case_id", "group_id", "kind", "dice", "iou", "hd95"]
    assert header.index("preseg_dice") > header.index("label_voxels")
    assert header[-1] == "class1_dice"
    back = read_metrics_csv(path)
    assert [r["case_id"] for r in back] == ["c1", "c2", "g1"]
    assert back[0]["dice"] == rows[0]["dice"] and back[0]["tp"] == 6
    assert math.isnan(back[1]["hd95"])
    assert back[1]["class1_dice"] is None and back[2]["preseg_dice"] is None
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]


def test_summary_and_json(tmp_path):
    summary = summarize(_rows())
    assert summary["n_cases"] == 2
    case = summary["kinds"]["case"]
    assert case["n"] == 2 and summary["kinds"]["volume"]["n"] == 1
    dice = case["metrics"]["dice"]
    assert dice["mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert dice["std"] == pytest.approx(1 / 3)
    hd = case["metrics"]["hd95"]
    assert (hd["n_valid"], hd["n_nan"], hd["mean"]) == (1, 1, 1.0)
    assert case["metrics"]["preseg_dice"]["mean"] == 1.0
    assert "tp" not in case["metrics"] and "preseg_fn" not in case["metrics"]
    assert case["metrics"]["class1_dice"]["n_nan"] == 1

    summary["nan_value"] = float("nan")
    path = tmp_path / "summary.json"
    write_summary_json(summary, path)
    back = json.loads(path.read_text())
    assert back["kinds"]["case"]["metrics"]["hd95"]["n_nan"] == 1
    assert back["nan_value"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_both_empty_slices_leave_the_means_and_the_volume_is_the_headline(tmp_path):
    """A 10-slice volume: 6 slices without tumour (predicted empty), 4 lesion slices scoring
    Dice 1, 1, 0.75 and a missed one. Counting the empty slices as Dice 1 reports 0.875."""
    shape = (8, 8)
    lesion = np.zeros(shape, dtype=bool)
    lesion[2, 1:5] = True
    shifted = np.roll(lesion, 1, axis=1)  # 3 of 4 pixels: Dice 0.75, HD95 0.85 (of 0, 0, 0, 1)
    empty = np.zeros(shape, dtype=bool)
    slices = [(empty, empty)] * 6 + [(lesion, lesion), (lesion, lesion), (shifted, lesion), (empty, lesion)]
    rows, volume = [], GroupAccumulator(kind="volume")
    for k, (pred, label) in enumerate(slices):
        rows.append(metrics_row(f"v_{k:03d}", segmentation_metrics(pred, label), group_id="v"))
        volume.add("v", pred, label, slice_index=k)
    rows += volume.rows()
    write_metrics_csv(rows, tmp_path / "metrics.csv")

    for table in (rows, read_metrics_csv(tmp_path / "metrics.csv")):
        summary = summarize(table)
        case = summary["kinds"]["case"]
        assert case["n"] == 10 and case["n_both_empty"] == 6
        dice = case["metrics"]["dice"]
        assert dice["mean"] == pytest.approx(2.75 / 4) and dice["n_valid"] == 4 and dice["n_both_empty"] == 6
        hd = case["metrics"]["hd95"]
        assert (hd["n_valid"], hd["n_nan"], hd["mean"]) == (3, 1, pytest.approx(0.85 / 3))
        penalized = case["metrics"]["hd95_penalized"]
        assert penalized["n_valid"] == 4
        assert penalized["mean"] == pytest.approx((0.85 + math.hypot(8, 8)) / 4)
        headline = summary["headline"]
        assert headline["kind"] == "volume" and headline["n"] == 1
        assert headline["dice"]["mean"] == pytest.approx(2 * 11 / (12 + 16))
        assert "both_empty" in summary["conventions"] and "diagonal" in summary["conventions"]["hd95_penalized"]


def test_uint16_png_round_trip(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [1.0, 1.5, -1.0]])
    path = tmp_path / "unc.png"
    save_uint16_png(values, path)
    with Image.open(path) as img:
        assert img.mode == "I;16" and img.size == (3, 2)
    back = read_uint16_png(path)
    np.testing.assert_allclose(back, np.clip(values, 0, 1), atol=1 / 65535)
