"""The CUDA paths: training and sampling on a GPU in each precision (``pytest -m gpu``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ["--diffusion_steps", "100", "--noise_schedule", "cosine"]
NET = ["--image_size", "64", "--base_channels", "8", "--depth", "3", "--batch_size", "4", "--max_steps", "3",
       "--device", "cuda"]


def run(script, *args):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_LOGDIR"}
    cmd = [sys.executable, *([script] if script.endswith(".py") else ["-m", script]), *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    run("data.demo", "--out", root / "demo", "--n_train", "16", "--n_test", "2", "--image_size", "64")
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_and_sample_on_cuda(demo, precision):
    out = demo / precision
    train = demo / "demo" / "training"
    run("train_addpm.py", "--data_dir", train, "--image_size", "64", "--num_channels", "32",
        "--num_res_blocks", "1", "--attention_resolutions", "16", *SCHEDULE, "--batch_size", "4",
        "--max_steps", "3", "--device", "cuda", "--precision", precision, "--out_dir", out / "addpm",
        "--progress", "False")
    run("train_preseg_network.py", "--data_dir", train, *NET, "--precision", precision, "--out_dir", out / "preseg")
    run("train_denoising_network.py", "--data_dir", train, *NET, *SCHEDULE, "--T", "25",
        "--precision", precision, "--out_dir", out / "denoiser")
    ckpt = load_checkpoint(out / "addpm" / "final.pt", kind="diffusion")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    run("sample.py", "--data_dir", demo / "demo" / "testing", "--model_path", out / "addpm" / "final.pt",
        "--preseg_path", out / "preseg" / "final.pt", "--denoiser_path", out / "denoiser" / "final.pt",
        "--pre_t", "40", "--num_ensemble", "3", "--device", "cuda", "--precision", precision,
        "--out_dir", out / "samples")
    assert (out / "samples" / "summary.json").is_file()
    assert len(list((out / "samples" / "masks").glob("*.nii.gz"))) == 2


def test_two_gpu_processes_train_with_nccl(demo):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    out = demo / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_addpm.py", "--data_dir", str(demo / "demo" / "training"), "--image_size", "64",
           "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "16", *SCHEDULE,
           "--batch_size", "2", "--max_steps", "3", "--device", "cuda", "--out_dir", str(out), "--progress", "False"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "consistent across 2 ranks" in (out / "log.txt").read_text()
