"""The three trainers with several mask channels: BraTS classes (--classes 2,4) and overlapping
regions (--regions WT/TC/ET), end to end from the command line on the BraTS fixture (CPU)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data import Preprocess, collate, create_dataset
from denoiser import load_final_step
from guided_diffusion.checkpoint import load_checkpoint, save_checkpoint
from guided_diffusion.errors import CheckpointError
from guided_diffusion.script_util import model_and_diffusion_from_config
from preseg import PresegSource, RegionLoss, SegmentationLoss, load_preseg, make_loss
from preseg.io import build_network_from_config
from preseg.losses import class_index_map
from supervised import mask_dice

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini" / "training"
SIZE = 32
REGIONS = "WT:1,2,4;TC:1,4;ET:4"
# Each mode: its flags, K, the nets' outputs and the names of the channels.
MODES = {
    "multiclass": (["--classes", "2,4"], 2, 3, ("class2", "class4")),
    "regions": (["--regions", REGIONS], 3, 3, ("WT", "TC", "ET")),
}
# Two of the six slices (one patient per slice: --split_by case) are validated.
DATA = ["--data_dir", TRAINING, "--image_size", SIZE, "--device", "cpu", "--split_by", "case",
        "--val_fraction", 0.34, "--batch_size", 2, "--max_steps", 2]
NET = ["--base_channels", 8, "--depth", 2, "--log_interval", 1]
SCHEDULE = ["--diffusion_steps", 20, "--noise_schedule", "cosine"]
UNET = ["--num_channels", 8, "--num_res_blocks", 1, "--attention_resolutions", "", "--progress", "False"]

pytestmark = pytest.mark.skipif(not TRAINING.is_dir(), reason=f"fixture folder {TRAINING} is missing")


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def last_row(path):
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val_dice") or row.get("val_score")]
    assert rows, f"{path} has no validation row"
    return rows[-1]


@pytest.fixture(scope="module", params=sorted(MODES))
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def trained(mode, tmp_path_factory):
    """The pre-segmentation and the denoising nets of ``mode`` (2 steps each)."""
    flags = MODES[mode][0]
    root = tmp_path_factory.mktemp(f"nets_{mode}")
    ok(run("train_preseg_network.py", *DATA, *NET, *flags, "--out_dir", root / "preseg"))
    ok(run("train_denoising_network.py", *DATA, *NET, *SCHEDULE, "--T", 5, "--denoiser_cond", "image",
           *flags, "--out_dir", root / "denoiser"))
    return root


def fixture_batch(preprocess, count=2):
    dataset = create_dataset(str(TRAINING), preprocess=preprocess, require_labels=True)
    return collate([dataset[i] for i in range(count)])


def test_preseg_net_outputs_channels_and_logs_dice_per_channel(mode, trained):
    _, k, outputs, names = MODES[mode]
    net, config = load_preseg(trained / "preseg" / "best.pt")
    preprocess = Preprocess.from_dict(config["preprocess"])
    assert config["num_classes"] == outputs and preprocess.num_mask_channels == k
    assert preprocess.class_names == names and preprocess.label_mode == mode
    batch = fixture_batch(preprocess)
    assert batch["label"].shape == (2, k, SIZE, SIZE)
    with torch.no_grad():
        assert net(batch["image"]).shape == (2, outputs, SIZE, SIZE)
        probs = PresegSource(net=net, preprocess=preprocess)(batch)
    assert probs.shape == (2, k, SIZE, SIZE)
    if preprocess.exclusive:
        assert (probs.sum(1) <= 1 + 1e-6).all()
    row = last_row(trained / "preseg" / "progress.csv")
    per_channel = [float(row[f"val_dice_{name}"]) for name in names]
    assert float(row["val_dice"]) == pytest.approx(sum(per_channel) / k)
    best = load_checkpoint(trained / "preseg" / "best.pt", kind="preseg")
    assert best["extra"]["best_val_dice"] == pytest.approx(
        sum(best["extra"]["val_dice_by_channel"].values()) / k)
    assert list(best["extra"]["val_dice_by_channel"]) == list(names)
    loss_column = "ce" if preprocess.exclusive else "bce"
    with open(trained / "preseg" / "progress.csv", newline="") as f:
        assert loss_column in next(csv.reader(f))


def test_denoiser_takes_k_noisy_channels_and_returns_k_probabilities(mode, trained):
    _, k, outputs, names = MODES[mode]
    ckpt = load_checkpoint(trained / "denoiser" / "final.pt", kind="denoiser")
    config = ckpt["config"]
    assert config["num_classes"] == outputs and config["in_channels"] == config["image_channels"] + k
    preprocess = Preprocess.from_dict(config["preprocess"])
    schedule = {"noise_schedule": "cosine", "diffusion_steps": 20, "mask_space": "pm1"}
    denoise, T = load_final_step(trained / "denoiser" / "final.pt", preprocess=preprocess, schedule=schedule)
    batch = fixture_batch(preprocess)
    with torch.no_grad():
        probs = denoise(torch.randn(2, k, SIZE, SIZE), batch["image"])
    assert T == 5 and probs.shape == (2, k, SIZE, SIZE)
    assert all(f"val_dice_{name}" in last_row(trained / "denoiser" / "progress.csv") for name in names)


def test_diffusion_unet_has_k_mask_channels_and_validates_per_channel(mode, trained, tmp_path):
    flags, k, _, names = MODES[mode]
    out = tmp_path / "addpm"
    ok(run("train_addpm.py", *DATA, *UNET, *SCHEDULE, *flags, "--learn_sigma", "True",
           "--train_start", "preseg", "--preseg_path", trained / "preseg" / "best.pt",
           "--denoiser_path", trained / "denoiser" / "best.pt", "--val_interval", 2, "--pre_t", 8,
           "--val_sampling_steps", 2, "--out_dir", out))
    ckpt = load_checkpoint(out / "final.pt", kind="diffusion")
    assert ckpt["config"]["mask_channels"] == k
    model, _ = model_and_diffusion_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    image_channels = ckpt["config"]["image_channels"]
    assert model.in_channels == image_channels + k and model.out_channels == 2 * k  # learn_sigma
    row = last_row(out / "progress.csv")
    for name in names:
        assert f"val_addpm_dice_{name}" in row and f"val_preseg_dice_{name}" in row
    assert "train_preseg_dice" in row and (out / "best.pt").is_file()


def test_diffusion_refuses_a_preseg_net_of_another_label_mode(mode, trained, tmp_path):
    other = next(m for m in MODES if m != mode)
    proc = run("train_addpm.py", *DATA, *UNET, *SCHEDULE, *MODES[other][0], "--train_start", "preseg",
               "--preseg_path", trained / "preseg" / "best.pt", "--out_dir", tmp_path / "addpm")
    assert proc.returncode != 0
    assert "label_mode" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "addpm" / "final.pt").exists()


def test_a_value_the_classes_do_not_cover_is_one_clear_error(tmp_path):
    proc = run("train_preseg_network.py", *DATA, *NET, "--classes", "2", "--out_dir", tmp_path / "run")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "_seg_" in errors[0] and "label value 4" in errors[0] and "--classes" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("*.pt"))


def test_losses_by_label_mode():
    assert isinstance(make_loss(Preprocess(image_size=8)), SegmentationLoss)
    assert isinstance(make_loss(Preprocess(image_size=8, label_mode="multiclass", classes=(1, 2))),
                      SegmentationLoss)
    assert isinstance(make_loss(Preprocess(image_size=8, label_mode="regions", regions=REGIONS)), RegionLoss)
    index = torch.randint(0, 3, (2, 6, 5))
    channels = F.one_hot(index, 3).permute(0, 3, 1, 2)[:, 1:]
    assert torch.equal(class_index_map(channels), index)
    logits = torch.randn(2, 3, 6, 5)
    # The one-hot label channels give the same loss as their index map.
    loss = SegmentationLoss()
    assert loss(logits, channels).item() == pytest.approx(loss(logits, index).item())
    regions = torch.randint(0, 2, (2, 3, 6, 5))
    perfect = RegionLoss()(30.0 * (2 * regions.float() - 1), regions)
    assert perfect.item() < 1e-5 and RegionLoss()(logits, regions).item() > 0.5
    terms = RegionLoss().components(logits, regions)
    assert set(terms) == {"bce", "dice_loss"}
    with pytest.raises(ValueError):
        SegmentationLoss()(torch.randn(2, 4, 6, 5), channels)


def test_mask_dice_per_class_and_region():
    index = torch.zeros(1, 4, 4, dtype=torch.long)
    index[0, :2] = 1
    index[0, 2:, :2] = 2
    channels = F.one_hot(index, 3).permute(0, 3, 1, 2)[:, 1:]
    logits = 10.0 * F.one_hot(index, 3).permute(0, 3, 1, 2).float()
    logits[0, :, 3, 0] = torch.tensor([0.0, 10.0, 0.0])  # one class-2 pixel called class 1
    dice = mask_dice(logits, channels, exclusive=True)
    assert dice[0].tolist() == pytest.approx([2 * 8 / 17, 2 * 3 / 7])
    region_logits = 10.0 * (2 * channels.float() - 1)
    assert mask_dice(region_logits, channels, exclusive=False)[0].tolist() == [1.0, 1.0]


def test_old_configs_load_as_one_channel(tmp_path):
    config = {"image_size": 16, "image_channels": 2, "preprocess": {},
              "model": {"num_channels": 8, "num_res_blocks": 1, "attention_resolutions": "",
                        "learn_sigma": False}, "diffusion": {"diffusion_steps": 10}}
    model, _ = model_and_diffusion_from_config(config)  # written before mask_channels existed
    assert model.in_channels == 3 and model.out_channels == 1
    # A supervised net whose outputs do not fit its recorded label mode is refused at load.
    net_config = {"arch": "unet", "arch_kwargs": {}, "base_channels": 8, "depth": 1, "dropout": 0.0,
                  "in_channels": 1, "num_classes": 2,
                  "preprocess": Preprocess(image_size=8, label_mode="regions", regions=REGIONS).to_dict()}
    path = tmp_path / "preseg.pt"
    save_checkpoint(path, kind="preseg", model_state=build_network_from_config(net_config).state_dict(),
                    config=net_config, step=0)
    with pytest.raises(CheckpointError, match="3"):
        load_preseg(path)
