"""What the trainers do with their --out_dir: a lost final.pt, temporary files of killed writers,
folders that cannot take a run, nothing written before the inputs are checked, the last line
of a failed run, and the denoiser taking train_addpm.py's $DIFFUSION_FLAGS."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import train_addpm
import train_denoising_network
import train_preseg_network
from data import Preprocess, create_dataset
from guided_diffusion.atomic import atomic_path
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.script_util import run_cli
from preseg.io import build_network_from_config, network_config
from supervised import TrainOptions, seed_everything, train

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = ["--image_size", "32", "--num_channels", "16", "--num_res_blocks", "1",
             "--attention_resolutions", "16", "--diffusion_steps", "50", "--batch_size", "2",
             "--device", "cpu", "--progress", "False"]
TINY_NET = ["--image_size", "32", "--base_channels", "8", "--depth", "2", "--batch_size", "2",
            "--device", "cpu", "--max_epoch", "0"]
# The original ADDPM README's DIFFUSION_FLAGS.
DIFFUSION_FLAGS = ["--diffusion_steps", "1000", "--noise_schedule", "cosine", "--rescale_learned_sigmas", "False",
                   "--rescale_timesteps", "False"]
SCRIPTS = {"train_addpm.py": train_addpm, "train_preseg_network.py": train_preseg_network,
           "train_denoising_network.py": train_denoising_network}


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_LOGDIR", None)
    return env


def run_script(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def run_main(capfd, script: str, *args) -> tuple:
    """A trainer's main through run_cli, in this process: (exit code, stderr lines)."""
    capfd.readouterr()
    try:
        run_cli(lambda: SCRIPTS[script].main([str(a) for a in args]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "data.demo", "--out", str(out), "--n_train", "8", "--n_test", "1",
                    "--image_size", "32", "--slices_per_patient", "2", "--seed", "0"],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    return out / "training"


def killed_writer(target: Path) -> Path:
    """A process that writes ``target`` atomically and is killed in the middle of the write:
    the temporary file it leaves behind."""
    code = ("import sys, time\nfrom guided_diffusion.atomic import atomic_write\n"
            "def write(tmp):\n    open(tmp, 'w').write('half a file')\n    print(tmp, flush=True)\n"
            "    time.sleep(300)\natomic_write(sys.argv[1], write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert tmp.is_file() and tmp.name.startswith(f".{target.name}.")
    return tmp


# --------------------------------------------------------------------------------------------
# A lost final.pt, and the temporary files of writers that were killed


def assert_final_equals(out: Path, numbered: str) -> None:
    """final.pt holds step 4, with the weights of the numbered checkpoint of that step."""
    final, saved = load_checkpoint(out / "final.pt"), load_checkpoint(out / numbered)
    assert final["step"] == saved["step"] == 4
    for key, value in saved["model"].items():
        assert torch.equal(value, final["model"][key]), key


@pytest.mark.slow
def test_train_addpm_writes_a_lost_final_pt_and_removes_stale_temp_files(demo_dir, tmp_path):
    out = tmp_path / "run"
    first = run_script("train_addpm.py", "--data_dir", demo_dir, *TINY_UNET, "--max_steps", 4,
                       "--save_interval", 2, "--out_dir", out)
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "final.pt").unlink()  # as if the run was killed while final.pt was written
    stale = killed_writer(out / "final.pt")
    with atomic_path(out / "notes.txt") as live:  # a writer that still runs (this process)
        Path(live).write_text("being written")
        resumed = run_script("train_addpm.py", "--data_dir", demo_dir, *TINY_UNET, "--max_steps", 4,
                             "--save_interval", 2, "--out_dir", out, "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert Path(live).is_file()
    assert not stale.exists()
    assert_final_equals(out, "diffusion_0000004.pt")
    # Nothing left to do and final.pt up to date: it is not written again.
    mtime = (out / "final.pt").stat().st_mtime_ns
    again = run_script("train_addpm.py", "--data_dir", demo_dir, *TINY_UNET, "--max_steps", 4,
                       "--out_dir", out, "--resume", "auto")
    assert again.returncode == 0 and (out / "final.pt").stat().st_mtime_ns == mtime


def test_preseg_engine_writes_a_lost_final_pt_and_removes_stale_temp_files(demo_dir, tmp_path):
    dataset = create_dataset(str(demo_dir), preprocess=Preprocess(image_size=32), require_labels=True)
    config = network_config({"arch": "unet", "base_channels": 8, "depth": 2, "dropout": 0.0, "arch_kwargs": ""},
                            in_channels=dataset.num_channels)

    def run(**overrides):
        seed_everything(0)
        options = TrainOptions(device="cpu", batch_size=2, max_steps=4, max_epoch=0, save_interval=2,
                               keep_checkpoints=0, out_dir=str(tmp_path), **overrides)
        return train(kind="preseg", model=build_network_from_config(config), config=config, train_set=dataset,
                     val_set=None, batch_to_input_target=lambda b, g: (b["image"], b["label"]), options=options)

    run()
    (tmp_path / "final.pt").unlink()
    stale = killed_writer(tmp_path / "preseg_0000004.pt")
    assert run(resume="auto").step == 4
    assert not stale.exists()
    assert_final_equals(tmp_path, "preseg_0000004.pt")
    mtime = (tmp_path / "final.pt").stat().st_mtime_ns
    run(resume="auto")
    assert (tmp_path / "final.pt").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------------------------
# Folders that cannot take a run; nothing written before the inputs are checked


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_out_dir_that_is_a_file_is_one_line_before_any_work(script, demo_dir, tmp_path, capfd):
    target = tmp_path / "taken"
    target.write_text("a file\n")
    code, lines = run_main(capfd, script, "--data_dir", tmp_path / "no_data_needed", "--out_dir", target)
    assert code == 2 and len(lines) == 1 and lines[0] == f"error: --out_dir {target} is a file, not a folder"
    assert target.read_text() == "a file\n"


# Imports the script as the user who started it, then (as root) becomes ``nobody`` before main():
# the interpreter of this machine may live where only root can read it.
AS_USER = """
import importlib, os, sys
from guided_diffusion.script_util import run_cli
script, uid = sys.argv[1], int(sys.argv[2])
module = importlib.import_module(script[:-3])
if uid >= 0:
    os.setgid(uid)
    os.setuid(uid)
sys.argv = [script, *sys.argv[3:]]
run_cli(module.main)
"""


@pytest.mark.slow
def test_read_only_out_dir_is_one_line_for_every_script():
    """Run as a user who may not write there: the scripts refuse before any work."""
    # Outside pytest's own (owner-only) folder, so that another user can reach it.
    base = Path(tempfile.mkdtemp(prefix="addpm-readonly-"))
    uid = -1
    try:
        if os.geteuid() == 0:
            try:
                uid = pwd.getpwnam("nobody").pw_uid
            except KeyError:
                pytest.skip("running as root and there is no user 'nobody' to lack the permission")
            base.chmod(0o755)  # readable by all, writable by root only
        else:
            base.chmod(0o555)
        procs = {}
        for script in [*SCRIPTS, "sample.py"]:
            flags = ["--data_dir", str(base), "--out_dir", str(base / "out")]
            flags += ["--model_path", "m.pt"] if script == "sample.py" else []
            procs[script] = subprocess.Popen([sys.executable, "-c", AS_USER, script, str(uid), *flags],
                                             cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
        for script, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, (script, err[-2000:])
            assert lines == [f"error: --out_dir {base / 'out'}: no permission to write there (in {base})"], script
        assert not (base / "out").exists()
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


def hostile_checkpoint(path: Path) -> Path:
    """A torch file that unpickles a Python object (what weights_only=True exists to refuse)."""
    torch.save({"format": "addpm-checkpoint", "payload": Path("/etc/passwd")}, path)
    return path


@pytest.mark.parametrize("script, flags, named", [
    ("train_addpm.py", ["--resume_checkpoint", "HOSTILE"], "pathlib"),
    ("train_addpm.py", ["--microbatch", "5"], "--microbatch 5"),
    ("train_preseg_network.py", ["--resume_checkpoint", "HOSTILE", "--max_steps", "2"], "pathlib"),
    ("train_denoising_network.py", ["--resume_checkpoint", "HOSTILE", "--max_steps", "2"], "pathlib"),
], ids=["addpm-hostile", "addpm-microbatch", "preseg-hostile", "denoiser-hostile"])
def test_nothing_is_written_before_the_inputs_are_checked(script, flags, named, demo_dir, tmp_path, capfd):
    hostile = hostile_checkpoint(tmp_path / "hostile.pt")
    flags = [str(hostile) if f == "HOSTILE" else f for f in flags]
    common = TINY_UNET if script == "train_addpm.py" else TINY_NET
    out = tmp_path / "run"
    code, lines = run_main(capfd, script, "--data_dir", demo_dir, *common, "--val_fraction", 0, *flags,
                           "--out_dir", out)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The last line of a run that fails with a progress bar open


@pytest.mark.slow
def test_error_inside_the_training_loop_is_the_last_line(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    bad = sorted(data.glob("*/*_t2_*.nii.gz"))[0]
    image = nib.load(str(bad))
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels[3, 3] = np.nan
    nib.save(nib.Nifti1Image(voxels, image.affine), str(bad))
    proc = run_script("train_preseg_network.py", "--data_dir", data, *TINY_NET, "--max_steps", 8,
                      "--val_fraction", 0, "--out_dir", tmp_path / "run")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "train preseg" in proc.stderr  # the bar was drawn ...
    assert lines[-1] == f"error: {bad} contains NaN or inf values (1 voxel)"  # ... and closed first
    assert sum(line.startswith("error:") for line in lines) == 1


# --------------------------------------------------------------------------------------------
# One $DIFFUSION_FLAGS for both trainers


def test_denoiser_takes_the_diffusion_flags_and_records_the_ignored_ones(demo_dir, tmp_path, capfd):
    out = tmp_path / "run"
    code, lines = run_main(capfd, "train_denoising_network.py", "--data_dir", demo_dir, *TINY_NET, "--T", 250,
                           *DIFFUSION_FLAGS, "--max_steps", 1, "--val_fraction", 0, "--out_dir", out)
    assert code == 0, lines
    config = load_checkpoint(out / "final.pt", kind="denoiser")["config"]
    assert config["ignored_flags"] == {"sigma_small": False, "timestep_respacing": "", "predict_xstart": False,
                                       "rescale_timesteps": False, "rescale_learned_sigmas": False}
    assert (config["diffusion_steps"], config["noise_schedule"]) == (1000, "cosine")
    assert "ignored (they do not concern the denoising net): " in (out / "log.txt").read_text()


def test_mask_of_another_size_stops_a_trainer_before_it_writes(tmp_path, capfd):
    from PIL import Image

    data = tmp_path / "data"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    for n in range(4):
        Image.fromarray(np.full((32, 32, 3), 50 + n, dtype=np.uint8)).save(data / "images" / f"c{n}.png")
        size = (30, 32) if n == 3 else (32, 32)
        Image.fromarray(np.zeros(size, dtype=np.uint8)).save(data / "masks" / f"c{n}.png")
    out = tmp_path / "run"
    code, lines = run_main(capfd, "train_preseg_network.py", "--data_dir", data, *TINY_NET, "--max_steps", 2,
                           "--val_fraction", 0, "--out_dir", out)
    assert code == 2 and lines == [f"error: mask {data / 'masks' / 'c3.png'} has shape (30, 32) but image "
                                   f"{data / 'images' / 'c3.png'} has shape (32, 32)"]
    assert not out.exists()
