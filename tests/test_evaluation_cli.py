"""``python -m evaluation`` on real NIfTI and PNG folders."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data.layouts import scan
from evaluation.cli import evaluate_folders, main
from evaluation.errors import EvaluationError
from evaluation.report import read_metrics_csv
from guided_diffusion.errors import ConfigError
from guided_diffusion.script_util import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_nifti(path, mask, zooms):
    img = nib.Nifti1Image(mask.astype(np.uint8), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def save_png(path, mask, high=255):
    Image.fromarray((mask.astype(np.uint8) * high)).save(path)


def cube(shape, corner, size=3):
    mask = np.zeros(shape, dtype=bool)
    z, y, x = corner
    mask[z : z + size, y : y + size, x : x + size] = True
    return mask


@pytest.fixture
def folders(tmp_path):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir()
    label_dir.mkdir()
    # Volume "vol": cubes 3 voxels apart along axis 2, whose voxels are 3 mm long:
    # hd95 = 3 * 3 mm, assd = 2 * 3 mm (see the 3D cube test of the metrics).
    save_nifti(label_dir / "vol_seg.nii.gz", cube((8, 8, 8), (1, 1, 1)), (1.0, 1.0, 3.0))
    save_nifti(pred_dir / "vol.nii.gz", cube((8, 8, 8), (1, 1, 4)), (1.0, 1.0, 3.0))
    # Image "img": 0/255 prediction, 0/1 label, rows 2-5 against rows 3-5 of columns 2-5.
    pred = np.zeros((10, 12), dtype=bool)
    pred[2:6, 2:6] = True
    label = np.zeros((10, 12), dtype=bool)
    label[3:6, 2:6] = True
    save_png(pred_dir / "img.png", pred)
    save_png(label_dir / "img_seg.png", label, high=1)
    # A label without prediction, an image that is not a label, and a non-mask file.
    save_png(label_dir / "lonely_seg.png", label, high=1)
    save_png(label_dir / "img_t1.png", label)
    (pred_dir / "notes.txt").write_text("not a mask")
    return pred_dir, label_dir


def run_module(*args):
    return subprocess.run(
        [sys.executable, "-m", "evaluation", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_end_to_end_nifti_and_png(folders, tmp_path):
    pred_dir, label_dir = folders
    out_dir = tmp_path / "eval"
    proc = run_module("--pred_dir", pred_dir, "--label_dir", label_dir, "--out_dir", out_dir,
                      "--label_suffix", "_seg")
    assert proc.returncode == 0, proc.stderr
    assert "labels without a prediction: 1" in proc.stderr
    rows = {r["case_id"]: r for r in read_metrics_csv(out_dir / "metrics.csv")}
    # The volume is scored whole (a volume row) and slice by slice along its axial axis (2 here,
    # the affine's z), as sample.py scores the slices of a volume.
    assert set(rows) == {"vol", "img"} | {f"vol_{k:03d}" for k in range(8)}
    assert rows["vol"]["kind"] == "volume" and rows["img"]["kind"] == "case"
    assert rows["vol_002"]["label_voxels"] == 9 and rows["vol_002"]["pred_voxels"] == 0
    assert rows["vol_005"]["pred_voxels"] == 9 and rows["vol_000"]["label_voxels"] == 0
    assert all(rows[f"vol_{k:03d}"]["group_id"] == "vol" for k in range(8))
    assert rows["vol"]["dice"] == 0.0
    assert rows["vol"]["hd95"] == pytest.approx(9.0)
    assert rows["vol"]["assd"] == pytest.approx(6.0)
    # img: tp 12, fp 4, fn 0.
    assert rows["img"]["dice"] == pytest.approx(24 / 28)
    assert rows["img"]["precision"] == pytest.approx(12 / 16)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n_cases"] == 9 and summary["kinds"]["case"]["n_both_empty"] == 2
    assert summary["missing_predictions"] == ["lonely"]
    # Per case: img and the six slices that hold a mask (Dice 0); the two both-empty slices left out.
    assert summary["kinds"]["case"]["metrics"]["dice"]["mean"] == pytest.approx(24 / 28 / 7)
    assert summary["headline"]["kind"] == "volume" and summary["headline"]["dice"]["mean"] == 0.0
    assert "mean dice per volume 0.0000 (1 volume)" in proc.stdout


@pytest.mark.slow
def test_missing_label_dir_is_one_line_and_exit_2(folders, tmp_path):
    pred_dir, _ = folders
    proc = run_module("--pred_dir", pred_dir, "--label_dir", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --label_dir {tmp_path / 'nowhere'}: folder not found"
    ]
    assert not (pred_dir / "metrics.csv").exists()


def test_no_matching_label_and_shape_mismatch(folders, tmp_path):
    pred_dir, label_dir = folders
    with pytest.raises(EvaluationError, match="no mask files ending with '_t2'"):
        evaluate_folders(pred_dir, label_dir, label_suffix="_t2")
    with pytest.raises(EvaluationError, match="no case ids match"):
        evaluate_folders(pred_dir, label_dir)  # ids keep the _seg suffix
    save_png(label_dir / "vol_seg.png", np.zeros((4, 4), dtype=bool))
    with pytest.raises(EvaluationError, match="both give case id 'vol'"):
        evaluate_folders(pred_dir, label_dir, label_suffix="_seg")
    (label_dir / "vol_seg.png").unlink()
    save_png(label_dir / "img_seg.png", np.zeros((4, 4), dtype=bool))
    with pytest.raises(EvaluationError, match=r"img\.png has shape \(10, 12\).*img_seg\.png"):
        evaluate_folders(pred_dir, label_dir, label_suffix="_seg")
    with pytest.raises(ConfigError, match="--pred_dir"):
        main(["--pred_dir", str(tmp_path / "missing"), "--label_dir", str(label_dir)])
    assert not any(p.name.endswith((".csv", ".json")) for p in pred_dir.iterdir())


def test_brats_fixture_labels_score_themselves(brats2d_mini, tmp_path):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir()
    label_dir.mkdir()
    for seg in sorted(brats2d_mini.glob("training/*/*_seg_*.nii.gz"))[:2]:
        case_id = seg.parent.name
        img = nib.load(str(seg))
        nib.save(img, str(label_dir / f"{case_id}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header),
                 str(pred_dir / f"{case_id}.nii.gz"))
    rows, info = evaluate_folders(pred_dir, label_dir, classes=(1, 2, 4))
    assert len(rows) == 2 and info["missing_predictions"] == []
    for row in rows:
        assert row["dice"] == 1.0 and row["hd95"] == 0.0
        assert row["class2_dice"] == 1.0


def test_labels_read_through_a_dataset_layout(tmp_path, brats2d_mini):
    """--dataset brats2d pairs predictions named by case id with the layout's own label files."""
    training = brats2d_mini / "training"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    records = scan(str(training), "brats2d").records
    for rec in records:
        shutil.copy(rec.label_file, pred_dir / f"{rec.case_id}.nii.gz")
    out = tmp_path / "out"
    main(["--pred_dir", str(pred_dir), "--label_dir", str(training), "--dataset", "brats2d", "--out_dir", str(out)])
    rows = read_metrics_csv(out / "metrics.csv")
    cases = [r for r in rows if r["kind"] == "case"]
    assert sorted(r["case_id"] for r in cases) == sorted(rec.case_id for rec in records)
    # The six slices are one patient's: it is scored on them stacked, as sample.py does.
    (patient,) = [r for r in rows if r["kind"] == "patient"]
    assert patient["case_id"] == "001" and all(r["group_id"] == "001" for r in cases)
    assert patient["label_voxels"] == sum(r["label_voxels"] for r in cases)
    assert all(r["dice"] == 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline"]["kind"] == "patient" and summary["headline"]["n"] == 1


def test_foreground_labels_score_a_label_subset(tmp_path):
    """--foreground_labels 1,4 scores against BraTS tumour core, not the whole tumour."""
    label = np.zeros((8, 8), dtype=np.uint8)
    label[1:3, 1:3] = 1  # core
    label[5:7, 5:7] = 2  # oedema only
    pred = (label == 1).astype(np.uint8)
    (tmp_path / "pred").mkdir()
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image(pred, np.eye(4)), str(tmp_path / "pred" / "c1.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "lab" / "c1.nii.gz"))
    whole, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab")
    core, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab", foreground_labels=(1, 4))
    assert whole[0]["dice"] == pytest.approx(2 * 4 / (4 + 8))
    assert core[0]["dice"] == 1.0


LGG_DIR = REPO_ROOT.parent / "shared" / "datasets" / "lgg_flair"


def test_lgg_patients_get_rows_and_the_table_goes_beside_the_predictions(tmp_path):
    """Real LGG TIFFs: one row per slice and one per patient (its slices stacked), written by
    default beside the predictions folder, not inside it."""
    if not LGG_DIR.is_dir():
        pytest.skip(f"{LGG_DIR} is missing (../shared beside the repo)")
    data, pred_dir = tmp_path / "lgg", tmp_path / "run" / "masks"
    pred_dir.mkdir(parents=True)
    for patient in sorted(p for p in LGG_DIR.iterdir() if p.is_dir())[:2]:
        (data / patient.name).mkdir(parents=True)
        masks = sorted(patient.glob("*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))[8:12]
        for mask in masks:
            image = mask.with_name(mask.name.replace("_mask", ""))
            shutil.copy(image, data / patient.name / image.name)
            shutil.copy(mask, data / patient.name / mask.name)
            # The prediction: the label shifted two pixels down.
            label = np.asarray(Image.open(mask)) > 0
            save_png(pred_dir / f"{image.stem}.png", np.roll(label, 2, axis=0))
    proc = run_module("--pred_dir", pred_dir, "--label_dir", data, "--dataset", "lgg")
    assert proc.returncode == 0, proc.stderr
    table, summary_path = tmp_path / "run" / "masks_evaluation.csv", tmp_path / "run" / "masks_evaluation.json"
    assert sorted(p.name for p in pred_dir.iterdir()) == sorted(f.name for f in pred_dir.glob("*.png"))
    rows = read_metrics_csv(table)
    patients = [r for r in rows if r["kind"] == "patient"]
    cases = [r for r in rows if r["kind"] == "case"]
    assert sorted(r["case_id"] for r in patients) == sorted(p.name for p in data.iterdir())
    assert len(cases) == 8
    for patient in patients:
        mine = [r for r in cases if r["group_id"] == patient["case_id"]]
        assert len(mine) == 4
        assert patient["tp"] == sum(r["tp"] for r in mine)
        assert patient["label_voxels"] == sum(r["label_voxels"] for r in mine)
    summary = json.loads(summary_path.read_text())
    assert summary["headline"]["kind"] == "patient" and summary["headline"]["n"] == 2
    assert summary["results"] in proc.stdout and "mean dice per patient" in summary["results"]
    assert proc.stdout.strip().endswith(f"wrote {table} and {summary_path}")


def save_volume(path, mask, zooms=(1.0, 1.0, 2.0)):
    img = nib.Nifti1Image(mask.astype(np.uint8), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def test_brats3d_volumes_get_volume_rows_as_sample_py_scores_them(tmp_path):
    data, pred_dir = tmp_path / "brats3d", tmp_path / "pred"
    pred_dir.mkdir()
    shape = (10, 12, 6)
    for n, corner in enumerate([(2, 2, 1), (4, 5, 2)]):
        case = data / f"BraTS2021_0000{n}"
        case.mkdir(parents=True)
        label = cube(shape, corner, size=3)
        for modality in ("t1", "t1ce", "t2", "flair"):
            save_volume(case / f"{case.name}_{modality}.nii.gz", label * 100)
        save_volume(case / f"{case.name}_seg.nii.gz", label * 2)
        save_volume(pred_dir / f"{case.name}.nii.gz", np.roll(label, 1, axis=2))
    out = tmp_path / "eval" / "scores.csv"
    main(["--pred_dir", str(pred_dir), "--label_dir", str(data), "--dataset", "brats3d", "--out", str(out)])
    rows = read_metrics_csv(out)
    volumes = [r for r in rows if r["kind"] == "volume"]
    assert [r["case_id"] for r in volumes] == ["BraTS2021_00000", "BraTS2021_00001"]
    # 3 of the cube's 3 slices overlap on 2 after the shift: Dice 2 * 18 / (27 + 27).
    assert all(r["dice"] == pytest.approx(36 / 54) for r in volumes)
    slices = [r for r in rows if r["kind"] == "case" and r["group_id"] == "BraTS2021_00000"]
    assert [r["case_id"] for r in slices] == [f"BraTS2021_00000_{k:03d}" for k in range(6)]
    assert sum(r["tp"] for r in slices) == volumes[0]["tp"]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["headline"]["kind"] == "volume" and summary["headline"]["n"] == 2
    # Both-empty slices (4 of 6 per volume outside the shifted cube) leave the per-case means.
    assert summary["kinds"]["case"]["n_both_empty"] == 2 * 2


def test_out_and_out_dir_exclude_each_other(folders, tmp_path):
    pred_dir, label_dir = folders
    proc = run_module("--pred_dir", pred_dir, "--label_dir", label_dir, "--out", tmp_path / "a.csv",
                      "--out_dir", tmp_path / "b")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: give --out FILE or --out_dir DIR, not both"
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b").exists()


REGIONS = "WT:1,2,4;TC:1,4;ET:4"


def brats_predictions_without_enhancing(training: Path, pred_dir: Path) -> list:
    """Predictions named by case id: the labels with enhancing tumour (4) called necrosis (1),
    so WT and TC are exact and ET is missed wherever the label has some."""
    pred_dir.mkdir()
    records = scan(str(training), "brats2d").records
    for rec in records:
        img = nib.load(rec.label_file)
        label = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.where(label == 4, 1, label).astype(np.uint8), img.affine, img.header),
                 str(pred_dir / f"{rec.case_id}.nii.gz"))
    return records


def test_regions_give_columns_per_region_on_case_and_patient_rows(brats2d_mini, tmp_path):
    training = brats2d_mini / "training"
    records = brats_predictions_without_enhancing(training, tmp_path / "pred")
    out = tmp_path / "out"
    main(["--pred_dir", str(tmp_path / "pred"), "--label_dir", str(training), "--dataset", "brats2d",
          "--regions", REGIONS, "--out_dir", str(out)])
    rows = read_metrics_csv(out / "metrics.csv")
    cases = [r for r in rows if r["kind"] == "case"]
    (patient,) = [r for r in rows if r["kind"] == "patient"]
    assert len(cases) == len(records)
    for row in [*cases, patient]:
        assert row["WT_dice"] == 1.0 and row["TC_dice"] == 1.0 and row["WT_hd95"] == 0.0
        assert row["ET_pred_voxels"] == 0
        if row["kind"] == "case":
            labels = np.asarray(nib.load(next(r.label_file for r in records if r.case_id == row["case_id"])).dataobj)
            assert row["WT_label_voxels"] == int((labels > 0).sum())
            assert row["ET_label_voxels"] == int((labels == 4).sum())
        if row["ET_label_voxels"]:
            # The main columns hold the mean over the three regions: ET's miss counts.
            assert row["ET_dice"] == 0.0 and math.isnan(row["ET_hd95"])
            assert row["dice"] == pytest.approx(2 / 3) and math.isnan(row["hd95"])  # a missed region is a miss
        else:
            # ET empty in both leaves the mean: WT and TC alone.
            assert row["dice"] == 1.0
        # The un-prefixed counts are the union's: WT, which holds TC and ET, each voxel once.
        assert (row["label_voxels"], row["pred_voxels"]) == (row["WT_label_voxels"], row["WT_pred_voxels"])
    assert patient["ET_label_voxels"] == sum(r["ET_label_voxels"] for r in cases) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"] == REGIONS
    # per_class: the headline kind's means of each region, as sample.py's summary gives them.
    per_class = summary["per_class"]
    assert summary["headline"]["kind"] == "patient" and list(per_class) == ["WT", "TC", "ET"]
    assert per_class["ET"]["label_values"] == [4] and per_class["WT"]["label_values"] == [1, 2, 4]
    assert per_class["WT"]["dice"] == 1.0 and per_class["ET"]["dice"] == 0.0
    assert per_class["ET"]["hd95"] is None and per_class["ET"]["hd95_penalized"] > 0
    assert summary["kinds"]["case"]["metrics"]["ET_dice"]["n_both_empty"] == sum(
        1 for r in cases if r["ET_label_voxels"] == 0)
    assert per_class["ET"]["counts"]["dice"]["n_valid"] == 1 and per_class["ET"]["counts"]["hd95"]["n_nan"] == 1
    # The mean of the region means first (nnU-Net's foreground_mean), then the patient's mean over
    # the regions present in it, named as such.
    assert summary["class_mean"]["dice"] == {"mean": pytest.approx(2 / 3), "n_valid": 3, "n_undefined": 0}
    assert summary["results"].startswith(
        "dice per patient by class: WT 1.0000, TC 1.0000, ET 0.0000, mean of the classes 0.6667; "
        "mean dice per patient over the classes present in each 0.6667 (1 patient); per case ")
    assert "classes" in summary["conventions"]


def test_classes_on_volumes_and_one_class_keeps_the_whole_foreground(tmp_path):
    shape = (10, 12, 6)
    label = cube(shape, (2, 2, 1), size=4).astype(np.uint8) * 2
    label[3:5, 3:5, 2:4] = 1
    pred = label.copy()
    pred[pred == 1] = 2  # class 1 missed, called class 2
    (tmp_path / "pred").mkdir()
    (tmp_path / "lab").mkdir()
    save_volume(tmp_path / "pred" / "v.nii.gz", pred)
    save_volume(tmp_path / "lab" / "v.nii.gz", label)
    whole, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab")
    one, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab", regions=(("WT", (1, 2)),))
    two, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab", classes=(1, 2))
    (volume,) = [r for r in two if r["kind"] == "volume"]
    assert volume["class1_dice"] == 0.0 and volume["class2_dice"] == pytest.approx(2 * 56 / (64 + 56))
    assert volume["dice"] == pytest.approx((0.0 + volume["class2_dice"]) / 2)
    assert volume["pred_voxels"] == 64 and volume["label_voxels"] == 64
    # No flag, or a single class: the main columns score the whole foreground, as before.
    for rows in (whole, one):
        assert all(r["dice"] == 1.0 for r in rows)
    assert not any(c.startswith("class") for r in whole for c in r)
    assert all(r["WT_dice"] is not None for r in one)
    for sets in (dict(classes=(1, 2)), dict(regions=(("WT", (1, 2)),))):
        with pytest.raises(ConfigError, match="--foreground_labels"):
            evaluate_folders(tmp_path / "pred", tmp_path / "lab", foreground_labels=(1,), **sets)


def one_error_line(tmp_path, flags, capsys) -> str:
    """python -m evaluation on tmp_path's pred/ and lab/ with ``flags``: exit 2, one error line
    (returned), nothing written."""
    out = tmp_path / "out"
    argv = ["--pred_dir", str(tmp_path / "pred"), "--label_dir", str(tmp_path / "lab"), *flags,
            "--out_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not out.exists()
    return err[0]


def test_a_label_value_no_class_or_region_covers_is_one_error_line(tmp_path, capsys):
    label = np.zeros((8, 8), dtype=np.uint8)
    label[1:3, 1:3] = 1
    label[5:7, 5:7] = 3
    (tmp_path / "pred").mkdir()
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image((label > 0).astype(np.uint8), np.eye(4)), str(tmp_path / "pred" / "c1.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "lab" / "c1.nii.gz"))
    for flag, value in (("--classes", "1,2"), ("--regions", "WT:1,2;TC:1")):
        line = one_error_line(tmp_path, [flag, value], capsys)
        assert str(tmp_path / "lab" / "c1.nii.gz") in line and "label value 3" in line
    with pytest.raises(ConfigError, match="not both"):
        main(["--pred_dir", str(tmp_path / "pred"), "--label_dir", str(tmp_path / "lab"), "--classes", "1,3",
              "--regions", "WT:1,3"])


def test_predictions_are_checked_with_the_labels_rule_with_one_class_or_several(tmp_path, capsys):
    """A predicted value that no class covers (BraTS 2023's enhancing tumour 3 scored with the
    2021 classes 1,2,4) would silently count as background: one line naming the prediction,
    nothing written; with one class, labels and predictions are checked the same way."""
    label = np.zeros((8, 8, 3), dtype=np.uint8)
    label[1:4, 1:4, 1], label[2, 2, 1], label[5:7, 5:7, 1] = 2, 4, 1
    pred = np.where(label == 4, 3, label).astype(np.uint8)
    for folder, mask in (("pred", pred), ("lab", label)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / folder / "c1.nii.gz"))
    pred_file, label_file = tmp_path / "pred" / "c1.nii.gz", tmp_path / "lab" / "c1.nii.gz"
    for flag, value, bad, shown in (("--classes", "1,2,4", pred_file, "label value 3"),
                                    ("--regions", "WT:1,2,4;TC:1,4;ET:4", pred_file, "label value 3"),
                                    ("--classes", "2", label_file, "label value 1"),
                                    ("--classes", "0,1", None, "--classes must not contain 0 (the background)"),
                                    ("--classes", "1,1", None, "--classes lists a value twice: 1,1")):
        line = one_error_line(tmp_path, [flag, value], capsys)
        assert shown in line and (bad is None or f"mask {bad} " in line), line
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "lab", classes=(1, 2, 3, 4))
    assert rows[-1]["class4_dice"] == 0.0 and rows[-1]["class2_dice"] == 1.0
