"""The binary path gives bit-identical results to the code before multi-class segmentation existed.

A tiny fixed-seed pipeline on the BraTS fixture: the three trainers, then the ADDPM sampler with an
ensemble of two. The digests below are of the weights (every state-dict tensor, not the checkpoint
files, which hold paths and times), of the written masks and uncertainty maps (their voxel arrays),
and of the values in metrics.csv. They were produced by the pre-multiclass code (commit bf4277a)
running these same commands:

    python tests/test_binary_unchanged.py REPO WORK_DIR

prints them for the code in REPO: GOLDEN and GOLDEN_VALIDATED.

The second configuration takes the paths that the first leaves out: a train/val split, so every
trainer validates and keeps best.pt (train_addpm.py with the in-training ADDPM validation and
--train_start preseg), then sample.py from the three best.pt with --fusion vote, --save_preseg
and overlays. It pins the progress.csv values (timing columns left out), the step and weights of
each best.pt and final.pt, summary.json (timing, paths, versions and the checkpoint file hashes
left out, one digest per field), the overlay pixels and the pre-segmentation files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS2D_TRAINING = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini" / "training"
DATA_FLAGS = ["--image_size", "32", "--resize_mode", "resize", "--val_fraction", "0"]
SCHEDULE_FLAGS = ["--diffusion_steps", "100", "--noise_schedule", "cosine"]
NET_FLAGS = [*DATA_FLAGS, "--base_channels", "8", "--depth", "2", "--batch_size", "2", "--max_steps", "3",
             "--seed", "0", "--device", "cpu"]
TRAIN = {
    "preseg": ("train_preseg_network.py", NET_FLAGS),
    "denoiser": ("train_denoising_network.py", [*NET_FLAGS, *SCHEDULE_FLAGS, "--T", "25"]),
    "diffusion": ("train_addpm.py", [*DATA_FLAGS, "--num_channels", "16", "--num_res_blocks", "1",
                                     "--attention_resolutions", "16", *SCHEDULE_FLAGS, "--batch_size", "2",
                                     "--max_steps", "3", "--seed", "0", "--device", "cpu", "--progress", "False"]),
}
SAMPLE_FLAGS = ["--sampler", "addpm", "--pre_t", "40", "--num_ensemble", "2", "--seed", "0", "--device", "cpu"]

# Produced by the pre-multiclass code (bf4277a) with the commands above; see the module docstring.
GOLDEN = {
    "weights/preseg":
        "1c793ab79a98996d61faf17f3cfb55592af21420747e3951cc0dc00569014a0d",
    "weights/denoiser":
        "d9c08751cec798779a257d2ca3a5b4eb3573e23a04796016ed379322ba619487",
    "weights/diffusion":
        "6651a2af76b9a5743ce5a54a08b57610a4da3ed295c7c6ded400739f5f05897c",
    "masks/brats_train_001_080.nii.gz":
        "034c25971086b3a122a0bab31a706b0bcc3e6059e0e96198675ad93d2d40907c",
    "masks/brats_train_001_081.nii.gz":
        "a4661621767ef2409eb7a4d8cabc17a9114dd17bc4c29dab2be6e969a403aee4",
    "masks/brats_train_001_082.nii.gz":
        "b8e7d5690a253c26892cd0c01a43abfe30e5ee94c7e55280bcaf188fe8a98bb8",
    "masks/brats_train_001_083.nii.gz":
        "f2b8a9aa1621f9022fdc000d66fc749703025b2a31ca91fd1ebab00efec63bc5",
    "masks/brats_train_001_084.nii.gz":
        "b0435a24d9bc1c43e7c14f1dcf7bf62397cafa247a52a2b09a562fc30e1ff841",
    "masks/brats_train_001_085.nii.gz":
        "fd84ae7ad10a4ad938a8a4a9a9eef15be1ee746c18f7a5650af56798a97e64c7",
    "uncertainty/brats_train_001_080_entropy.nii.gz":
        "6a10f4fd5b50a2b93d5f7f792da0197e05841cf52fc1f9dc488c1270ed70c32d",
    "uncertainty/brats_train_001_080_variance.nii.gz":
        "f968e158530f95b7a9e3181ac997c770eeee75879f9440c341a598db955f6d8f",
    "uncertainty/brats_train_001_081_entropy.nii.gz":
        "0f3f20bf45dc4bd57044464268c783d503050db4d9dd554092fcc257aaf14948",
    "uncertainty/brats_train_001_081_variance.nii.gz":
        "eafc80a66a87b9a09a36e50a4928fc76d320c135a87a75279cb68ff2ef986f9f",
    "uncertainty/brats_train_001_082_entropy.nii.gz":
        "b360b96badf1c1795a4a770882ac86a6905e7f9282f8dbfe6bf7add1de858759",
    "uncertainty/brats_train_001_082_variance.nii.gz":
        "55387d351ca9a80c3f71e21705e0c753efceb39bea6a3e02921a61ac2c2aaa9f",
    "uncertainty/brats_train_001_083_entropy.nii.gz":
        "315d30ab5c872f83509a08f9215a6d647b74d4876efcecab6d75b7a776ec0db9",
    "uncertainty/brats_train_001_083_variance.nii.gz":
        "95b4046047b95e880c3b8fd31a5222efc021f72c0136fcef95841fe3bc4ed4d2",
    "uncertainty/brats_train_001_084_entropy.nii.gz":
        "a7846daa51cdba67b01f9b36d62106483830e8b6c605b6bf1a3a5f7f62420a10",
    "uncertainty/brats_train_001_084_variance.nii.gz":
        "200764efc2e08015ecb4bca07b544bf6d9f447a8cfc7138ea497c38a8ebeabe4",
    "uncertainty/brats_train_001_085_entropy.nii.gz":
        "aa8d3dad49d63940198e10315fa63897150bfed474f803b6231d93df58b9c1b5",
    "uncertainty/brats_train_001_085_variance.nii.gz":
        "9747ee8776ae9c95d2eee3b25086c3086a2ac8dbd445d745ef25370a220e59b7",
    "metrics.csv":
        "d658c5d303498af2a19ed0703e640af3db097c95d644ea850d0a4e82fe00635b",
}

# A split of the fixture's six slices (one patient, so by case): two validate, four train.
VAL_DATA_FLAGS = ["--image_size", "32", "--resize_mode", "resize", "--split_by", "case", "--val_fraction", "0.34"]
VAL_NET_FLAGS = [*VAL_DATA_FLAGS, "--base_channels", "8", "--depth", "2", "--batch_size", "2", "--max_steps", "8",
                 "--lr", "3e-3", "--val_interval", "2", "--log_interval", "2", "--seed", "0", "--device", "cpu"]
VAL_TRAIN = {
    "preseg": ("train_preseg_network.py", VAL_NET_FLAGS),
    "denoiser": ("train_denoising_network.py", [*VAL_NET_FLAGS, *SCHEDULE_FLAGS, "--T", "25"]),
    "diffusion": ("train_addpm.py", [*VAL_DATA_FLAGS, "--num_channels", "16", "--num_res_blocks", "1",
                                     "--attention_resolutions", "16", *SCHEDULE_FLAGS, "--batch_size", "2",
                                     "--max_steps", "4", "--log_interval", "1", "--train_start", "preseg",
                                     "--val_interval", "2", "--val_sampling_steps", "3", "--pre_t", "40",
                                     "--seed", "0", "--device", "cpu", "--progress", "False"]),
}
VAL_SAMPLE_FLAGS = ["--sampler", "addpm", "--pre_t", "40", "--num_ensemble", "3", "--fusion", "vote",
                    "--save_preseg", "True", "--seed", "0", "--device", "cpu"]
# Columns and fields that change from run to run (times, the machine, where the files are).
TIMING_COLUMNS = ("samples_per_sec", "val_seconds")
SUMMARY_UNPINNED = ("seconds_per_image", "versions", "settings_digest")

# GOLDEN_VALIDATED

def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return env


def _run(repo: Path, script: str, args: list) -> None:
    proc = subprocess.run([sys.executable, script, *[str(a) for a in args]], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def weights_digest(path: Path) -> str:
    """SHA-256 over the checkpoint's weights and EMA weights: each tensor's name, dtype, shape and bytes."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {f"model.{k}": v for k, v in checkpoint["model"].items()}
    for rate, ema in sorted((checkpoint.get("ema") or {}).items()):
        state.update({f"ema{rate}.{k}": v for k, v in ema.items()})
    chunks = []
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        chunks += [name.encode(), str(tensor.dtype).encode(), str(tuple(tensor.shape)).encode(),
                   tensor.numpy().tobytes()]
    return _digest(chunks)


def array_digest(path: Path) -> str:
    array = np.ascontiguousarray(np.asarray(nib.load(str(path)).dataobj))
    return _digest([str(array.dtype).encode(), str(array.shape).encode(), array.tobytes()])


def metrics_digest(path: Path) -> str:
    """SHA-256 of metrics.csv's header and values (the columns the binary path wrote before)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return _digest([json.dumps(rows).encode()])


def run_pipeline(repo: Path, work: Path) -> dict:
    """Train the three networks and sample with the code in ``repo``; the digests of what they wrote."""
    work.mkdir(parents=True, exist_ok=True)
    for name, (script, flags) in TRAIN.items():
        _run(repo, script, ["--data_dir", BRATS2D_TRAINING, *flags, "--out_dir", work / name])
    out = work / "sample"
    _run(repo, "sample.py", ["--data_dir", BRATS2D_TRAINING, "--model_path", work / "diffusion" / "final.pt",
                             "--preseg_path", work / "preseg" / "final.pt",
                             "--denoiser_path", work / "denoiser" / "final.pt", *SAMPLE_FLAGS, "--out_dir", out])
    digests = {f"weights/{name}": weights_digest(work / name / "final.pt") for name in TRAIN}
    for path in sorted(out.glob("*/*.nii.gz")):
        if path.parent.name in ("masks", "uncertainty"):
            digests[str(path.relative_to(out))] = array_digest(path)
    digests["metrics.csv"] = metrics_digest(out / "metrics.csv")
    return digests


def progress_digest(path: Path) -> str:
    """SHA-256 of progress.csv's rows as name -> value, timing columns and empty cells left out."""
    with open(path, newline="") as handle:
        rows = [{k: v for k, v in row.items() if v != "" and k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    return _digest([json.dumps(rows, sort_keys=True).encode()])


def checkpoint_step(path: Path) -> str:
    return str(torch.load(path, map_location="cpu", weights_only=True)["step"])


def image_digest(path: Path) -> str:
    with Image.open(path) as image:
        return _digest([image.mode.encode(), str(image.size).encode(), image.tobytes()])


def summary_digests(path: Path) -> dict:
    """Each summary.json field as its JSON text, or that text's SHA-256 when long; the checkpoints keep
    only what is not a path or a file hash (the files hold paths and times)."""
    summary = json.loads(path.read_text())
    for entry in summary.get("checkpoints", {}).values():
        entry.pop("path", None)
        entry.pop("sha256", None)
    fields = {key: json.dumps(value, sort_keys=True) for key, value in summary.items() if key not in SUMMARY_UNPINNED}
    return {f"summary.json/{key}": text if len(text) <= 64 else _digest([text.encode()]) for key, text in fields.items()}


def run_validated_pipeline(repo: Path, work: Path) -> dict:
    """The second configuration: validation and best.pt in every trainer, then a vote ensemble from the best.pt."""
    work.mkdir(parents=True, exist_ok=True)
    best = {name: work / name / "best.pt" for name in VAL_TRAIN}
    extra = {"diffusion": ["--preseg_path", best["preseg"], "--denoiser_path", best["denoiser"]]}
    for name, (script, flags) in VAL_TRAIN.items():
        _run(repo, script, ["--data_dir", BRATS2D_TRAINING, *flags, *extra.get(name, []), "--out_dir", work / name])
    out = work / "sample"
    _run(repo, "sample.py", ["--data_dir", BRATS2D_TRAINING, "--model_path", best["diffusion"],
                             "--preseg_path", best["preseg"], "--denoiser_path", best["denoiser"],
                             *VAL_SAMPLE_FLAGS, "--out_dir", out])
    digests = {}
    for name in VAL_TRAIN:
        digests[f"progress/{name}"] = progress_digest(work / name / "progress.csv")
        for kind in ("best", "final"):
            digests[f"step/{name}/{kind}"] = checkpoint_step(work / name / f"{kind}.pt")
            digests[f"weights/{name}/{kind}"] = weights_digest(work / name / f"{kind}.pt")
    for path in sorted(out.glob("*/*.nii.gz")):
        if path.parent.name in ("masks", "uncertainty", "preseg"):
            digests[str(path.relative_to(out))] = array_digest(path)
    for path in sorted((out / "overlays").glob("*.png")):
        digests[str(path.relative_to(out))] = image_digest(path)
    digests["metrics.csv"] = metrics_digest(out / "metrics.csv")
    digests.update(summary_digests(out / "summary.json"))
    return digests


def _assert_golden(got: dict, golden: dict) -> None:
    assert sorted(got) == sorted(golden), f"missing {sorted(set(golden) - set(got))}, new {sorted(set(got) - set(golden))}"
    changed = [name for name in golden if got[name] != golden[name]]
    assert not changed, f"differ from the pre-multiclass results: {changed}"


@pytest.mark.skipif(not BRATS2D_TRAINING.is_dir(), reason=f"fixture folder {BRATS2D_TRAINING} is missing")
def test_binary_pipeline_is_bit_identical_to_the_pre_multiclass_code(tmp_path):
    _assert_golden(run_pipeline(REPO_ROOT, tmp_path), GOLDEN)


@pytest.mark.skipif(not BRATS2D_TRAINING.is_dir(), reason=f"fixture folder {BRATS2D_TRAINING} is missing")
def test_validated_binary_pipeline_is_bit_identical_to_the_pre_multiclass_code(tmp_path):
    _assert_golden(run_validated_pipeline(REPO_ROOT, tmp_path), GOLDEN_VALIDATED)


if __name__ == "__main__":
    repo, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    print(json.dumps({"GOLDEN": run_pipeline(repo, work / "plain"),
                      "GOLDEN_VALIDATED": run_validated_pipeline(repo, work / "validated")}, indent=1))
