"""The supervised engine and train_preseg_network.py: learning, checkpoints, resume, the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from data import DataError, Preprocess, create_dataset
from guided_diffusion.checkpoint import load_checkpoint
from data.precomputed import read_precomputed_preseg
from preseg import load_preseg
from preseg.io import build_network_from_config, network_config
from supervised import TrainOptions, seed_everything, train

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS2D_MINI = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini"
SIZE = 32
TINY_NET = {"base_channels": 8, "depth": 3, "dropout": 0.0, "arch_kwargs": ""}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, "-m", "data.demo", "--out", str(out), "--n_train", "16", "--n_test", "4",
         "--image_size", str(SIZE)],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    return out / "training"


@pytest.fixture(scope="module")
def eight_slices(demo_dir):
    dataset = create_dataset(str(demo_dir), preprocess=Preprocess(image_size=SIZE), require_labels=True)
    # Slices with some foreground, so that the Dice measures the segmentation.
    chosen = [i for i in range(len(dataset)) if dataset[i]["label"].any()][:8]
    assert len(chosen) == 8
    return dataset, Subset(dataset, chosen)


def image_and_label(batch, generator):
    return batch["image"], batch["label"]


def build(arch, in_channels, seed=0):
    config = network_config({"arch": arch, **TINY_NET}, in_channels=in_channels)
    seed_everything(seed)
    return build_network_from_config(config), config


def options(out_dir, **overrides):
    values = dict(device="cpu", batch_size=4, max_steps=4, max_epoch=0, lr=3e-3, log_interval=100,
                  save_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    return TrainOptions(**values)


@pytest.mark.parametrize("arch", ["unet", pytest.param("attention_unet", marks=pytest.mark.slow)])
def test_overfits_eight_slices(arch, eight_slices, tmp_path):
    full, subset = eight_slices
    model, config = build(arch, full.num_channels)
    result = train(kind="preseg", model=model, config=config, train_set=subset, val_set=subset,
                   batch_to_input_target=image_and_label,
                   options=options(tmp_path, batch_size=8, max_steps=100, lr=1e-2, val_interval=50))
    assert result.best_val_dice > 0.9, result
    best = load_checkpoint(tmp_path / "best.pt", kind="preseg")
    assert best["extra"]["val_dice"] == pytest.approx(result.best_val_dice)
    assert (tmp_path / "final.pt").is_file() and (tmp_path / "progress.csv").is_file()


def test_checkpoint_round_trip(eight_slices, tmp_path):
    full, subset = eight_slices
    model, config = build("unet", full.num_channels)
    config = {**config, "preprocess": full.preprocess.to_dict()}
    train(kind="preseg", model=model, config=config, train_set=subset, val_set=subset,
          batch_to_input_target=image_and_label, options=options(tmp_path, max_steps=2))
    loaded, loaded_config = load_preseg(tmp_path / "final.pt", "cpu")
    assert not loaded.training and loaded_config == config
    x = torch.stack([subset[i]["image"] for i in range(4)])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_resume_is_bit_identical(eight_slices, tmp_path):
    full, subset = eight_slices

    def run(out_dir, **overrides):
        model, config = build("unet", full.num_channels, seed=1)
        return train(kind="preseg", model=model, config=config, train_set=subset, val_set=subset,
                     batch_to_input_target=image_and_label,
                     options=options(out_dir, batch_size=2, max_steps=4, **overrides))

    # One run of 4 steps (one epoch of 8 slices) that saves at step 2, inside the epoch; a
    # second run resumes from that file (found by --resume auto).
    run(tmp_path / "straight", save_interval=2, keep_checkpoints=0)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "preseg_0000002.pt", resumed_dir)
    result = run(resumed_dir, resume="auto")
    assert result.step == 4
    a = load_checkpoint(tmp_path / "straight" / "final.pt")
    b = load_checkpoint(resumed_dir / "final.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["extra"]["best_val_dice"] == b["extra"]["best_val_dice"]
    assert a["extra"]["epoch"] == b["extra"]["epoch"]


def run_script(*args, env=None):
    return subprocess.run([sys.executable, "train_preseg_network.py", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)


FIXTURE_FLAGS = ["--image_size", SIZE, "--base_channels", 8, "--depth", 3, "--batch_size", 2,
                 "--device", "cpu", "--split_by", "case", "--val_fraction", 0.34]


@pytest.mark.slow
def test_command_line_on_brats_fixture(tmp_path):
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    out = tmp_path / "run"
    proc = run_script("--data_dir", BRATS2D_MINI / "training", *FIXTURE_FLAGS, "--max_steps", 2,
                      "--lr", 0.001, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, config = load_preseg(out / "final.pt")
    assert config["arch"] == "unet" and config["in_channels"] == 4 and config["num_classes"] == 2
    assert config["preprocess"]["image_size"] == SIZE and config["args"]["lr"] == 0.001
    assert (out / "best.pt").is_file()
    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("loss", "ce", "dice_loss", "lr", "samples_per_sec", "val_dice"):
        assert key in header
    # The run report: a header before the first step, a closing line at the end (also in log.txt).
    lines = proc.stdout.splitlines()
    start = lines.index("preseg training")
    fields = dict(line.split(None, 1) for line in lines[start + 1 : start + 7])
    assert fields["device"] == "cpu, fp32, 1 process"
    assert fields["data"] == f"{BRATS2D_MINI / 'training'}: 4 training items (brats2d)"
    assert fields["validation"] == "2 items, Dice every epoch"
    assert fields["steps"].startswith("2 (2 per epoch), batch 2 x 1 process")
    assert fields["out_dir"].startswith(f"{out}: preseg_<step>.pt every 1000 steps, best.pt, final.pt")
    closing = lines[-1]
    assert closing.startswith("preseg training done in ") and ": step 2; loss " in closing
    assert f"; checkpoint {out / 'final.pt'}; best {out / 'best.pt'}; logs and curves.png in {out}" in closing
    assert closing in (out / "log.txt").read_text()
    # Starting again over the same folder without --resume is refused; --resume auto goes on.
    again = run_script("--data_dir", BRATS2D_MINI / "training", *FIXTURE_FLAGS, "--max_steps", 3,
                       "--out_dir", out)
    assert again.returncode == 2 and "--resume auto" in again.stderr
    resumed = run_script("--data_dir", BRATS2D_MINI / "training", *FIXTURE_FLAGS, "--max_steps", 3,
                         "--out_dir", out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(out / "final.pt")["step"] == 3


BAD_NET = """
import torch.nn as nn

class Halves(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch, expected", [
    ("vnet", "--arch"),
    ("no_such_module_xyz:Net", "no_such_module_xyz"),
    ("badnet:Halves", "badnet:Halves"),
])
def test_bad_arch_is_one_error_line(arch, expected, tmp_path):
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    (tmp_path / "badnet.py").write_text(BAD_NET)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = run_script("--data_dir", BRATS2D_MINI / "training", *FIXTURE_FLAGS, "--max_steps", 1,
                      "--arch", arch, "--out_dir", tmp_path / "run", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr
    assert not (tmp_path / "run" / "final.pt").exists()


def test_precomputed_preseg_folder(tmp_path):
    meta_png = {"format": "image", "original_shape": [5, 7]}
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "case1.png")
    probs = read_precomputed_preseg(str(tmp_path), "case1", meta_png)
    assert probs.dtype == np.float32 and probs.shape == (5, 7)
    assert np.array_equal(probs, (mask > 0).astype(np.float32))
    Image.fromarray((np.arange(35).reshape(5, 7) * 1000).astype(np.uint16)).save(tmp_path / "case2.png")
    assert read_precomputed_preseg(str(tmp_path), "case2", meta_png).max() == pytest.approx(34000 / 65535)

    import nibabel as nib

    prob = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    nib.save(nib.Nifti1Image(prob[..., None], np.eye(4)), str(tmp_path / "case3.nii.gz"))
    meta_nii = {"format": "nifti_slice", "original_shape": [5, 7]}
    assert np.allclose(read_precomputed_preseg(str(tmp_path), "case3", meta_nii), prob)

    with pytest.raises(DataError, match="case4"):
        read_precomputed_preseg(str(tmp_path), "case4", meta_nii)
    with pytest.raises(DataError, match=r"\(5, 7\).*\(6, 7\)"):
        read_precomputed_preseg(str(tmp_path), "case1", {"format": "image", "original_shape": [6, 7]})
