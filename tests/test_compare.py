"""evaluation.compare on hand-written sample.py outputs; intervals checked by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.compare import compare_runs, format_table, main, mean_ci, parse_runs
from evaluation.errors import EvaluationError
from evaluation.metrics import label_map_metrics
from evaluation.report import metrics_row, write_metrics_csv
from guided_diffusion.errors import AddpmError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two-sided 97.5% quantiles of Student's t, from a printed table.
T_975 = {2: 4.302652729749464, 3: 3.182446305284263}

# p2_000 misses a lesion (HD95 undefined, the image diagonal 50 mm as its penalty); p2_002 is
# empty in label and prediction alike, and is left out of every mean.
METRICS_CSV = """\
case_id,group_id,kind,dice,iou,hd95,hd95_penalized,assd,pred_voxels,label_voxels,preseg_dice
p1_000,p1,case,0.8,0.67,2.0,2.0,1.0,10,12,0.7
p1_001,p1,case,0.6,0.43,4.0,4.0,1.5,9,6,0.5
p2_000,p2,case,0.0,0.0,nan,50.0,,0,9,0.6
p2_001,p2,case,0.9,0.82,6.0,6.0,0.5,11,10,0.8
p2_002,p2,case,1.0,1.0,0.0,0.0,0.0,0,0,1.0
p1,p1,patient,0.72,0.56,3.0,3.0,1.2,19,18,0.6
p2,p2,patient,0.82,0.69,5.0,5.0,0.8,11,19,0.7
"""


def write_run(folder: Path, csv_text: str = METRICS_CSV, **summary) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(csv_text)
    record = {"sampler": "addpm", "num_ensemble": 3, "unet_evaluations_per_image": 150,
              "unet_evaluations_per_member": 50, "seconds_per_image": 1.25, "device": "cpu"}
    record.update(summary)
    (folder / "summary.json").write_text(json.dumps(record))
    return folder


def test_mean_ci_matches_hand_computation():
    # dice 0.8, 0.6, 0.7, 0.9: mean 0.75, s = sqrt(0.05 / 3), n = 4.
    ci = mean_ci([0.8, 0.6, 0.7, 0.9])
    half = T_975[3] * math.sqrt(0.05 / 3) / 2
    assert ci["n"] == 4 and ci["n_nan"] == 0
    assert ci["mean"] == pytest.approx(0.75)
    assert ci["std"] == pytest.approx(math.sqrt(0.05 / 3))
    assert ci["low"] == pytest.approx(0.75 - half)
    assert ci["high"] == pytest.approx(0.75 + half)


def test_mean_ci_leaves_out_nan_and_needs_two_values():
    # hd95 2, 4, nan, 6: mean 4, s = 2 on n = 3.
    ci = mean_ci([2.0, 4.0, math.nan, 6.0, None])
    half = T_975[2] * 2 / math.sqrt(3)
    assert (ci["n"], ci["n_nan"]) == (3, 2)
    assert ci["low"] == pytest.approx(4 - half) and ci["high"] == pytest.approx(4 + half)
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and one["low"] is None and one["high"] is None
    none = mean_ci([math.nan])
    assert none["mean"] is None and none["n_nan"] == 1
    constant = mean_ci([0.3, 0.3, 0.3])
    assert constant["low"] == pytest.approx(0.3) and constant["high"] == pytest.approx(0.3)


def test_compare_runs_case_and_patient_levels(tmp_path):
    run = write_run(tmp_path / "addpm")
    (row,) = compare_runs({"addpm": run})
    assert row["name"] == "addpm" and row["sampler"] == "addpm"
    assert row["unet_evaluations_per_image"] == 150 and row["seconds_per_image"] == 1.25
    case = row["case"]
    assert case["n"] == 5 and case["n_both_empty"] == 1
    assert case["dice"]["n"] == 4 and case["dice"]["mean"] == pytest.approx((0.8 + 0.6 + 0.0 + 0.9) / 4)
    assert (case["hd95"]["n"], case["hd95"]["n_nan"], case["hd95"]["mean"]) == (3, 1, pytest.approx(4.0))
    assert case["hd95_penalized"]["n"] == 4
    assert case["hd95_penalized"]["mean"] == pytest.approx((2 + 4 + 50 + 6) / 4)
    group = row["group"]
    assert group["kind"] == "patient" and group["n"] == 2
    # patients 0.72 and 0.82: mean 0.77, s = 0.1 / sqrt(2), t with 1 degree of freedom.
    half = 12.706204736174698 * (0.1 / math.sqrt(2)) / math.sqrt(2)
    assert group["dice"]["mean"] == pytest.approx(0.77)
    assert group["dice"]["high"] == pytest.approx(0.77 + half)


def test_format_table_rows_and_notes(tmp_path):
    runs = {
        "preseg": write_run(tmp_path / "preseg", sampler="preseg", unet_evaluations_per_image=0,
                            seconds_per_image=0.01),
        "addpm": write_run(tmp_path / "addpm"),
    }
    table = format_table(compare_runs(runs))
    lines = table.splitlines()
    # The per-patient figures are the headline: they come first.
    assert lines[0].startswith(
        "| run | sampler | patients | Dice per patient | HD95 per patient | HD95 per patient, "
        "miss = diagonal | cases | Dice per case | HD95 per case | HD95 per case, miss = diagonal |")
    assert lines[2].startswith("| preseg | preseg | 2 | 0.770 [")
    assert "| 5 (1 both empty) | 0.575 [" in lines[3]
    assert "| 4.00 [" in lines[3] and "(1 miss)" in lines[3] and "| 15.50 [" in lines[3]
    assert lines[3].endswith("| 150 (3 x 50) | 1.25 |")
    assert "t-distribution" in table and "Warning" not in table
    assert "both empty" in table and "diagonal" in table
    # 2 patients, and the HD95 means over 2..4 cases: the notes say why those intervals are wide.
    assert "Intervals of fewer than 5 values (n = 2: t = 12.71" in table
    assert "may run below 0 or above 1" in table


def test_table_without_groups_and_with_different_cases(tmp_path):
    flat = "\n".join(line for line in METRICS_CSV.splitlines() if ",patient," not in line)
    other = flat.replace("p2_001", "p3_000")
    rows = compare_runs({"a": write_run(tmp_path / "a", flat), "b": write_run(tmp_path / "b", other)})
    assert rows[0]["group"] is None
    table = format_table(rows)
    assert "patient" not in table.splitlines()[0]
    assert "not scored on the same cases" in table


def test_cli_writes_markdown_and_json(tmp_path, capsys):
    run = write_run(tmp_path / "addpm")
    out = tmp_path / "results" / "table.md"
    main([f"addpm={run}", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["confidence"] == 0.95
    assert "both_empty" in data["conventions"]
    (row,) = data["runs"]
    assert row["case"]["dice"]["mean"] == pytest.approx(0.575)
    assert row["case"]["hd95"]["n_nan"] == 1


def test_errors_are_addpm_errors(tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        compare_runs({"x": tmp_path / "missing"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="metrics.csv"):
        compare_runs({"x": tmp_path / "empty"})
    run = write_run(tmp_path / "nosummary")
    (run / "summary.json").unlink()
    with pytest.raises(EvaluationError, match="summary.json"):
        compare_runs({"x": run})
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_runs(["just_a_dir"])
    with pytest.raises(ConfigError, match="twice"):
        parse_runs(["a=x", "a=y"])
    assert issubclass(EvaluationError, AddpmError)


@pytest.mark.slow
def test_module_entry_point_prints_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "evaluation.compare", f"addpm={missing}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: run folder {missing} not found"


def test_paired_difference_to_a_baseline_per_patient(tmp_path):
    base_csv = METRICS_CSV.replace("p1,p1,patient,0.72,0.56,3.0", "p1,p1,patient,0.62,0.56,4.0").replace(
        "p2,p2,patient,0.82,0.69,5.0", "p2,p2,patient,0.77,0.69,nan")
    runs = {"preseg": write_run(tmp_path / "preseg", base_csv, sampler="preseg"),
            "addpm": write_run(tmp_path / "addpm")}
    rows = compare_runs(runs, baseline="preseg")
    assert rows[0]["paired"] is None
    paired = rows[1]["paired"]
    # Dice: p1 0.72 - 0.62 = 0.10, p2 0.82 - 0.77 = 0.05: mean 0.075, s = 0.05 / sqrt(2).
    assert paired["kind"] == "patient" and paired["n_pairs"] == 2
    assert paired["dice"]["mean"] == pytest.approx(0.075)
    half = 12.706204736174698 * (0.05 / math.sqrt(2)) / math.sqrt(2)
    assert paired["dice"]["low"] == pytest.approx(0.075 - half)
    # HD95: p2's baseline is undefined, so one pair (3 - 4 = -1) and one counted n/a.
    assert paired["hd95"]["mean"] == pytest.approx(-1.0) and paired["hd95"]["n_nan"] == 1
    table = format_table(rows, baseline="preseg")
    assert "Dice - preseg (paired, per patient)" in table and "+0.075 [" in table
    with pytest.raises(ConfigError, match="--baseline"):
        compare_runs(runs, baseline="ddpm")


PAIRED_BASE_CSV = """\
case_id,group_id,kind,dice,iou,hd95,hd95_penalized,assd,pred_voxels,label_voxels,preseg_dice
p1_000,p1,case,0.5,0.33,3.0,3.0,1.0,10,12,0.5
p2_000,p2,case,0.0,0.0,nan,50.0,,0,9,0.0
p3_000,p3,case,1.0,1.0,0.0,0.0,0.0,0,0,1.0
p1,p1,patient,0.5,0.33,3.0,3.0,1.0,10,12,0.5
p2,p2,patient,0.0,0.0,nan,50.0,,0,9,0.0
p3,p3,patient,1.0,1.0,0.0,0.0,0.0,0,0,1.0
"""
PAIRED_RUN_CSV = """\
case_id,group_id,kind,dice,iou,hd95,hd95_penalized,assd,pred_voxels,label_voxels,preseg_dice
p1_000,p1,case,0.7,0.54,2.0,2.0,1.0,10,12,0.5
p2_000,p2,case,0.6,0.43,10.0,10.0,2.0,8,9,0.0
p3_000,p3,case,0.0,0.0,nan,50.0,,4,0,1.0
p1,p1,patient,0.7,0.54,2.0,2.0,1.0,10,12,0.5
p2,p2,patient,0.6,0.43,10.0,10.0,2.0,8,9,0.0
p3,p3,patient,0.0,0.0,nan,50.0,,4,0,1.0
"""


def test_paired_difference_takes_the_values_of_the_means(tmp_path):
    # p3 is empty in label and baseline prediction: out of the baseline's means, so out of every
    # pair (although the run's false positive scores 0 there). p2 is a miss of the baseline.
    runs = {"preseg": write_run(tmp_path / "preseg", PAIRED_BASE_CSV, sampler="preseg"),
            "addpm": write_run(tmp_path / "addpm", PAIRED_RUN_CSV)}
    rows = compare_runs(runs, baseline="preseg")
    base_group, paired = rows[0]["group"], rows[1]["paired"]
    assert base_group["n_both_empty"] == 1 and base_group["dice"]["mean"] == pytest.approx(0.25)
    assert (paired["n_pairs"], paired["n_both_empty"]) == (2, 1)
    # Dice: p1 +0.2, p2 +0.6 -- the same per-patient values as the two runs' Dice columns.
    assert paired["dice"]["mean"] == pytest.approx(0.4) and paired["dice"]["n"] == 2
    # HD95: p2's baseline is a miss, so one pair (2 - 3); miss = diagonal pairs both (-1, -40).
    assert (paired["hd95"]["n"], paired["hd95"]["n_nan"]) == (1, 1)
    assert paired["hd95"]["mean"] == pytest.approx(-1.0)
    assert paired["hd95_penalized"]["n"] == 2 and paired["hd95_penalized"]["mean"] == pytest.approx(-20.5)
    table = format_table(rows, baseline="preseg")
    header = table.splitlines()[0]
    assert "| HD95, miss = diagonal - preseg (paired) |" in header
    assert "| -1.00 (1 miss) | -20.50 [" in table.splitlines()[3]
    assert "both empty in either run is left out" in table


# Two regions; WT_ on case c2 is empty in both (left out of the WT means), ET_ misses on c1.
REGIONS_CSV = """\
case_id,group_id,kind,dice,hd95,hd95_penalized,pred_voxels,label_voxels,WT_dice,WT_hd95,WT_hd95_penalized,\
WT_pred_voxels,WT_label_voxels,ET_dice,ET_hd95,ET_hd95_penalized,ET_pred_voxels,ET_label_voxels,preseg_dice,\
preseg_WT_dice
c1,,case,0.45,2.0,26.0,10,14,0.9,2.0,2.0,10,10,0.0,nan,50.0,0,4,0.4,0.8
c2,,case,0.5,3.0,3.0,4,4,1.0,0.0,0.0,0,0,0.5,3.0,3.0,4,4,0.5,1.0
c3,,case,0.7,1.0,1.0,12,12,0.8,1.0,1.0,8,8,0.6,1.0,1.0,4,4,0.6,0.7
"""


def test_per_class_tables_read_each_class_columns(tmp_path, capsys):
    run = write_run(tmp_path / "addpm", REGIONS_CSV)
    out = tmp_path / "table.md"
    main([f"addpm={run}", "--per_class", "True", "--out", str(out)])
    table = out.read_text()
    title = "### Mean over the classes present in each case (WT, ET)"
    assert table.index(title) < table.index("### WT") < table.index("### ET")
    assert table.count("Mean [95% confidence interval") == 1
    # Under the title, the mean of the per-class means (WT 0.85, ET 1.1/3; HD95 1.5 and 2.0).
    assert ("- addpm: Dice per case 0.608; HD95 per case 1.75; HD95 per case, miss = diagonal 9.75"
            in table.split("### WT")[0])
    assert "Classes: with several classes or regions" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["class_mean"][0]["dice"]["mean"] == pytest.approx((0.85 + 1.1 / 3) / 2)
    assert "classes" in data["conventions"]
    assert data["runs"][0]["case"]["dice"]["mean"] == pytest.approx(0.55)
    wt = data["per_class"]["WT"][0]["case"]
    assert wt["dice"]["mean"] == pytest.approx(0.85) and wt["n_both_empty"] == 1
    et = data["per_class"]["ET"][0]["case"]
    assert et["dice"]["mean"] == pytest.approx(1.1 / 3) and et["hd95"]["n_nan"] == 1
    with pytest.raises(EvaluationError, match="no class or region 'TC'"):
        compare_runs({"addpm": run}, class_name="TC")
    plain = write_run(tmp_path / "binary")
    with pytest.raises(EvaluationError, match="no classes or regions"):
        main([f"binary={plain}", "--per_class", "True"])


REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": 4}


def write_regions_run(folder: Path, volumes: dict, regions=REGIONS) -> Path:
    """A run of {volume id: (prediction, label)} (2D label maps, one slice per volume) scored in
    ``regions``, with a case row and a volume row per volume."""
    rows = []
    for volume, (pred, label) in volumes.items():
        metrics = label_map_metrics(pred, label, regions)
        rows += [metrics_row(f"{volume}_000", metrics, group_id=volume),
                 metrics_row(volume, metrics, group_id=volume, kind="volume")]
    write_run(folder)
    write_metrics_csv(rows, folder / "metrics.csv")
    return folder


def review_example() -> dict:
    """Two volumes: WT and TC perfect in both; ET absent from A (label and prediction), missed in B."""
    label_a, label_b = np.zeros((5, 5), dtype=int), np.zeros((5, 5), dtype=int)
    label_a[1:4, 1:4], label_a[2, 2] = 2, 1
    label_b[1:4, 1:4], label_b[2, 2:4] = 2, (1, 4)
    return {"A": (label_a, label_a), "B": (np.where(label_b == 4, 1, label_b), label_b)}


def test_per_class_shows_both_means_over_classes_and_counts_cells_of_misses_only(tmp_path, capsys):
    run = write_regions_run(tmp_path / "addpm", review_example())
    main([f"addpm={run}", "--per_class", "True"])
    printed = capsys.readouterr().out
    first, per_region = printed.split("### WT")
    assert first.startswith("### Mean over the classes present in each volume and case (WT, TC, ET)\n")
    diagonal = math.sqrt(50)
    assert (f"- addpm: Dice per volume 0.667; HD95 per volume 0.00 (ET undefined); HD95 per volume, "
            f"miss = diagonal {diagonal / 3:.2f}") in first
    # The table itself: each volume's mean over the regions present in it, (1 + 2/3) / 2.
    assert "| addpm | addpm | 2 | 0.833 [" in first and "| 0.00 (1 miss) |" in first
    # ET: A is empty in both, B a miss: no HD95 to average, and the cell says why.
    et = per_region.split("### ET")[1]
    assert "| 2 (1 both empty) | 0.000 | n/a (1 miss) | 7.07 |" in et


def test_per_class_with_one_class_prints_its_table_alone(tmp_path, capsys):
    run = write_regions_run(tmp_path / "et", review_example(), regions={"ET": 4})
    main([f"et={run}", "--per_class", "True"])
    printed = capsys.readouterr().out
    assert printed.startswith("### ET\n\n| run |") and "Mean over" not in printed
    assert printed.count("### ") == 1 and "Mean [95% confidence interval" in printed
    assert "| n/a (1 miss) |" in printed and "Classes:" not in printed
