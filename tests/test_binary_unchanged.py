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
left out, field by field), the overlay pixels and the pre-segmentation files.
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

# Produced by the pre-multiclass code (bf4277a) with VAL_TRAIN and VAL_SAMPLE_FLAGS, by
#     git worktree add ../wt-golden bf4277a
#     OMP_NUM_THREADS=1 .venv/bin/python tests/test_binary_unchanged.py ../wt-golden WORK_DIR
# (this file, run against that tree; two runs gave the same values).
GOLDEN_VALIDATED = {
    "progress/preseg": "cc3681736d1205a88bf07abc15d80f2c0eefc6a6d5aa04fe7e781f89a918766a",
    "step/preseg/best": "6",
    "weights/preseg/best": "281a1caafcc30fd08a0af03953cb985364cce797a27c8117272584a6b2ae25d4",
    "step/preseg/final": "8",
    "weights/preseg/final": "08b8d3fb4cfa21ce18336315373c6dbf595825bf9118ba47af54d6f997dbc71c",
    "progress/denoiser": "1f46be7312e18cd5d09ffb5e66ff856541b39fd3091f3d033a0224f4d7407e5d",
    "step/denoiser/best": "8",
    "weights/denoiser/best": "cb93ceea5a1194128e1cb6c35037fdfa2fedd4fccfc7a76627d0214caa14320c",
    "step/denoiser/final": "8",
    "weights/denoiser/final": "cb93ceea5a1194128e1cb6c35037fdfa2fedd4fccfc7a76627d0214caa14320c",
    "progress/diffusion": "54923e3d751db19a663cde89387521d3b71910d108256611ea2574332e21c70d",
    "step/diffusion/best": "2",
    "weights/diffusion/best": "a9673c89bfd1c6656ecd455857dba8143b6effa362352c2115fe89019360c223",
    "step/diffusion/final": "4",
    "weights/diffusion/final": "0c57fd263eeaf6df977a6b645cdf8f67a5e07b1006fe346775e0f41901b01f04",
    "masks/brats_train_001_080.nii.gz": "1854d4b04fc27ff4a85f7100ecdffd162128466ed3cc73df72a8bc8e5fca252b",
    "masks/brats_train_001_081.nii.gz": "981eb855a6d7389d594e12de6704bf4e72bdb3dc3efc3673d4bc8f6deeb11d36",
    "masks/brats_train_001_082.nii.gz": "37fe480ac0be2a8d8330e4d8c38c838e3a7f1f06766ee2f371798fe932e53113",
    "masks/brats_train_001_083.nii.gz": "b93e56eb4c9fcd2de7370ed97709a278196133b9395a97559829ad95dca159f5",
    "masks/brats_train_001_084.nii.gz": "a9f877878797a62cb187ab77eabbc047688f3af1885cb7886e6668f2b940544f",
    "masks/brats_train_001_085.nii.gz": "0656bd5737125a4f713d2c88b6931a9f160dc60751b62109c03099006cadce1f",
    "preseg/brats_train_001_080.nii.gz": "11396afc642037ea1094e10f7e9637727c9e00e6d73b2062d540dea023a77544",
    "preseg/brats_train_001_081.nii.gz": "59d9c439b9b4e89c4e24cd4692c80c7eb43c738cee16851d48d406160c8b0f0b",
    "preseg/brats_train_001_082.nii.gz": "f8e83c74cd4dd09da34a978611ece2675ccb507095f9464372c45d513e6fc691",
    "preseg/brats_train_001_083.nii.gz": "0d8b2dc092b74b8095c4c4f47db2b50460cb6aa743729c46da7c1753c73617cd",
    "preseg/brats_train_001_084.nii.gz": "2fd2c3a02264c4e42436b603fb9e0a15efca720f3312f11fa912bf26a9acd6df",
    "preseg/brats_train_001_085.nii.gz": "5308a33726418d2503550b489f9022a281c1041055332a01ab02ebd14d4616f2",
    "uncertainty/brats_train_001_080_entropy.nii.gz":
        "280c700b410cda9aa4ed4b0cad87968f274bbf6d2f5cc5a393375c776283c1f1",
    "uncertainty/brats_train_001_080_variance.nii.gz":
        "67331e1b41943d33b98ec7fcd82dbcd55194d980b73176ed907c59cbe3806ee0",
    "uncertainty/brats_train_001_081_entropy.nii.gz":
        "e58449db9dd906982d703231618007717591e59670d18b030b2192d21d56d073",
    "uncertainty/brats_train_001_081_variance.nii.gz":
        "79e396685cab973e4ad20e1c9d101548ae9006b004cd8f489da27c2cbe3d28df",
    "uncertainty/brats_train_001_082_entropy.nii.gz":
        "5e7ffb2a832fcb506057398cab048720a0fe94decd4b915c73e1312010ff85f1",
    "uncertainty/brats_train_001_082_variance.nii.gz":
        "1ad53c4130fe9b583b4ac9d3a486e27cec88ab978b2b41ee8f85a02d8cbe9567",
    "uncertainty/brats_train_001_083_entropy.nii.gz":
        "0ce239105783fc2cea5a9fe5b634a957708eacb1f71116d5e68d20f4babdd445",
    "uncertainty/brats_train_001_083_variance.nii.gz":
        "bb88970ccf5d68885902e835289fe69b18a621b69b96614a34fe3ec6f0273ae7",
    "uncertainty/brats_train_001_084_entropy.nii.gz":
        "cb89d82b7bbd06098b49eb24460f7a5a2d06b52c1124e85370d814ced58f846e",
    "uncertainty/brats_train_001_084_variance.nii.gz":
        "405205ea2d7ee8ebe0d75f76158760a7d1b3330df4e873b3eff0b31e297e51e2",
    "uncertainty/brats_train_001_085_entropy.nii.gz":
        "65ab6263de58c3272fdd4d8ac5c1d5ffbb99d8940a6bbfc6c5b29deeac79c587",
    "uncertainty/brats_train_001_085_variance.nii.gz":
        "972aec1fa6e6b3c36d0d79283fdfd7057a075da9a1b33ede43030c2767dee5c1",
    "overlays/brats_train_001_080.png": "b922dae6644a3fc999ff244cd0a6edfdaf89edc3e5bf660c769717fda52cd6cb",
    "overlays/brats_train_001_081.png": "f810cf997610c689e39e74105a0a0b1bbeab38daaa1a99cb0375fd950d05c7bc",
    "overlays/brats_train_001_082.png": "1e0c9ab072df4c353054e9bc8c4b2f481743b523d83fa9dcf89423c6619ea3b5",
    "overlays/brats_train_001_083.png": "ac687b89945f808d1c2ad2891c607760a698395b25dc2adeda057bfcd6f55533",
    "overlays/brats_train_001_084.png": "33d9f2b6854bdd842da32fb081a9b6225b69997d0e5fc9998ca565afe0fab3cb",
    "overlays/brats_train_001_085.png": "ff56b2b6fe552c39b3d8a28779dd909a80eb563172c59a689850af8892b3c974",
    "metrics.csv": "c6b3180f616959ccb34499e93d7633e96042911097dc7b5469f10ff99228aedb",
    "summary.json/n_cases": "6",
    "summary.json/conventions": "03a1e7a7e8aa668d89fdb6abf5ccfb9ca53587f2e63c281409015119387ffc63",
    "summary.json/kinds": "833ddaa3d818b44f5d2a8bfc32e0bd0fdbf9fdd7b5bbc1f42d95488cdbc07f1e",
    "summary.json/headline": "159708eb904d073a83b7f737dc147d314b451ab7050bc9727af3d6970156d62a",
    "summary.json/n_cases_written": "6",
    "summary.json/n_unlabelled": "0",
    "summary.json/n_cases_selected": "6",
    "summary.json/sampler": '"addpm"',
    "summary.json/timesteps": "[40, 25]",
    "summary.json/reverse_steps": "15",
    "summary.json/step_method": '"ddpm"',
    "summary.json/final_step": '"denoiser"',
    "summary.json/pre_t": "40",
    "summary.json/T": "25",
    "summary.json/num_ensemble": "3",
    "summary.json/fusion": '"vote"',
    "summary.json/mask_space": '"pm1"',
    "summary.json/unet_evaluations_per_image": "45",
    "summary.json/unet_evaluations_per_member": "15",
    "summary.json/device": '"cpu"',
    "summary.json/world_size": "1",
    "summary.json/precision": '"fp32"',
    "summary.json/seed": "0",
    "summary.json/en_num": "0",
    "summary.json/checkpoints": "87604e8f41d9e9130fc0629ffd25aaeb6b546452abd0f219e90303f01de1c0d3",
    "summary.json/preprocess": "9030ce2333e3caaa1c4745d28762daac87fa2004518281ed4acc1e6caf040e96",
    "summary.json/results": "33775562f3b16da4c1030e17fa337494ff8a5aa2a3fa409256654c826e5df5ab",
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


def _assert_golden(got: dict, golden: dict) -> None:
    missing, new = sorted(set(golden) - set(got)), sorted(set(got) - set(golden))
    assert not missing and not new, f"missing {missing}, new {new}"
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
