"""The CUDA paths: training and sampling on a GPU in each precision (``pytest -m gpu``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion.checkpoint import load_checkpoint
from tests.test_sample import assert_same_outputs_within_tolerance

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


@pytest.fixture(scope="module")
def trained(demo):
    """The three networks trained on CUDA in a precision, once per precision: trained(p) -> folder."""
    done = {}

    def train(precision: str) -> Path:
        out = demo / precision
        if precision not in done:
            data = demo / "demo" / "training"
            run("train_addpm.py", "--data_dir", data, "--image_size", "64", "--num_channels", "32",
                "--num_res_blocks", "1", "--attention_resolutions", "16", *SCHEDULE, "--batch_size", "4",
                "--max_steps", "3", "--device", "cuda", "--precision", precision, "--out_dir", out / "addpm",
                "--progress", "False")
            run("train_preseg_network.py", "--data_dir", data, *NET, "--precision", precision,
                "--out_dir", out / "preseg")
            run("train_denoising_network.py", "--data_dir", data, *NET, *SCHEDULE, "--T", "25",
                "--precision", precision, "--out_dir", out / "denoiser")
            done[precision] = out
        return out

    return train


def sample_on_cuda(demo, trained_dir: Path, out: Path, *flags):
    run("sample.py", "--data_dir", demo / "demo" / "testing", "--model_path", trained_dir / "addpm" / "final.pt",
        "--preseg_path", trained_dir / "preseg" / "final.pt", "--denoiser_path", trained_dir / "denoiser" / "final.pt",
        "--pre_t", "40", "--num_ensemble", "3", "--device", "cuda", "--out_dir", out, *flags)
    assert (out / "summary.json").is_file()
    assert len(list((out / "masks").glob("*.nii.gz"))) == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_and_sample_on_cuda(demo, trained, precision):
    out = trained(precision)
    ckpt = load_checkpoint(out / "addpm" / "final.pt", kind="diffusion")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    sample_on_cuda(demo, out, out / "samples", "--precision", precision)


def test_fast_path_and_compile_on_cuda_give_the_exact_results(demo, trained, tmp_path):
    """On CUDA the fast path takes SDPA attention and NHWC; compiled, Triton kernels."""
    out = trained("fp32")
    runs = {"exact": ["--fast_path", "False"], "fast": [], "compiled": ["--compile", "True"]}
    for name, flags in runs.items():
        sample_on_cuda(demo, out, tmp_path / name, *flags)
    ids = [p.name[: -len(".nii.gz")] for p in sorted((tmp_path / "exact" / "masks").glob("*.nii.gz"))]
    # cuDNN convolutions run in TF32 by default (PyTorch's setting), whose rounding is ~1e-3.
    for name in ("fast", "compiled"):
        assert_same_outputs_within_tolerance(tmp_path / name, tmp_path / "exact", ids, atol=5e-3, undecided=0.02)


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
