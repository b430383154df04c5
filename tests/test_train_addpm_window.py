"""train_addpm.py where ADDPM samples: the level window, pre-segmentation-aware noising and
validation while training (CPU, tiny configs, the real scripts and real checkpoints)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import sample
from data import collate, dataset_from_args
from evaluation.validation import AddpmValidator
from guided_diffusion import dist_util
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.mask_space import to_diffusion_space
from guided_diffusion.script_util import create_gaussian_diffusion, create_model, run_cli
from guided_diffusion.train_util import TrainLoop
from preseg import PresegSource
from tests.test_train_addpm import assert_state_equal

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--image_size", "32", "--resize_mode", "resize", "--device", "cpu"]
CHAIN = ["--diffusion_steps", "100", "--noise_schedule", "cosine"]
TINY = [*SIZE, *CHAIN, "--num_channels", "16", "--num_res_blocks", "1", "--attention_resolutions", "16",
        "--rescale_timesteps", "False", "--batch_size", "4", "--progress", "False"]
WINDOW = ["--t_range", "25,30", "--t_range_mix", "0.25"]
NET = [*SIZE, "--base_channels", "8", "--depth", "2", "--batch_size", "4", "--max_steps", "3",
       "--max_epoch", "0", "--save_interval", "0"]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return env


def run_script(script, *args, torchrun=False) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, script, *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data: 4 patients of 4 slices, and a test split."""
    root = tmp_path_factory.mktemp("window")
    subprocess.run([sys.executable, "-m", "data.demo", "--out", str(root / "demo"), "--n_train", "16",
                    "--n_test", "2", "--image_size", "32", "--seed", "0"],
                   cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=120)
    return {"root": root, "train": root / "demo" / "training", "test": root / "demo" / "testing"}


@pytest.fixture(scope="module")
def nets(demo):
    """The demo data and a pre-segmentation and denoising net trained on it."""
    root, train = demo["root"], demo["train"]
    procs = {
        "preseg": subprocess.Popen(
            [sys.executable, "train_preseg_network.py", "--data_dir", str(train), *NET,
             "--out_dir", str(root / "preseg")], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True),
        "denoiser": subprocess.Popen(
            [sys.executable, "train_denoising_network.py", "--data_dir", str(train), *NET, *CHAIN,
             "--T", "25", "--out_dir", str(root / "denoiser")], cwd=REPO_ROOT, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}\n{err[-3000:]}"
    return {"train": train, "test": demo["test"],
            "preseg": root / "preseg" / "final.pt", "denoiser": root / "denoiser" / "final.pt"}


@pytest.mark.slow
def test_window_and_preseg_start_resume_bit_identically(nets, tmp_path):
    flags = ["--data_dir", nets["train"], *TINY, *WINDOW, "--train_start", "preseg",
             "--preseg_path", nets["preseg"], "--preseg_fraction", "0.5", "--predict_xstart", "True",
             "--microbatch", "1", "--schedule_sampler", "loss-second-moment", "--ema_rate", "0.99",
             "--save_interval", "1", "--seed", "5", "--val_fraction", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_script("train_addpm.py", *flags, "--max_steps", "4", "--out_dir", straight))
    ok(run_script("train_addpm.py", *flags, "--max_steps", "2", "--out_dir", resumed))
    proc = ok(run_script("train_addpm.py", *flags, "--max_steps", "4", "--out_dir", resumed, "--resume", "auto"))
    assert "at step 2" in proc.stdout
    assert "training on levels 25..30 (0.25 of every batch on the whole chain)" in proc.stdout
    assert "0.5 of every batch from the pre-segmentation" in proc.stdout

    a = load_checkpoint(straight / "final.pt", kind="diffusion")
    b = load_checkpoint(resumed / "final.pt", kind="diffusion")
    for key in ("model", "ema", "optimizer", "extra"):
        assert_state_equal(a[key], b[key], key)
    assert a["config"]["training"] == {"t_range": [25, 30], "t_range_mix": 0.25, "train_start": "preseg",
                                       "preseg_fraction": 0.5}
    assert a["config"]["diffusion"]["predict_xstart"] is True
    header = (straight / "progress.csv").read_text().splitlines()[0].split(",")
    assert "train_preseg_dice" in header and "preseg_share" in header


def read_progress(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_validation_logs_addpm_next_to_preseg_and_keeps_the_best(nets, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_script(
        "train_addpm.py", "--data_dir", nets["train"], *TINY, *WINDOW, "--max_steps", "5",
        "--log_interval", "1", "--lr", "3e-3", "--val_fraction", "0.25", "--preseg_path", nets["preseg"],
        "--denoiser_path", nets["denoiser"], "--pre_t", "30", "--val_interval", "2",
        "--val_sampling_steps", "3", "--out_dir", out))
    assert "validation every 2 steps on 4 cases with addpm 30 -> 25 (3 UNet evaluations, final step denoiser)" in proc.stdout
    rows = [r for r in read_progress(out / "progress.csv") if r.get("val_score")]
    # Steps 2 and 4, and the last step (5) at the end of the run.
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    for r in rows:
        assert 0.0 <= float(r["val_addpm_dice"]) <= 1.0 and 0.0 <= float(r["val_preseg_dice"]) <= 1.0
        assert float(r["val_gain"]) == pytest.approx(float(r["val_addpm_dice"]) - float(r["val_preseg_dice"]))
    scores = [float(r["val_score"]) for r in rows]
    best_step = int(rows[scores.index(max(scores))]["step"])
    best = load_checkpoint(out / "best.pt", kind="diffusion")
    assert best["step"] == best_step and best["extra"]["best_step"] == best_step
    assert best["extra"]["best_val_score"] == pytest.approx(max(scores))
    # best.pt is a whole checkpoint: sample.py runs on it.
    sample_out = tmp_path / "samples"
    proc = ok(run_script("sample.py", "--data_dir", nets["test"], "--model_path", out / "best.pt",
                         "--preseg_path", nets["preseg"], "--denoiser_path", nets["denoiser"],
                         "--pre_t", "30", "--num_ensemble", "1", "--device", "cpu", "--out_dir", sample_out))
    assert "warning" not in proc.stderr
    assert (sample_out / "summary.json").is_file()


def write_full_presegs(dataset, folder: Path) -> None:
    """A pre-segmentation file per case that marks every pixel as foreground."""
    folder.mkdir()
    for i in range(len(dataset)):
        item = dataset[i]
        shape = tuple(item["meta"]["original_shape"])
        nib.save(nib.Nifti1Image(np.ones(shape, dtype=np.uint8), np.eye(4)), folder / f"{item['case_id']}.nii.gz")


def tiny_loop(demo, tmp_path, **loop_flags) -> TrainLoop:
    """A TrainLoop of a tiny UNet on the demo's training slices at 32 x 32."""
    args = {"data_dir": str(demo["train"]), "image_size": 32, "resize_mode": "resize", "val_fraction": 0.0}
    dataset = dataset_from_args(args, "train")
    diffusion = create_gaussian_diffusion(diffusion_steps=100, noise_schedule="cosine", learn_sigma=False,
                                          sigma_small=False, rescale_timesteps=False,
                                          rescale_learned_sigmas=False)
    model = create_model(image_size=32, image_channels=dataset.num_channels, num_channels=8, num_res_blocks=1,
                         num_heads=1, num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="",
                         channel_mult="", dropout=0.0, class_cond=False, learn_sigma=False,
                         use_checkpoint=False, use_scale_shift_norm=False, resblock_updown=False,
                         use_new_attention_order=False)
    return TrainLoop(model=model, diffusion=diffusion, dataset=dataset, collate_fn=None, config={},
                     out_dir=str(tmp_path / "run"), ctx=dist_util.setup_dist("cpu"), batch_size=8, **loop_flags)


def test_preseg_aware_batches_noise_the_preseg_and_keep_the_label_as_target(demo, tmp_path):
    args = {"data_dir": str(demo["train"]), "image_size": 32, "resize_mode": "resize", "val_fraction": 0.0}
    dataset = dataset_from_args(args, "train")
    write_full_presegs(dataset, tmp_path / "presegs")
    source = PresegSource.from_flags(preseg_dir=str(tmp_path / "presegs"), preprocess=dataset.preprocess)
    loop = tiny_loop(demo, tmp_path, preseg_fn=source, preseg_fraction=0.5)
    batch = collate([dataset[i] for i in range(8)])
    x_start = to_diffusion_space(batch["label"].float().unsqueeze(1), "pm1")
    assert (x_start < 0).any()
    noised = loop._noised_start(batch, x_start, torch.Generator().manual_seed(0))
    from_preseg = (noised == 1.0).flatten(1).all(1)
    # floor(0.5 * 8 + u) = 4 examples take the (all-foreground) pre-segmentation ...
    assert int(from_preseg.sum()) == 4
    # ... and the others their own label; the label stays the target for all of them.
    assert torch.equal(noised[~from_preseg], x_start[~from_preseg])
    other = loop._noised_start(batch, x_start, torch.Generator().manual_seed(1))
    assert not torch.equal((other == 1.0).flatten(1).all(1), from_preseg)  # random positions


@pytest.mark.slow
@pytest.mark.parametrize("bad,words", [
    (["--t_range", "30,25"], "--t_range"),
    (["--t_range_mix", "0.5"], "--t_range_mix"),
    (["--train_start", "preseg"], "--preseg_path"),
    (["--train_start", "pixels"], "--train_start"),
    (["--val_interval", "2"], "--preseg_path"),
    (["--val_interval", "2", "--preseg_path", "PRESEG", "--val_fraction", "0"], "val subset"),
    (["--val_interval", "2", "--preseg_path", "PRESEG", "--val_sampling_steps", "9"], "--val_sampling_steps"),
    (["--val_interval", "2", "--preseg_path", "PRESEG", "--val_final_step", "denoiser"], "--denoiser_path"),
])
def test_bad_window_and_validation_flags_give_one_line_and_write_nothing(nets, tmp_path, bad, words):
    bad = [str(nets["preseg"]) if b == "PRESEG" else b for b in bad]
    out = tmp_path / "run"
    proc = run_script("train_addpm.py", "--data_dir", nets["train"], *TINY, "--max_steps", "1",
                      "--pre_t", "30", "--T", "25", "--val_sampling_steps", "2", "--out_dir", out, *bad)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_sampling_outside_the_window_warns_in_one_line(nets, tmp_path, capfd):
    out = tmp_path / "run"
    ok(run_script("train_addpm.py", "--data_dir", nets["train"], *TINY, "--t_range", "25,30",
                  "--max_steps", "1", "--val_fraction", "0", "--out_dir", out))
    common = ["sample.py", "--data_dir", str(nets["test"]), "--model_path", str(out / "final.pt"),
              "--preseg_path", str(nets["preseg"]), "--denoiser_path", str(nets["denoiser"]),
              "--num_ensemble", "1", "--device", "cpu", "--file_list", "0"]
    for flags, warned in ((["--sampler", "ddim", "--sampling_steps", "5"], True),
                          (["--sampler", "addpm", "--pre_t", "30"], False)):
        sys.argv = [*common, *flags, "--out_dir", str(tmp_path / flags[1])]
        run_cli(sample.main)
        err = capfd.readouterr().err
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        if warned:
            assert len(warnings) == 1 and "levels 25..30 only (--t_range 25,30)" in warnings[0], err
            assert "5 of its 5 levels" in warnings[0]
        else:
            assert not warnings, err


@pytest.mark.slow
def test_torchrun_with_window_and_validation(nets, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_script(
        "train_addpm.py", "--data_dir", nets["train"], *TINY, *WINDOW, "--batch_size", "2",
        "--microbatch", "1", "--max_steps", "2", "--val_fraction", "0.25", "--preseg_path", nets["preseg"],
        "--train_start", "preseg", "--pre_t", "30", "--T", "25", "--val_interval", "2", "--val_sampling_steps", "2",
        "--out_dir", out, torchrun=True))
    assert "parameters consistent across 2 ranks" in proc.stdout
    assert "validation val_score" in proc.stdout
    assert load_checkpoint(out / "best.pt", kind="diffusion")["step"] == 2


def test_validation_headline_averages_the_channels_the_labels_hold():
    """ET is in no validation label: whether the UNet predicts it nowhere (nan) or on a few
    pixels (0), the headline is the mean over WT and TC, so that best.pt compares like with like."""
    validator = AddpmValidator(dataset=[None] * 2, plan=None, diffusion=None, mask_space="pm1", preseg=None,
                               denoise_fn=None, max_cases=0, batch_size=1, ctx=dist_util.setup_dist("cpu"),
                               mask_channels=3, exclusive=False, channel_names=("WT", "TC", "ET"))

    def counts(et_false_positives):
        # [addpm|preseg] x [WT, TC, ET] x [tp, fp, fn], per group.
        a, b = np.zeros((2, 3, 3), np.int64), np.zeros((2, 3, 3), np.int64)
        a[:, 0], a[:, 1] = (5, 0, 0), (3, 1, 0)
        b[:, 0], b[:, 1], b[0, 2] = (4, 0, 0), (2, 0, 1), (0, et_false_positives, 0)
        return {"a": a, "b": b}

    quiet, noisy = validator._scores(counts(0)), validator._scores(counts(2))
    tc = np.mean([2 * 3 / (2 * 3 + 1), 2 * 2 / (2 * 2 + 1)])
    assert np.isnan(quiet["val_addpm_dice_ET"]) and noisy["val_addpm_dice_ET"] == 0.0
    for scores in (quiet, noisy):
        assert scores["val_addpm_dice"] == pytest.approx((1.0 + tc) / 2)
        assert scores["val_preseg_dice"] == pytest.approx((1.0 + tc) / 2)
    # Once a label holds ET, it enters the mean.
    held = counts(2)
    held["b"][:, 2, 2] = 3
    assert validator._scores(held)["val_addpm_dice"] == pytest.approx((1.0 + tc + 0.0) / 3)
    # Labels that hold no channel at all (tumour-free slices): the defined channels, else nan.
    empty = {"a": np.zeros((2, 3, 3), np.int64)}
    assert np.isnan(validator._scores(empty)["val_addpm_dice"])
    empty["a"][0, 2, 1] = 4
    assert validator._scores(empty)["val_addpm_dice"] == 0.0


def test_an_undefined_first_validation_score_keeps_no_best(demo, tmp_path):
    """A validation that scores nan (no label and no prediction in any channel) logs its line and
    keeps no best.pt, and a later defined score becomes the first best."""
    scores = iter([float("nan"), 0.5])
    loop = tiny_loop(demo, tmp_path, validator=lambda model: {"val_score": next(scores)})
    loop.validate()
    assert loop.best_val_score is None and not (tmp_path / "run" / "best.pt").exists()
    loop.validate()
    assert loop.best_val_score == 0.5 and (tmp_path / "run" / "best.pt").exists()
