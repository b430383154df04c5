"""Several classes and overlapping regions through the whole pipeline, from the command line.

On the BraTS fixture (labels 2 and 4 present) and on an nnU-Net raw layout of 3D volumes built
from it (its dataset.json declaring the classes, or the regions), the three trainers run side by
side (tiny, CPU) in multiclass and in regions mode, then sample.py segments the cases: its
label maps hold the dataset's own values and metrics.csv has a row set per class or region.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS2D_MINI = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini"
PRE_T, T = 40, 25
SCHEDULE_FLAGS = ["--diffusion_steps", "100", "--noise_schedule", "cosine"]
COMMON = ["--image_size", "32", "--resize_mode", "resize", "--val_fraction", "0", "--device", "cpu"]
NET_FLAGS = ["--base_channels", "8", "--depth", "2", "--batch_size", "2", "--max_steps", "2"]
UNET_FLAGS = ["--num_channels", "16", "--num_res_blocks", "1", "--attention_resolutions", "16",
              "--batch_size", "2", "--max_steps", "2", "--progress", "False"]
CLASSES = ["--classes", "2,4"]
REGIONS = ["--regions", "WT:1,2,4;TC:1,4;ET:4"]
BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return env


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *[str(a) for a in args]], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def train_all(data_dir: Path, out: Path, label_flags: list) -> dict:
    """The three trainers side by side on ``data_dir``; their final checkpoints."""
    jobs = {
        "preseg": ("train_preseg_network.py", NET_FLAGS),
        "denoiser": ("train_denoising_network.py", [*NET_FLAGS, *SCHEDULE_FLAGS, "--T", str(T)]),
        "diffusion": ("train_addpm.py", [*UNET_FLAGS, *SCHEDULE_FLAGS]),
    }
    procs = {}
    for name, (script, flags) in jobs.items():
        args = ["--data_dir", data_dir, *COMMON, *label_flags, *flags, "--out_dir", out / name]
        procs[name] = subprocess.Popen([sys.executable, script, *[str(a) for a in args]], cwd=REPO_ROOT,
                                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    paths = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} training failed\n{stdout[-2000:]}\n{stderr[-4000:]}"
        paths[name] = out / name / "final.pt"
    return paths


def sample_flags(paths: dict) -> list:
    return ["--model_path", paths["diffusion"], "--preseg_path", paths["preseg"],
            "--denoiser_path", paths["denoiser"], "--device", "cpu", "--pre_t", PRE_T, "--T", T,
            "--num_ensemble", 2]


def read_metrics(out: Path) -> list:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_nnunet_volumes(root: Path, labels: dict) -> Path:
    """The fixture's six slices as two 3-slice volumes of an nnU-Net raw dataset (4 channels)."""
    slices = sorted((BRATS2D_MINI / "training").iterdir())
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    for case, group in (("case_a", slices[:3]), ("case_b", slices[3:])):
        for c, channel in enumerate(BRATS_CHANNELS):
            volume = np.stack([nib.load(next(d.glob(f"*_{channel}_*"))).get_fdata() for d in group], axis=-1)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        seg = np.stack([nib.load(next(d.glob("*_seg_*"))).get_fdata() for d in group], axis=-1)
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), root / "labelsTr" / f"{case}.nii.gz")
    spec = {"channel_names": {str(c): name for c, name in enumerate(BRATS_CHANNELS)}, "labels": labels,
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def fixture_data():
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    return BRATS2D_MINI / "training"


@pytest.mark.parametrize("mode, label_flags, names, values", [
    ("multiclass", CLASSES, ("class2", "class4"), {2, 4}),
    ("regions", REGIONS, ("WT", "TC", "ET"), {2, 1, 4}),
])
def test_brats_fixture_end_to_end(fixture_data, tmp_path, mode, label_flags, names, values):
    paths = train_all(fixture_data, tmp_path / "runs", label_flags)
    for name, path in paths.items():
        config = load_checkpoint(path, map_location="cpu")["config"]
        assert config["preprocess"]["label_mode"] == mode, name
    diffusion = load_checkpoint(paths["diffusion"], map_location="cpu")["config"]
    assert diffusion["mask_channels"] == len(names)

    out = tmp_path / "samples"
    ok(run("sample.py", "--data_dir", fixture_data, *sample_flags(paths), "--out_dir", out))
    raw = nib.load(next((fixture_data / "000001").glob("*_seg_*"))).get_fdata()
    mask_files = sorted((out / "masks").glob("*.nii.gz"))
    assert len(mask_files) == 6 and len(list((out / "overlays").glob("*.png"))) == 6
    for path in mask_files:
        label_map = np.asarray(nib.load(path).dataobj)
        assert label_map.shape == raw.shape
        assert set(np.unique(label_map).tolist()) <= {0} | values
    for name in names if mode == "regions" else ():
        assert len(list((out / "uncertainty").glob(f"*_entropy_{name}.nii.gz"))) == 6
    for name in names:
        assert len(list((out / "uncertainty").glob(f"*_variance_{name}.nii.gz"))) == 6
    rows = read_metrics(out)
    for name in names:
        assert f"{name}_dice" in rows[0] and f"{name}_hd95" in rows[0]
        assert all(row[f"{name}_dice"] != "" or row["kind"] != "patient" for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases_written"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("mode, flags, labels, names, values", [
    ("multiclass", ["--label_mode", "multiclass"], {"background": 0, "edema": 2, "enhancing": 4},
     ("class2", "class4"), {2, 4}),
    ("regions", ["--label_mode", "regions"],
     {"background": 0, "whole tumour": [2, 4], "enhancing tumour": [4]}, ("whole_tumour", "enhancing_tumour"),
     {2, 4}),
])
def test_nnunet_volumes_end_to_end(fixture_data, tmp_path, mode, flags, labels, names, values):
    """The classes or regions come from dataset.json; volumes come back as label-map volumes."""
    data = write_nnunet_volumes(tmp_path / "Dataset001_Mini", labels)
    paths = train_all(data, tmp_path / "runs", flags)
    preprocess = load_checkpoint(paths["diffusion"], map_location="cpu")["config"]["preprocess"]
    assert preprocess["label_mode"] == mode
    out = tmp_path / "samples"
    ok(run("sample.py", "--data_dir", data, *sample_flags(paths), "--out_dir", out))
    for case in ("case_a", "case_b"):
        volume = nib.load(out / "masks" / f"{case}.nii.gz")
        assert volume.shape == (240, 240, 3)
        np.testing.assert_allclose(volume.affine, np.diag([1.0, 1.0, 2.5, 1.0]))
        assert set(np.unique(np.asarray(volume.dataobj)).tolist()) <= {0} | values
    rows = read_metrics(out)
    assert {row["kind"] for row in rows} >= {"case", "volume"}
    for name in names:
        assert f"{name}_dice" in rows[0]
