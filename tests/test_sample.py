"""sample.py from the command line, on checkpoints made by the real trainers (tiny, CPU).

The three networks are trained once per module (two steps each, 32x32) by train_addpm.py,
train_preseg_network.py and train_denoising_network.py on demo data. The runs a user makes
(the demo test split, the BraTS fixture, a 3D volume, pre-segmentations from a folder,
reproducibility, torchrun) start sample.py in a fresh process. The cheaper variants (other
samplers, the error lines, reruns, a raw state dict) call its ``main`` through the same
``run_cli`` entry point with ``sys.argv`` set, in this process: a fresh interpreter spends
about five seconds importing torch on the shared two-core machine.
"""

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from data import Preprocess, create_dataset
from evaluation.outputs import load_record
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.script_util import run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
PRE_T, T = 40, 25
UNET_FLAGS = [
    "--num_channels", "16", "--num_res_blocks", "1", "--attention_resolutions", "16",
]
SCHEDULE_FLAGS = ["--diffusion_steps", "100", "--noise_schedule", "cosine"]
NET_FLAGS = ["--image_size", "32", "--base_channels", "8", "--depth", "2", "--batch_size", "2",
             "--max_steps", "2", "--device", "cpu"]
# A non-identity voxel-to-world map with anisotropic zooms: rows and columns swapped, one
# axis flipped, 0.8 x 1.2 mm in plane and 3 mm slices (the slice axis stays array axis 2).
VOLUME_AFFINE = np.array([
    [0.0, -1.2, 0.0, 20.0],
    [0.8, 0.0, 0.0, -15.0],
    [0.0, 0.0, 3.0, 7.0],
    [0.0, 0.0, 0.0, 1.0],
])
VOLUME_SHAPE = (30, 34, 5)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return env


def _command(script: str, args, torchrun: bool = False) -> list:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*launcher, script, *[str(a) for a in args]]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def sample_cli(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    """sample.py in a fresh process, as a user runs it."""
    return subprocess.run(_command("sample.py", args, torchrun), cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def sample_main(capfd, *args) -> tuple:
    """sample.py's main in this process, through run_cli: (exit code, stderr)."""
    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["sample.py", *[str(a) for a in args]]
    try:
        run_cli(sample.main)
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    return code, capfd.readouterr().err


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo data and the three checkpoints; the trainers run side by side."""
    root = tmp_path_factory.mktemp("trained")
    subprocess.run(
        [sys.executable, "-m", "data.demo", "--out", str(root / "demo"), "--n_train", "12",
         "--n_test", "3", "--image_size", "32", "--seed", "0"],
        cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=120,
    )
    train = root / "demo" / "training"
    jobs = {
        "diffusion": ("train_addpm.py", ["--image_size", "32", *UNET_FLAGS, *SCHEDULE_FLAGS,
                                         "--batch_size", "2", "--max_steps", "2", "--device", "cpu",
                                         "--progress", "False"]),
        "preseg": ("train_preseg_network.py", NET_FLAGS),
        "denoiser": ("train_denoising_network.py", [*NET_FLAGS, *SCHEDULE_FLAGS, "--T", str(T)]),
    }
    procs = {}
    for name, (script, flags) in jobs.items():
        args = ["--data_dir", train, *flags, "--out_dir", root / name]
        procs[name] = subprocess.Popen(_command(script, args), cwd=REPO_ROOT, env=_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    paths = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (
            f"{name} training failed ({proc.returncode})\n{out[-2000:]}\n{err[-4000:]}"
        )
        paths[name] = root / name / "final.pt"
    return {"root": root, "test_dir": root / "demo" / "testing", **paths}


def checkpoint_flags(trained) -> list:
    return ["--model_path", trained["diffusion"], "--preseg_path", trained["preseg"],
            "--denoiser_path", trained["denoiser"], "--device", "cpu"]


def addpm_flags(trained, data_dir=None) -> list:
    return ["--data_dir", data_dir or trained["test_dir"], *checkpoint_flags(trained),
            "--pre_t", PRE_T, "--num_ensemble", 2]


@pytest.fixture(scope="module")
def addpm_run(trained, tmp_path_factory) -> Path:
    """One addpm run on the demo test split: K=2, pre_t 40, T from the denoiser (25)."""
    out = tmp_path_factory.mktemp("addpm") / "out"
    proc = ok(sample_cli(*addpm_flags(trained), "--out_dir", out))
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def case_ids(data_dir) -> list:
    return list(create_dataset(str(data_dir)).case_ids)


def read_metrics(out: Path) -> list:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load_nifti(path: Path):
    image = nib.load(str(path))
    return image, np.asarray(image.dataobj)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_no_temp_files(out: Path) -> None:
    """Every file is written under a temporary name and renamed; none may be left over."""
    leftovers = [str(p) for p in out.rglob(".*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def outputs_of(out: Path) -> dict:
    """Every mask and uncertainty array a run wrote, by relative path."""
    return {str(p.relative_to(out)): load_nifti(p)[1] for p in sorted(out.glob("*/*.nii.gz"))
            if p.parent.name in ("masks", "uncertainty")}


# --------------------------------------------------------------------------------------------
# The main run and what it writes


def test_addpm_on_demo_writes_every_output(trained, addpm_run):
    out, ids = addpm_run, case_ids(trained["test_dir"])
    assert len(ids) == 3
    for cid in ids:
        assert (out / "masks" / f"{cid}.nii.gz").is_file()
        assert (out / "uncertainty" / f"{cid}_variance.nii.gz").is_file()
        assert (out / "uncertainty" / f"{cid}_entropy.nii.gz").is_file()
        assert (out / "overlays" / f"{cid}.png").is_file()
        assert (out / "cases" / f"{cid}.npz").is_file()
    assert not (out / "preseg").exists()  # --save_preseg is off by default
    assert_no_temp_files(out)

    rows = read_metrics(out)
    assert sorted(r["case_id"] for r in rows if r["kind"] == "case") == sorted(ids)
    patients = [r for r in rows if r["kind"] == "patient"]
    assert len(patients) == 1  # the demo test slices are three slices of one patient
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and 0.0 <= float(row["preseg_dice"]) <= 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"] == "addpm" and summary["final_step"] == "denoiser"
    assert summary["pre_t"] == PRE_T and summary["T"] == T
    assert summary["timesteps"] == [PRE_T, T]
    assert summary["unet_evaluations_per_image"] == 2 * (PRE_T - T)
    assert summary["n_cases_written"] == 3 and summary["n_cases"] == 3
    hashes = summary["checkpoints"]
    assert hashes["model_path"]["sha256"] == sha256(trained["diffusion"])
    assert hashes["model_path"]["weights"].startswith("ema:")
    assert hashes["preseg_path"]["sha256"] == sha256(trained["preseg"])
    assert hashes["denoiser_path"]["sha256"] == sha256(trained["denoiser"])


def test_run_prints_a_header_and_a_closing_line(trained, addpm_run):
    lines = (addpm_run.parent / "stdout.txt").read_text().splitlines()
    start = lines.index("sampling")
    header = dict(line.split(None, 1) for line in lines[start + 1 : start + 7])
    assert header["device"] == "cpu, fp32, 1 process"
    assert header["sampler"] == (f"addpm {PRE_T} -> {T} ({PRE_T - T} UNet evaluations per member, final step "
                                 "denoiser); 2 members, fusion mean")
    assert header["data"] == f"{trained['test_dir']}: 3 cases (brats2d), labelled"
    assert header["checkpoints"] == (f"model {trained['diffusion']}, preseg {trained['preseg']}, "
                                     f"denoiser {trained['denoiser']}")
    assert header["overlays"] == "channel 3 (flair)" and header["out_dir"] == str(addpm_run)
    # The last line: the headline Dice of summary.json, as python -m evaluation prints it.
    summary = json.loads((addpm_run / "summary.json").read_text())
    patient, case = summary["headline"]["dice"]["mean"], summary["kinds"]["case"]["metrics"]["dice"]["mean"]
    assert lines[-1].startswith("sampling done in ")
    assert (f": mean dice per patient {patient:.4f} (1 patient); per case {case:.4f} (3 cases, 0 both empty "
            "left out); ") in lines[-1]
    assert lines[-1].endswith(f"results in {addpm_run} (metrics.csv, summary.json, masks/, uncertainty/, overlays/)")
    assert summary["results"] in lines[-1]


def overlay_panel(path: Path, index: int, side: int = 32, scale: int = 4) -> np.ndarray:
    """Panel ``index`` of an overlay of a side x side case (title and name lines above it)."""
    from evaluation.overlay import OVERLAY_GAP, OVERLAY_LINE_HEIGHT

    with Image.open(path) as img:
        picture = np.asarray(img.convert("RGB"))
    x, top = index * (side * scale + OVERLAY_GAP), 2 * OVERLAY_LINE_HEIGHT
    return picture[top : top + side * scale, x : x + side * scale]


def test_overlays_show_flair_by_default_and_the_channel_asked_for(trained, addpm_run, tmp_path, capfd):
    from evaluation.overlay import OVERLAY_FOOTER_HEIGHT, OVERLAY_GAP, OVERLAY_LINE_HEIGHT, _gray, _upscale

    checkpoint = load_checkpoint(trained["diffusion"], kind="diffusion")
    dataset = create_dataset(str(trained["test_dir"]), preprocess=Preprocess.from_dict(checkpoint["config"]["preprocess"]))
    item = dataset[0]
    expected = {c: np.round(_upscale(_gray(item["image"][c].numpy()), 4)).astype(np.uint8) for c in range(4)}
    default = addpm_run / "overlays" / f"{item['case_id']}.png"
    with Image.open(default) as img:
        # flair, label, pre-seg, result, variance, entropy: 32x32 panels drawn at 4x.
        assert img.size == (6 * 128 + 5 * OVERLAY_GAP, 2 * OVERLAY_LINE_HEIGHT + 128 + OVERLAY_FOOTER_HEIGHT)
    np.testing.assert_array_equal(overlay_panel(default, 0), expected[3])
    out = tmp_path / "t1"
    code, err = sample_main(capfd, *addpm_flags(trained), "--file_list", "0", "--overlay_channel", "t1",
                            "--out_dir", out)
    assert code == 0, err
    np.testing.assert_array_equal(overlay_panel(out / "overlays" / f"{item['case_id']}.png", 0), expected[0])
    assert not (expected[0] == expected[3]).all()
    code, err = sample_main(capfd, *addpm_flags(trained), "--overlay_channel", "adc", "--out_dir", tmp_path / "bad")
    assert code == 2 and error_lines(err) == [
        "error: --overlay_channel 'adc' is not a channel of the images (0 t1, 1 t1ce, 2 t2, 3 flair)"]
    assert not (tmp_path / "bad").exists()


def new_scans_folder(test_dir: Path, root: Path) -> Path:
    """The demo test slices as new scans: nnU-Net imagesTs names (<case>_0000 ... _0003 in
    t1, t1ce, t2, flair order), one flat folder, no labels, no dataset.json."""
    root.mkdir(parents=True)
    for folder in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            (source,) = folder.glob(f"*_{modality}_*.nii.gz")
            prefix, number = source.name.split(f"_{modality}_")
            case = f"{prefix}_{number.split('_')[0]}"
            shutil.copy(source, root / f"{case}_{channel:04d}.nii.gz")
    return root


def test_unlabelled_folder_of_new_scans_end_to_end(trained, addpm_run, tmp_path):
    """The README's command on a folder of scans without labels: recognised as unlabelled input
    of the layout the model was trained on, segmented with no extra flag, not scored."""
    scans = new_scans_folder(trained["test_dir"], tmp_path / "imagesTs")
    out = tmp_path / "new"
    proc = ok(sample_cli("--data_dir", scans, "--model_path", trained["diffusion"], "--preseg_path",
                         trained["preseg"], "--denoiser_path", trained["denoiser"], "--pre_t", PRE_T,
                         "--num_ensemble", 2, "--out_dir", out, "--device", "cpu"))
    ids = case_ids(trained["test_dir"])
    assert (f"data         {scans}: 3 cases (brats2d layout of the model), unlabelled: masks, uncertainty and "
            "overlays are written, no metrics") in proc.stdout
    for cid in ids:
        source = nib.load(str(scans / f"{cid}_0000.nii.gz"))
        image, mask = load_nifti(out / "masks" / f"{cid}.nii.gz")
        np.testing.assert_allclose(image.affine, source.affine)
        # The same images, case ids and seed as the labelled run: the same masks and maps.
        np.testing.assert_array_equal(mask, load_nifti(addpm_run / "masks" / f"{cid}.nii.gz")[1])
        for kind in ("variance", "entropy"):
            np.testing.assert_allclose(load_nifti(out / "uncertainty" / f"{cid}_{kind}.nii.gz")[1],
                                       load_nifti(addpm_run / "uncertainty" / f"{cid}_{kind}.nii.gz")[1])
        with Image.open(out / "overlays" / f"{cid}.png") as img:
            assert img.size[0] == 5 * 128 + 4 * 4  # no label panel
    assert not (out / "metrics.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 0 and summary["n_unlabelled"] == summary["n_cases_written"] == 3
    assert summary["results"] == "unlabelled: 3 cases (no metrics)"
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("sampling done in ") and ": unlabelled: 3 cases (no metrics); " in last
    assert last.endswith(f"results in {out} (summary.json, masks/, uncertainty/, overlays/)")


def test_masks_and_maps_keep_the_source_geometry(trained, addpm_run):
    for cid in case_ids(trained["test_dir"]):
        source = next(trained["test_dir"].glob(f"*/{cid[:-4]}_flair_{cid[-3:]}_w.nii.gz"))
        reference = nib.load(str(source))
        mask_image, mask = load_nifti(addpm_run / "masks" / f"{cid}.nii.gz")
        assert mask.shape == reference.shape
        np.testing.assert_allclose(mask_image.affine, reference.affine)
        assert set(np.unique(mask)) <= {0, 1}
        _, variance = load_nifti(addpm_run / "uncertainty" / f"{cid}_variance.nii.gz")
        _, entropy = load_nifti(addpm_run / "uncertainty" / f"{cid}_entropy.nii.gz")
        assert variance.shape == entropy.shape == reference.shape
        assert variance.min() >= 0 and variance.max() <= 0.25 + 1e-6
        assert entropy.min() >= 0 and entropy.max() <= math.log(2) + 1e-6


@pytest.mark.slow
def test_unlabelled_brats_fixture_comes_back_at_240(trained, brats2d_mini, tmp_path):
    out = tmp_path / "out"
    ok(sample_cli(*addpm_flags(trained, brats2d_mini / "testing"), "--out_dir", out))
    ids = case_ids(brats2d_mini / "testing")
    assert len(ids) == 2
    for cid in ids:
        source = next((brats2d_mini / "testing").glob(f"*/*_flair_*{cid[-3:]}_w.nii.gz"))
        reference = nib.load(str(source))
        image, mask = load_nifti(out / "masks" / f"{cid}.nii.gz")
        assert mask.shape == reference.shape == (240, 240)
        np.testing.assert_allclose(image.affine, reference.affine)
        # The 32x32 network grid is the centre crop; the border it cut off comes back empty.
        border = mask.copy()
        border[104:136, 104:136] = 0
        assert not border.any()
        assert (out / "overlays" / f"{cid}.png").is_file()
    assert not (out / "metrics.csv").exists()  # no labels, nothing to score
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases_written"] == summary["n_unlabelled"] == 2 and summary["n_cases"] == 0
    assert summary["results"] == "unlabelled: 2 cases (no metrics)"


def write_brats3d(root: Path) -> Path:
    """One BraTS 2021-style volume (Case/Case_t1.nii.gz ... _seg) of VOLUME_SHAPE."""
    rng = np.random.default_rng(0)
    y, x, z = np.meshgrid(*[np.arange(n) for n in VOLUME_SHAPE], indexing="ij")
    brain = ((y - 15) / 13) ** 2 + ((x - 17) / 15) ** 2 < 1
    tumour = ((y - 12) / 5) ** 2 + ((x - 20) / 6) ** 2 + ((z - 2) / 2.5) ** 2 < 1
    case = root / "Vol3d"
    case.mkdir(parents=True)
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        image = brain * (100.0 + 20 * i) + tumour * (50.0 + 10 * i) + rng.normal(0, 5, VOLUME_SHAPE) * brain
        nib.save(nib.Nifti1Image(image.astype(np.float32), VOLUME_AFFINE),
                 str(case / f"Vol3d_{modality}.nii.gz"))
    seg = np.where(tumour, 2, 0).astype(np.uint8)
    seg[tumour & (y < 12)] = 1
    nib.save(nib.Nifti1Image(seg, VOLUME_AFFINE), str(case / "Vol3d_seg.nii.gz"))
    return root


@pytest.mark.slow
def test_3d_volume_in_gives_volumes_out(trained, tmp_path):
    data = write_brats3d(tmp_path / "brats3d")
    out = tmp_path / "out"
    ok(sample_cli(*addpm_flags(trained, data), "--out_dir", out))
    source = nib.load(str(data / "Vol3d" / "Vol3d_flair.nii.gz"))
    names = ("masks/Vol3d.nii.gz", "uncertainty/Vol3d_variance.nii.gz", "uncertainty/Vol3d_entropy.nii.gz")
    for name in names:
        image, volume = load_nifti(out / name)
        assert volume.shape == source.shape == VOLUME_SHAPE, name
        np.testing.assert_allclose(image.affine, source.affine, err_msg=name)
        np.testing.assert_allclose(image.header.get_zooms(), (0.8, 1.2, 3.0), rtol=1e-6, err_msg=name)
    _, mask = load_nifti(out / "masks" / "Vol3d.nii.gz")
    assert mask.dtype == np.uint8
    # Every slice sits where it came from.
    for k in range(VOLUME_SHAPE[2]):
        record = load_record(str(out / "cases" / f"Vol3d_{k:03d}.npz"))
        np.testing.assert_array_equal(mask[:, :, k], record["mask"])

    rows = read_metrics(out)
    assert sorted(r["kind"] for r in rows) == ["case"] * VOLUME_SHAPE[2] + ["volume"]
    volume_row = next(r for r in rows if r["kind"] == "volume")
    assert volume_row["group_id"] == "Vol3d"
    seg = np.asarray(nib.load(str(data / "Vol3d" / "Vol3d_seg.nii.gz")).dataobj)
    assert int(float(volume_row["label_voxels"])) == int((seg > 0).sum())
    assert int(float(volume_row["pred_voxels"])) == int(mask.sum())


# --------------------------------------------------------------------------------------------
# Pre-segmentations from a folder


def write_preseg_dir(trained, folder: Path) -> dict:
    """An asymmetric blob per case, as NIfTI at the input's size with the input's affine."""
    folder.mkdir()
    masks = {}
    for n, cid in enumerate(case_ids(trained["test_dir"])):
        source = nib.load(str(next(trained["test_dir"].glob(f"*/{cid[:-4]}_flair_{cid[-3:]}_w.nii.gz"))))
        mask = np.zeros(source.shape, dtype=np.uint8)
        mask[3 + n:12 + n, 5:21] = 1
        mask[12 + n:16 + n, 5:8] = 1
        nib.save(nib.Nifti1Image(mask, source.affine), str(folder / f"{cid}.nii.gz"))
        masks[cid] = mask
    return masks


@pytest.mark.slow
def test_preseg_dir_feeds_addpm_and_the_preseg_sampler(trained, tmp_path):
    given = write_preseg_dir(trained, tmp_path / "presegs")
    data = ["--data_dir", trained["test_dir"], "--model_path", trained["diffusion"], "--device", "cpu",
            "--preseg_dir", tmp_path / "presegs"]
    ok(sample_cli(*data, "--sampler", "preseg", "--out_dir", tmp_path / "preseg"))
    for cid, mask in given.items():
        np.testing.assert_array_equal(load_nifti(tmp_path / "preseg" / "masks" / f"{cid}.nii.gz")[1], mask)
    for row in read_metrics(tmp_path / "preseg"):
        assert row["dice"] == row["preseg_dice"]

    ok(sample_cli(*data, "--denoiser_path", trained["denoiser"], "--pre_t", PRE_T,
                  "--num_ensemble", 2, "--save_preseg", True, "--out_dir", tmp_path / "addpm"))
    summary = json.loads((tmp_path / "addpm" / "summary.json").read_text())
    assert summary["sampler"] == "addpm" and summary["n_cases_written"] == 3
    assert "preseg_path" not in summary["checkpoints"]
    assert summary["checkpoints"]["preseg_dir"]["path"] == str(tmp_path / "presegs")
    for cid, mask in given.items():
        np.testing.assert_array_equal(load_nifti(tmp_path / "addpm" / "preseg" / f"{cid}.nii.gz")[1], mask)


# --------------------------------------------------------------------------------------------
# Reruns, reproducibility, other samplers, models trained elsewhere


@pytest.mark.slow
def test_rerun_skips_finished_cases_unless_overwrite(trained, addpm_run, tmp_path, capfd):
    out = tmp_path / "out"
    shutil.copytree(addpm_run, out)
    records = sorted((out / "cases").glob("*.npz"))
    past = 1_000_000_000
    for path in records:
        os.utime(path, (past, past))
    records[1].unlink()  # as if the run had stopped before this case

    code, err = sample_main(capfd, *addpm_flags(trained), "--out_dir", out)
    assert code == 0, err
    assert records[1].is_file()
    for path in (records[0], records[2]):
        assert path.stat().st_mtime == past, f"{path.name} was recomputed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases_written"] == 3
    assert len([r for r in read_metrics(out) if r["kind"] == "case"]) == 3

    code, err = sample_main(capfd, *addpm_flags(trained), "--out_dir", out, "--overwrite", True)
    assert code == 0, err
    assert all(path.stat().st_mtime != past for path in records)


@pytest.mark.slow
def test_same_seed_same_result_other_en_num_other_samples(trained, addpm_run, tmp_path, capfd):
    ok(sample_cli(*addpm_flags(trained), "--seed", 0, "--out_dir", tmp_path / "again"))
    first, again = outputs_of(addpm_run), outputs_of(tmp_path / "again")
    assert first.keys() == again.keys() and len(first) == 9
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)

    code, err = sample_main(capfd, *addpm_flags(trained), "--en_num", 1, "--out_dir", tmp_path / "en1")
    assert code == 0, err
    other = outputs_of(tmp_path / "en1")
    variances = [name for name in first if name.endswith("_variance.nii.gz")]
    assert any(not np.array_equal(first[name], other[name]) for name in variances)


def assert_same_outputs_within_tolerance(got_dir: Path, want_dir: Path, case_ids_: list, *,
                                         atol: float = 1e-4, undecided: float = 2e-3) -> None:
    """The same masks, and the same uncertainty maps up to ``atol``, in two runs' out_dirs.

    A mask pixel may differ only where the fused probability is within ``undecided`` of 0.5,
    read from the entropy map (the binary entropy of that probability).
    """
    got, want = outputs_of(got_dir), outputs_of(want_dir)
    assert got.keys() == want.keys() and len(got) == 3 * len(case_ids_)
    for name in got:
        if name.startswith("uncertainty"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
    p = 0.5 + undecided
    entropy_floor = -p * math.log(p) - (1 - p) * math.log(1 - p)
    for cid in case_ids_:
        mask_name = f"masks/{cid}.nii.gz"
        decided = want[f"uncertainty/{cid}_entropy.nii.gz"] < entropy_floor
        np.testing.assert_array_equal(got[mask_name][decided], want[mask_name][decided], err_msg=mask_name)


def test_fast_path_off_gives_the_same_results_within_float_tolerance(trained, addpm_run, tmp_path, capfd):
    """--fast_path False (guided-diffusion's computation) against the default run."""
    code, err = sample_main(capfd, *addpm_flags(trained), "--fast_path", False, "--out_dir", tmp_path / "exact")
    assert code == 0, err
    assert_same_outputs_within_tolerance(addpm_run, tmp_path / "exact", case_ids(trained["test_dir"]))


@pytest.mark.parametrize(
    "flags, per_member",
    [
        (["--sampler", "ddpm", "--num_ensemble", 1], 100),
        (["--sampler", "ddim", "--sampling_steps", 5, "--num_ensemble", 2], 5),
        (["--final_step", "x0", "--pre_t", PRE_T, "--T", T, "--num_ensemble", 2], PRE_T - T + 1),
    ],
    ids=["ddpm-100", "ddim-5", "addpm-x0"],
)
def test_other_samplers_run(trained, tmp_path, capfd, flags, per_member):
    # No denoiser exists at the given path: only addpm with --final_step denoiser reads one.
    code, err = sample_main(
        capfd, "--data_dir", trained["test_dir"], "--model_path", trained["diffusion"],
        "--preseg_path", trained["preseg"], "--denoiser_path", tmp_path / "no-denoiser.pt",
        "--device", "cpu", "--file_list", "0", "--out_dir", tmp_path / "out", *flags,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unet_evaluations_per_member"] == per_member
    assert summary["n_cases_written"] == 1
    assert "denoiser_path" not in summary["checkpoints"]
    assert len(list((tmp_path / "out" / "masks").glob("*.nii.gz"))) == 1


@pytest.mark.slow
def test_raw_state_dict_matches_the_checkpoint(trained, tmp_path, capfd):
    raw = tmp_path / "savedmodel.pt"
    torch.save(load_checkpoint(trained["diffusion"], kind="diffusion")["model"], raw)
    common = ["--data_dir", trained["test_dir"], "--preseg_path", trained["preseg"],
              "--denoiser_path", trained["denoiser"], "--device", "cpu", "--pre_t", PRE_T,
              "--num_ensemble", 2, "--seed", 3]
    code, err = sample_main(capfd, *common, "--model_path", trained["diffusion"], "--use_ema", False,
                            "--out_dir", tmp_path / "ckpt")
    assert code == 0, err
    raw_flags = ["--model_path", raw, "--image_size", 32, *UNET_FLAGS, *SCHEDULE_FLAGS]
    # A raw state dict samples in {0,1}, as the original code trains; ours was trained on {-1,+1},
    # and the denoiser (trained on {-1,+1}) refuses the mismatch before anything is written.
    code, err = sample_main(capfd, *common, *raw_flags, "--out_dir", tmp_path / "raw01")
    assert code == 2 and error_lines(err)[-1].startswith("error: mask_space 01 (of the diffusion model)")
    assert not (tmp_path / "raw01").exists()
    capfd.readouterr()
    code, err = sample_main(capfd, *common, *raw_flags, "--mask_space", "pm1", "--out_dir", tmp_path / "raw")
    assert code == 0, err
    from_ckpt, from_raw = outputs_of(tmp_path / "ckpt"), outputs_of(tmp_path / "raw")
    assert from_ckpt.keys() == from_raw.keys() and from_ckpt
    for name in from_ckpt:
        np.testing.assert_array_equal(from_ckpt[name], from_raw[name], err_msg=name)
    summary = json.loads((tmp_path / "raw" / "summary.json").read_text())
    assert summary["checkpoints"]["model_path"]["weights"] == "raw"
    assert summary["mask_space"] == "pm1"


def test_raw_state_dict_defaults_to_the_original_01_mask_space(trained, tmp_path, capfd):
    """The original command on a raw state dict: {0,1} masks, said in one note line."""
    raw = tmp_path / "savedmodel.pt"
    torch.save(load_checkpoint(trained["diffusion"], kind="diffusion")["model"], raw)
    out = tmp_path / "out"
    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["sample.py", "--data_dir", str(trained["test_dir"]), "--model_path", str(raw),
                "--image_size", "32", *UNET_FLAGS, *SCHEDULE_FLAGS, "--file_list", "0", "--pre_t", str(PRE_T),
                "--en_num", "0", "--final_step", "x0", "--T", str(T), "--num_ensemble", "1",
                "--preseg_path", str(trained["preseg"]), "--device", "cpu", "--out_dir", str(out)]
    try:
        run_cli(sample.main)
    finally:
        sys.argv = argv
    printed = capfd.readouterr().out
    assert f"note: {raw} is a raw state dict: sampling with --mask_space 01" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask_space"] == "01" and summary["n_cases_written"] == 1


# --------------------------------------------------------------------------------------------
# Errors: exit code 2, one line, nothing written


@pytest.mark.slow
def test_denoiser_of_another_T_is_refused_in_one_line(trained, tmp_path):
    out = tmp_path / "out"
    proc = sample_cli(*addpm_flags(trained), "--T", 20, "--out_dir", out)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "--T 20" in lines[0] and "T=25" in lines[0] and str(trained["denoiser"]) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("case", ["wrong_kind", "missing", "corrupt", "truncated", "unknown_case",
                                  "preseg_dir_without_the_case"])
def test_bad_input_gives_one_error_line(trained, tmp_path, capfd, case):
    model_path = trained["diffusion"]
    preseg = ["--preseg_path", trained["preseg"]]
    extra = []
    if case == "wrong_kind":
        model_path, expect = trained["preseg"], ["preseg", "diffusion"]
    elif case == "missing":
        model_path, expect = tmp_path / "nothere.pt", ["nothere.pt", "no such file"]
    elif case == "corrupt":
        model_path, expect = tmp_path / "corrupt.pt", ["corrupt.pt"]
        model_path.write_bytes(np.random.default_rng(0).bytes(512))
    elif case == "truncated":
        model_path, expect = tmp_path / "truncated.pt", ["truncated.pt", "truncated"]
        model_path.write_bytes(trained["diffusion"].read_bytes()[:20000])
    elif case == "unknown_case":
        extra, expect = ["--file_list", "0,no_such_case"], ["--file_list", "no_such_case"]
    else:
        (tmp_path / "empty").mkdir()
        preseg = ["--preseg_dir", tmp_path / "empty"]
        expect = ["--preseg_dir", case_ids(trained["test_dir"])[0]]
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", trained["test_dir"], "--model_path", model_path, *preseg,
                            "--denoiser_path", trained["denoiser"], "--device", "cpu", "--pre_t", PRE_T,
                            "--num_ensemble", 1, "--out_dir", out, *extra)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in expect:
        assert word in lines[0], lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_torchrun_splits_cases_and_rank0_merges(trained, addpm_run, tmp_path):
    out = tmp_path / "out"
    ok(sample_cli(*addpm_flags(trained), "--out_dir", out, torchrun=True))
    ids = case_ids(trained["test_dir"])
    rows = read_metrics(out)
    assert sorted(r["case_id"] for r in rows if r["kind"] == "case") == sorted(ids)
    assert len([r for r in rows if r["kind"] == "patient"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["n_cases_written"] == 3
    assert sorted(p.stem for p in (out / "cases").glob("*.npz")) == sorted(ids)
    assert_no_temp_files(out)
    # A case's noise depends on the seed and the case, not on the rank that ran it.
    for cid in ids:
        for name in (f"masks/{cid}.nii.gz", f"uncertainty/{cid}_variance.nii.gz"):
            assert np.array_equal(nib.load(str(out / name)).get_fdata(), nib.load(str(addpm_run / name)).get_fdata())


@pytest.mark.slow
def test_preseg_dir_takes_whole_volumes_for_3d_input(trained, tmp_path):
    """A 3D tool's output (one volume per case) is a pre-segmentation for volume inputs."""
    data = write_brats3d(tmp_path / "brats3d")
    seg = nib.load(str(data / "Vol3d" / "Vol3d_seg.nii.gz"))
    preseg_dir = tmp_path / "preseg"
    preseg_dir.mkdir()
    given = (np.asarray(seg.dataobj) > 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(given, seg.affine), str(preseg_dir / "Vol3d.nii.gz"))
    out = tmp_path / "out"
    ok(sample_cli("--data_dir", data, "--model_path", trained["diffusion"], "--preseg_dir", preseg_dir,
                  "--sampler", "preseg", "--out_dir", out))
    _, mask = load_nifti(out / "masks" / "Vol3d.nii.gz")
    np.testing.assert_array_equal(mask, given)


# --------------------------------------------------------------------------------------------
# Reruns with other settings, the pre-segmentation alone, flags that were silently misread


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_unless_overwrite(trained, addpm_run, tmp_path, capfd):
    out = tmp_path / "out"
    shutil.copytree(addpm_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flags, named in ((["--sampler", "preseg"], "sampler addpm, now preseg"),
                         (["--num_ensemble", 3], "num_ensemble 2, now 3")):
        code, err = sample_main(capfd, *addpm_flags(trained), *flags, "--out_dir", out)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert named in lines[0] and "--overwrite True" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    code, err = sample_main(capfd, *addpm_flags(trained), "--num_ensemble", 3, "--overwrite", True,
                            "--out_dir", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ensemble"] == 3 and summary["unet_evaluations_per_image"] == 3 * (PRE_T - T)
    for path in sorted((out / "cases").glob("*.npz")):
        record = load_record(str(path), arrays=())
        assert record["settings"]["num_ensemble"] == 3 and record["settings_digest"] == summary["settings_digest"]
        assert record["settings"]["checkpoints"]["model_path"]["sha256"] == sha256(trained["diffusion"])

    # A resumed run reuses only the records of its own settings: one made with K=2 is redone.
    stale = out / "cases" / f"{case_ids(trained['test_dir'])[0]}.npz"
    shutil.copy(addpm_run / "cases" / stale.name, stale)
    code, err = sample_main(capfd, *addpm_flags(trained), "--num_ensemble", 3, "--out_dir", out)
    assert code == 0, err
    assert load_record(str(stale), arrays=())["settings"]["num_ensemble"] == 3


def test_preseg_sampler_runs_with_the_preseg_checkpoint_alone(trained, addpm_run, tmp_path, capfd):
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", trained["test_dir"], "--sampler", "preseg",
                            "--preseg_path", trained["preseg"], "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"] == "preseg" and summary["unet_evaluations_per_image"] == 0
    assert set(summary["checkpoints"]) == {"preseg_path"}
    preseg_config = load_checkpoint(trained["preseg"], kind="preseg")["config"]["preprocess"]
    assert summary["preprocess"]["image_size"] == preseg_config["image_size"]
    # The same net as inside the addpm run: the same pre-segmentation scores.
    addpm_rows = {r["case_id"]: r for r in read_metrics(addpm_run)}
    for row in read_metrics(out):
        assert float(row["dice"]) == pytest.approx(float(addpm_rows[row["case_id"]]["preseg_dice"]))


def test_label_map_preseg_with_foreground_labels_and_a_raw_state_dict(trained, tmp_path, capfd):
    """nnU-Net-style label maps [0,1,2,4] as pre-segmentations, scored as tumour core (1,4):
    the case's own label map must score Dice 1 (not whole tumour against tumour core)."""
    presegs = tmp_path / "presegs"
    presegs.mkdir()
    for seg in trained["test_dir"].glob("*/*_seg_*.nii.gz"):
        prefix, _, slice_tag = seg.name.partition("_seg_")
        shutil.copy(seg, presegs / f"{prefix}_{slice_tag[:3]}.nii.gz")
    assert {0, 1, 2, 4} <= set(np.unique(np.concatenate([
        load_nifti(p)[1].ravel() for p in presegs.iterdir()])))
    raw = tmp_path / "savedmodel.pt"
    torch.save(load_checkpoint(trained["diffusion"], kind="diffusion")["model"], raw)
    common = ["--data_dir", trained["test_dir"], "--sampler", "preseg", "--preseg_dir", presegs,
              "--foreground_labels", "1,4", "--image_size", 32, "--device", "cpu"]
    runs = {"raw": ["--model_path", raw, *UNET_FLAGS, *SCHEDULE_FLAGS], "alone": []}
    for name, flags in runs.items():
        code, err = sample_main(capfd, *common, *flags, "--out_dir", tmp_path / name)
        assert code == 0, err
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["preprocess"]["label_mode"] == "subset"
        assert summary["preprocess"]["foreground_labels"] == [1, 4]
        rows = [r for r in read_metrics(tmp_path / name) if r["kind"] == "case"]
        assert len(rows) == 3 and all(float(r["dice"]) == 1.0 for r in rows)


def test_negative_T_other_than_minus_one_is_refused(trained, tmp_path, capfd):
    out = tmp_path / "out"
    code, err = sample_main(capfd, *addpm_flags(trained), "--T", -7, "--out_dir", out)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "--T -7" in lines[0] and "-1" in lines[0], err
    assert not out.exists()


def test_out_dir_that_is_a_file_is_refused_before_sampling(trained, tmp_path, capfd):
    target = tmp_path / "results.txt"
    target.write_text("notes\n")
    for out, words in ((target, "is a file"), (target / "sub", "which is a file")):
        code, err = sample_main(capfd, *addpm_flags(trained), "--out_dir", out)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and str(out) in lines[0] and words in lines[0], err
    assert target.read_text() == "notes\n"


def test_remote_model_path_is_hashed_through_blobfile(trained, tmp_path, capfd, monkeypatch):
    """A blobfile URL is read, and hashed, through blobfile. No cloud is reachable here, so
    blobfile's calls are served from a local file for one made-up URL."""
    import blobfile

    url, local = "gs://bucket/run/final.pt", str(trained["diffusion"])
    real_open, real_exists, real_isdir = blobfile.BlobFile, blobfile.exists, blobfile.isdir
    monkeypatch.setattr(blobfile, "BlobFile", lambda p, mode="r", **kw: real_open(local if p == url else p, mode, **kw))
    monkeypatch.setattr(blobfile, "exists", lambda p: p == url or real_exists(p))
    monkeypatch.setattr(blobfile, "isdir", lambda p: p != url and real_isdir(p))
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", trained["test_dir"], "--model_path", url,
                            "--preseg_path", trained["preseg"], "--denoiser_path", trained["denoiser"],
                            "--device", "cpu", "--pre_t", PRE_T, "--num_ensemble", 1, "--file_list", "0",
                            "--out_dir", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["model_path"] == {"path": url, "sha256": sha256(trained["diffusion"]),
                                                    "weights": summary["checkpoints"]["model_path"]["weights"]}


def test_unicode_names_keep_their_own_stems(tmp_path, capfd):
    """``病例 2.png`` and ``2.png`` are two cases, and every output keeps the input's stem."""
    from PIL import Image

    from evaluation.cli import evaluate_folders

    data = tmp_path / "kvasir"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    masks = {}
    for n, stem in enumerate(("病例 2", "2")):
        image = np.full((20, 24, 3), 40 + 30 * n, dtype=np.uint8)
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[4 + n:12, 5:15 + n] = 255
        Image.fromarray(image).save(data / "images" / f"{stem}.png")
        Image.fromarray(mask).save(data / "masks" / f"{stem}.png")
        masks[stem] = mask
    assert sorted(case_ids(data)) == ["2", "病例 2"]
    out = tmp_path / "out"
    code, err = sample_main(capfd, "--data_dir", data, "--sampler", "preseg", "--preseg_dir", data / "masks",
                            "--image_size", 24, "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    for stem, mask in masks.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{stem}.png")), mask)
        assert (out / "cases" / f"{stem}.npz").is_file() and (out / "overlays" / f"{stem}.png").is_file()
    assert sorted(r["case_id"] for r in read_metrics(out)) == ["2", "病例 2"]
    rows, info = evaluate_folders(out / "masks", data / "masks")
    assert sorted(r["case_id"] for r in rows) == ["2", "病例 2"] and all(r["dice"] == 1.0 for r in rows)


def test_rerun_removes_the_temporary_files_of_a_killed_run(trained, addpm_run, tmp_path, capfd):
    from tests.test_run_folders import killed_writer

    out = tmp_path / "out"
    shutil.copytree(addpm_run, out)
    cid = case_ids(trained["test_dir"])[0]
    stale = [killed_writer(out / "masks" / f"{cid}.nii.gz"), killed_writer(out / "cases" / f"{cid}.npz"),
             killed_writer(out / "summary.json")]
    code, err = sample_main(capfd, *addpm_flags(trained), "--out_dir", out)
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    assert_no_temp_files(out)
