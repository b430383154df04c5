"""The one-step denoising net: it learns, refuses a mismatched T, resumes, and its CLI runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from data import Preprocess, create_dataset
from denoiser import NoisyMaskBatch, check_denoiser_matches, denoiser_input, load_denoiser
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.errors import ConfigError
from guided_diffusion.mask_space import to_probability
from preseg.io import build_network_from_config, network_config
from supervised import TrainOptions, evaluate_dice, seed_everything, train

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS2D_MINI = REPO_ROOT.parent / "shared" / "fixtures" / "brats2d_mini"
SIZE = 32
TINY_NET = {"arch": "unet", "base_channels": 8, "depth": 3, "dropout": 0.0, "arch_kwargs": ""}
# The original ADDPM setting: T = 250 of 1000 cosine steps (abar_T ~ 0.8). Thresholding x_T
# there leaves enough flipped pixels around the small demo tumours (and on empty slices) to
# score a validation Dice of about 0.4.
SCHEDULE = {"T": 250, "diffusion_steps": 1000, "noise_schedule": "cosine", "mask_space": "pm1",
            "denoiser_cond": "none"}


@pytest.fixture(scope="module")
def demo_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, "-m", "data.demo", "--out", str(out), "--n_train", "16", "--n_test", "4",
         "--image_size", str(SIZE)],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    common = dict(preprocess=Preprocess(image_size=SIZE), val_fraction=0.25, require_labels=True)
    train_set = create_dataset(str(out / "training"), subset="train", **common)
    val_set = create_dataset(str(out / "training"), subset="val", **common)
    return train_set, val_set


def build(schedule, image_channels, seed=0):
    in_channels = 1 + (image_channels if schedule["denoiser_cond"] == "image" else 0)
    config = network_config(TINY_NET, in_channels=in_channels)
    config.update(schedule, image_channels=image_channels)
    seed_everything(seed)
    return build_network_from_config(config), config


def options(out_dir, **overrides):
    values = dict(device="cpu", batch_size=4, max_steps=4, max_epoch=0, lr=3e-3, log_interval=100,
                  save_interval=0, out_dir=str(out_dir))
    values.update(overrides)
    return TrainOptions(**values)


class ThresholdNoisyInput(nn.Module):
    """The baseline as a 'network': logits whose argmax is to_probability(x_T) > 0.5."""

    def forward(self, x_T):
        prob = to_probability(x_T, SCHEDULE["mask_space"])
        return torch.cat([1.0 - prob, prob], dim=1)


def test_denoiser_beats_thresholding_the_noisy_mask(demo_split, tmp_path):
    train_set, val_set = demo_split
    model, config = build(SCHEDULE, train_set.num_channels)
    batch_fn = NoisyMaskBatch(**SCHEDULE)
    result = train(kind="denoiser", model=model, config=config, train_set=train_set,
                   val_set=val_set, batch_to_input_target=batch_fn,
                   options=options(tmp_path, batch_size=8, max_steps=60, lr=1e-2, val_interval=20))
    # The same held-out masks and the same fixed-seed noise at level T as the engine's validation.
    baseline = evaluate_dice(ThresholdNoisyInput(), val_set, batch_fn, batch_size=8, device="cpu")
    assert baseline < 0.6, baseline
    assert result.val_dice > baseline + 0.25, (result.val_dice, baseline)
    trained, _ = load_denoiser(tmp_path / "final.pt")
    assert evaluate_dice(trained, val_set, batch_fn, batch_size=8, device="cpu") == pytest.approx(result.val_dice)


def test_denoiser_input_layouts():
    x_T, image = torch.randn(2, 1, 8, 8), torch.randn(2, 4, 8, 8)
    assert denoiser_input(x_T, None, "none") is x_T
    both = denoiser_input(x_T, image, "image")
    assert both.shape == (2, 5, 8, 8) and torch.equal(both[:, :4], image) and torch.equal(both[:, 4:], x_T)
    with pytest.raises(ConfigError, match="--denoiser_cond"):
        denoiser_input(x_T, image, "mask")


def test_checkpoint_trained_at_250_is_refused_at_200(demo_split, tmp_path):
    train_set, val_set = demo_split
    schedule = {**SCHEDULE, "denoiser_cond": "image"}
    model, config = build(schedule, train_set.num_channels)
    train(kind="denoiser", model=model, config=config, train_set=train_set, val_set=val_set,
          batch_to_input_target=NoisyMaskBatch(**schedule), options=options(tmp_path, max_steps=1))
    path = tmp_path / "final.pt"
    loaded, loaded_config = load_denoiser(path)
    assert loaded_config["T"] == 250 and loaded_config["in_channels"] == 1 + train_set.num_channels
    check_denoiser_matches(loaded_config, T=250, noise_schedule="cosine", diffusion_steps=1000,
                           mask_space="pm1", source=str(path))
    with pytest.raises(ConfigError) as caught:
        check_denoiser_matches(loaded_config, T=200, noise_schedule="cosine", diffusion_steps=1000,
                               mask_space="pm1", source=str(path))
    message = str(caught.value)
    assert "\n" not in message and "--T 200" in message and "T=250" in message and str(path) in message
    with pytest.raises(ConfigError, match="noise_schedule linear.*noise_schedule=cosine"):
        check_denoiser_matches(loaded_config, T=250, noise_schedule="linear", source=str(path))


def test_resume_is_bit_identical(demo_split, tmp_path):
    train_set, val_set = demo_split

    def run(out_dir, **overrides):
        model, config = build(SCHEDULE, train_set.num_channels, seed=1)
        return train(kind="denoiser", model=model, config=config, train_set=train_set,
                     val_set=val_set, batch_to_input_target=NoisyMaskBatch(**SCHEDULE),
                     options=options(out_dir, batch_size=3, max_steps=4, **overrides))

    # 12 training items in batches of 3: the save at step 2 falls inside the first epoch.
    run(tmp_path / "straight", save_interval=2, keep_checkpoints=0)
    result = run(tmp_path / "resumed", resume_checkpoint=str(tmp_path / "straight" / "denoiser_0000002.pt"))
    assert result.step == 4
    a = load_checkpoint(tmp_path / "straight" / "final.pt")
    b = load_checkpoint(tmp_path / "resumed" / "final.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["extra"]["val_dice"] == b["extra"]["val_dice"]
    # The noise generator was restored: the next draws agree too.
    ga, gb = torch.Generator(), torch.Generator()
    ga.set_state(a["extra"]["rng"][0]["generator"])
    gb.set_state(b["extra"]["rng"][0]["generator"])
    assert torch.equal(torch.randn(4, generator=ga), torch.randn(4, generator=gb))


@pytest.mark.slow
def test_command_line_on_brats_fixture(tmp_path):
    if not BRATS2D_MINI.is_dir():
        pytest.skip(f"fixture folder {BRATS2D_MINI} is missing (../shared beside the repo)")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train_denoising_network.py", "--data_dir", str(BRATS2D_MINI / "training"),
         "--batch_size", "2", "--lr", "0.001", "--T", "250", "--image_size", str(SIZE),
         "--base_channels", "8", "--depth", "3", "--max_steps", "2", "--device", "cpu",
         "--split_by", "case", "--val_fraction", "0.34", "--out_dir", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, config = load_denoiser(out / "final.pt")
    assert (config["T"], config["diffusion_steps"], config["noise_schedule"], config["mask_space"],
            config["denoiser_cond"]) == (250, 1000, "cosine", "pm1", "none")
    assert config["in_channels"] == 1 and config["image_channels"] == 4
    assert (out / "best.pt").is_file() and "val_dice" in (out / "progress.csv").read_text()
    assert "denoiser training\n  network     unet, " in proc.stdout
    closing = proc.stdout.splitlines()[-1]
    assert closing.startswith("denoiser training done in ") and "; validation Dice " in closing
    assert closing.endswith(f"; checkpoint {out / 'final.pt'}; best {out / 'best.pt'}; logs and curves.png in {out}")
    with torch.no_grad():
        assert model(torch.zeros(1, 1, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)

    bad = subprocess.run(
        [sys.executable, "train_denoising_network.py", "--data_dir", str(BRATS2D_MINI / "training"),
         "--T", "1000", "--out_dir", str(tmp_path / "bad")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --T 1000")
    assert len(bad.stderr.strip().splitlines()) == 1
