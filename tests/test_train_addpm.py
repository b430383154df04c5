"""End-to-end runs of train_addpm.py through its command line, on tiny configs (CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion.checkpoint import load_checkpoint, load_weights
from guided_diffusion.errors import CheckpointError
from guided_diffusion.script_util import model_and_diffusion_from_config
from guided_diffusion.train_util import StepBatchSampler

REPO_ROOT = Path(__file__).resolve().parents[1]

# The original ADDPM command's flags, with the sizes shrunk to a 32x32, 16-channel UNet.
ORIGINAL_FLAGS = [
    "--lr", "1e-4", "--class_cond", "False", "--num_heads", "1", "--learn_sigma", "False",
    "--use_scale_shift_norm", "False", "--noise_schedule", "cosine",
    "--rescale_learned_sigmas", "False", "--rescale_timesteps", "False",
]
TINY = [
    "--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1",
    "--attention_resolutions", "16", "--diffusion_steps", "50", "--batch_size", "2",
    "--device", "cpu", "--progress", "False",
]


def run_train(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "train_addpm.py", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "data.demo", "--out", str(out), "--n_train", "8", "--n_test", "1",
           "--image_size", "32", "--slices_per_patient", "2", "--seed", "0"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    return out / "training"


def assert_state_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_two_steps_on_demo_data_write_a_checkpoint_that_rebuilds_the_model(demo_dir, tmp_path):
    out = tmp_path / "run"
    ok(run_train("--data_dir", demo_dir, *ORIGINAL_FLAGS, *TINY, "--max_steps", "2",
                 "--ema_rate", "0.9999,0.999", "--log_interval", "1", "--out_dir", out))

    ckpt = load_checkpoint(out / "final.pt", kind="diffusion")
    assert ckpt["step"] == 2
    config = ckpt["config"]
    assert config["image_size"] == 32 and config["image_channels"] == 4 and config["mask_channels"] == 1
    assert config["model"]["num_channels"] == 16 and "image_size" not in config["model"]
    assert config["diffusion"]["noise_schedule"] == "cosine"
    assert config["preprocess"]["image_size"] == 32
    assert set(ckpt["ema"]) == {"0.9999", "0.999"}
    assert ckpt["optimizer"]["state"]

    model, diffusion = model_and_diffusion_from_config(config)
    assert diffusion.num_timesteps == 50 and not diffusion.rescale_timesteps
    load_weights(model, ckpt["model"], source="final.pt")
    for state in ckpt["ema"].values():
        load_weights(model, state, source="final.pt")
    assert not torch.equal(ckpt["ema"]["0.999"]["out.2.weight"], ckpt["model"]["out.2.weight"])
    # The EMA warms up: after two steps it follows the trained weights, not the zero-initialised
    # output layer it started from (a plain 0.9999 average would still be ~0 there).
    trained, averaged = ckpt["model"]["out.2.weight"], ckpt["ema"]["0.9999"]["out.2.weight"]
    assert (averaged - trained).norm() < 0.1 * trained.norm()

    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("loss", "mse", "grad_norm", "lr", "samples_per_sec", "step"):
        assert key in header
    assert any(key.startswith("loss_q") for key in header)


@pytest.mark.slow
def test_two_steps_on_the_brats_fixture(brats2d_mini, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_train("--data_dir", brats2d_mini / "training", *TINY, "--resize_mode", "resize",
                        "--val_fraction", "0", "--max_steps", "2", "--out_dir", out))
    lines = proc.stdout.splitlines()
    start = lines.index("diffusion training")
    fields = dict(line.split(None, 1) for line in lines[start + 1 : start + 7])
    assert fields["model"].startswith("UNet, ") and fields["model"].endswith("50-step cosine chain, mask space pm1")
    assert fields["device"] == "cpu, fp32, 1 process"
    assert fields["data"] == f"{brats2d_mini / 'training'}: 6 examples with 4 channel(s) (brats2d)"
    assert fields["training"].startswith("training on every level of the chain")
    assert fields["steps"] == "0 -> 2, global batch 2 = 2 x 1 process"
    assert fields["out_dir"].startswith(f"{out}: diffusion_<step>.pt every 10000 steps (newest 3 kept), final.pt")
    assert lines[-1].startswith("diffusion training done in ") and ": step 2; loss " in lines[-1]
    assert lines[-1].endswith(f"; checkpoint {out / 'final.pt'}; logs and curves.png in {out}")
    ckpt = load_checkpoint(out / "final.pt", kind="diffusion")
    assert ckpt["step"] == 2
    assert ckpt["config"]["preprocess"]["resize_mode"] == "resize"
    assert ckpt["config"]["preprocess"]["channel_names"] and ckpt["config"]["image_channels"] == 4
    model, _ = model_and_diffusion_from_config(ckpt["config"])
    load_weights(model, ckpt["model"], source="final.pt")


@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(demo_dir, tmp_path):
    # Microbatches, dropout and the loss-aware sampler all carry state or randomness across steps.
    flags = ["--data_dir", demo_dir, *TINY, "--microbatch", "1", "--dropout", "0.1",
             "--schedule_sampler", "loss-second-moment", "--ema_rate", "0.99,0.9",
             "--save_interval", "1", "--keep_checkpoints", "2", "--seed", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(run_train(*flags, "--max_steps", "4", "--out_dir", straight))
    ok(run_train(*flags, "--max_steps", "2", "--out_dir", resumed))
    proc = ok(run_train(*flags, "--max_steps", "4", "--out_dir", resumed, "--resume", "auto"))
    assert "at step 2" in proc.stdout

    a = load_checkpoint(straight / "final.pt", kind="diffusion")
    b = load_checkpoint(resumed / "final.pt", kind="diffusion")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema", "optimizer", "extra"):
        assert_state_equal(a[key], b[key], key)
    # The newest --keep_checkpoints numbered files stay, besides final.pt.
    assert sorted(p.name for p in resumed.glob("*.pt")) == ["diffusion_0000003.pt", "diffusion_0000004.pt", "final.pt"]


@pytest.mark.slow
def test_two_process_torchrun_ends_with_identical_weights(demo_dir, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_train("--data_dir", demo_dir, *TINY, "--microbatch", "1", "--max_steps", "2",
                        "--out_dir", out, torchrun=True))
    assert "global batch 4 = 2 x 2" in proc.stdout
    assert "parameters consistent across 2 ranks" in proc.stdout
    assert load_checkpoint(out / "final.pt", kind="diffusion")["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("bad", [
    ["--noise_schedule", "foo"],
    ["--class_cond", "True"],
    ["--image_size", "250"],
    ["--data_dir", "EMPTY"],
])
def test_bad_flags_and_data_give_one_error_line(bad, demo_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = [str(empty) if b == "EMPTY" else b for b in bad]
    out = tmp_path / "run"
    proc = run_train("--data_dir", demo_dir, *TINY, "--max_steps", "1", "--out_dir", out, *bad)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert bad[0] in lines[0] or "empty" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_dir, tmp_path):
    out = tmp_path / "run"
    # An absurd learning rate without clipping throws the weights to ~1e37 in step 1; the
    # forward pass of step 2 then overflows.
    proc = run_train("--data_dir", demo_dir, *TINY, "--lr", "1e37", "--grad_clip", "0",
                     "--save_interval", "1", "--max_steps", "5", "--out_dir", out)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    good = out / "diffusion_0000001.pt"
    assert last == f"error: non-finite loss at step 2; last good checkpoint: {good}"
    assert load_checkpoint(good, kind="diffusion")["step"] == 1
    assert sorted(p.name for p in out.glob("*.pt")) == ["diffusion_0000001.pt"]


def test_step_batch_sampler_shards_resumes_and_crosses_epochs():
    def batches(rank, start, count, world=2):
        it = iter(StepBatchSampler(5, 3, rank=rank, world_size=world, seed=7, start_position=start))
        return [next(it) for _ in range(count)]

    r0, r1 = batches(0, 0, 4), batches(1, 0, 4)
    stream = [i for b0, b1 in zip(r0, r1) for i in b0 + b1]
    # Every epoch of 5 items is a permutation; steps run across epoch boundaries.
    for epoch in range(4):
        assert sorted(stream[5 * epoch:5 * epoch + 5]) == list(range(5))
    # Resuming at the sample position of step 2 gives steps 2 and 3 again.
    assert batches(0, 2 * 6, 2) == r0[2:] and batches(1, 2 * 6, 2) == r1[2:]
    assert batches(0, 0, 4) == r0


def test_model_and_diffusion_from_config_rejects_incomplete_or_foreign_configs():
    with pytest.raises(CheckpointError, match="no 'model' section"):
        model_and_diffusion_from_config({"diffusion": {}}, source="x.pt")
    with pytest.raises(CheckpointError, match="image_channels"):
        model_and_diffusion_from_config({"image_size": 32, "model": {}}, source="x.pt")
    with pytest.raises(CheckpointError, match="warp_factor"):
        model_and_diffusion_from_config(
            {"image_size": 32, "image_channels": 2, "model": {"warp_factor": 9}}, source="x.pt"
        )
    model, diffusion = model_and_diffusion_from_config(
        {"model": {"image_size": 32, "image_channels": 2, "mask_channels": 1, "num_channels": 16,
                   "num_res_blocks": 1, "attention_resolutions": "16"},
         "diffusion": {"diffusion_steps": 50, "learn_sigma": False}}
    )
    assert diffusion.num_timesteps == 50 and model.in_channels == 3
