"""The binary path gives bit-identical results to the code before multi-class segmentation existed.

A tiny fixed-seed pipeline on the BraTS fixture: the three trainers, then the ADDPM sampler with an
ensemble of two, run once with this code and once with the pre-multiclass code (commit
``REFERENCE_COMMIT``, taken from this repository's history with ``git archive``), in the same
environment. Their digests must be equal: of the weights (every state-dict tensor, not the
checkpoint files, which hold paths and times), of the written masks and uncertainty maps (their
voxel arrays), and of the values in metrics.csv. Both runs are made here rather than compared with
recorded digests because float kernels differ between CPUs: a digest recorded on one machine does
not hold on another, though both codes agree bit for bit on each.

The second configuration takes the paths that the first leaves out: a train/val split, so every
trainer validates and keeps best.pt (train_addpm.py with the in-training ADDPM validation and
--train_start preseg), then sample.py from the three best.pt with --fusion vote, --save_preseg
and overlays. It compares the progress.csv values (timing columns left out), the step and weights
of each best.pt and final.pt, summary.json (timing, paths, versions and the checkpoint file hashes
left out, field by field), the overlay pixels and the pre-segmentation files.

Slow (four pipeline runs); skipped where the checkout has no history (a shallow clone).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS2D_TRAINING = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini" / "training"
# The last commit before several classes existed: the binary path must give what it gave.
REFERENCE_COMMIT = "bf4277a"
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
        rows = [{k: v for k, v in row.items() if v != "" and k not in TIMING_COLUMNS}
                for row in csv.DictReader(handle)]
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
    return {f"summary.json/{key}": text if len(text) <= 64 else _digest([text.encode()])
            for key, text in fields.items()}


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


def _assert_same(got: dict, reference: dict) -> None:
    missing, new = sorted(set(reference) - set(got)), sorted(set(got) - set(reference))
    assert not missing and not new, f"missing {missing}, new {new}"
    changed = [name for name in reference if got[name] != reference[name]]
    assert not changed, f"differ from the pre-multiclass results: {changed}"


@pytest.fixture(scope="module")
def reference_repo(tmp_path_factory) -> Path:
    """The pre-multiclass code (``REFERENCE_COMMIT``), unpacked from this repository's history."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", REFERENCE_COMMIT],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {REFERENCE_COMMIT} is not in this checkout's history: "
                    f"{archive.stderr.decode(errors='replace').strip()}")
    target = tmp_path_factory.mktemp("reference")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The "data" filter (Python 3.11.4+) refuses links and paths out of the target.
        tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return target


needs_fixture = pytest.mark.skipif(not BRATS2D_TRAINING.is_dir(),
                                   reason=f"fixture folder {BRATS2D_TRAINING} is missing")


@pytest.mark.slow
@needs_fixture
def test_binary_pipeline_is_bit_identical_to_the_pre_multiclass_code(tmp_path, reference_repo):
    _assert_same(run_pipeline(REPO_ROOT, tmp_path / "now"), run_pipeline(reference_repo, tmp_path / "reference"))


@pytest.mark.slow
@needs_fixture
def test_validated_binary_pipeline_is_bit_identical_to_the_pre_multiclass_code(tmp_path, reference_repo):
    _assert_same(run_validated_pipeline(REPO_ROOT, tmp_path / "now"),
                 run_validated_pipeline(reference_repo, tmp_path / "reference"))
