"""The binary path gives bit-identical results to the code before multi-class segmentation existed.

A tiny fixed-seed pipeline on the BraTS fixture: the three trainers, then the ADDPM sampler with an
ensemble of two. The digests below are of the weights (every state-dict tensor, not the checkpoint
files, which hold paths and times), of the written masks and uncertainty maps (their voxel arrays),
and of the values in metrics.csv. They were produced by the pre-multiclass code (commit bf4277a)
running these same commands:

    python tests/test_binary_unchanged.py REPO WORK_DIR

prints them for the code in REPO.
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


@pytest.mark.skipif(not BRATS2D_TRAINING.is_dir(), reason=f"fixture folder {BRATS2D_TRAINING} is missing")
def test_binary_pipeline_is_bit_identical_to_the_pre_multiclass_code(tmp_path):
    got = run_pipeline(REPO_ROOT, tmp_path)
    assert sorted(got) == sorted(GOLDEN)
    changed = [name for name in GOLDEN if got[name] != GOLDEN[name]]
    assert not changed, f"differ from the pre-multiclass results: {changed}"


if __name__ == "__main__":
    print(json.dumps(run_pipeline(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()), indent=1))
